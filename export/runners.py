"""One interface over the runtimes, :class:`Runner`: ``logits(ids)`` over whole sequences (for
parity) and ``generate(ids, n, eos)``, greedy decoding with the runtime's KV cache, so the cost of
a new token does not grow with the sequence.

- :class:`TorchRunner`: the merged PyTorch model, transformers' cache (the baseline every
  artifact is measured against);
- ONNX (``fedlora_edge.export.onnx_genai.GenaiRunner``): the base built by onnxruntime-genai's model builder,
  the run's adapter applied by onnxruntime at run time, ``Generator`` for decoding;
- ExecuTorch (:class:`ExecuTorchRunner`): a ``.pte`` whose ``forward(input_ids, cache_position)``
  keeps a static KV cache in the program, with the base's weights in the ``.ptd`` beside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .errors import ArtifactError, ExportError  # noqa: F401 - ExportError: imported from here by users

META = "export.json"


class Runner(Protocol):
    def logits(self, ids: np.ndarray) -> np.ndarray:
        """``[batch, seq, vocab]`` logits of whole sequences ``ids`` ``[batch, seq]`` (no cache kept)."""
        ...

    def generate(self, ids: list[int], max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
        """(new token ids, seconds) of greedy decoding from prompt ``ids``, stopping at ``eos``."""
        ...


class TorchRunner:
    """A causal LM in PyTorch eager; ``generate`` keeps transformers' KV cache."""

    def __init__(self, model):
        import inspect

        self.model = model.eval()
        # transformers renamed past_key_values to cache (5.2x); take whichever this version has
        self._cache = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.no_grad()
    def logits(self, ids: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        return self.model(input_ids=x, use_cache=False).logits.float().numpy()

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        x = torch.tensor([ids], dtype=torch.long)
        out = self.model(input_ids=x, use_cache=True)
        past = getattr(out, self._cache)
        new: list[int] = []
        nxt = int(out.logits[0, -1].argmax())
        while len(new) < max_new_tokens and nxt != eos:
            new.append(nxt)
            if len(new) == max_new_tokens:
                break
            out = self.model(input_ids=torch.tensor([[nxt]]), use_cache=True, **{self._cache: past})
            past, nxt = getattr(out, self._cache), int(out.logits[0, -1].argmax())
        return new, time.perf_counter() - t0


def torch_runner(model) -> TorchRunner:
    return TorchRunner(model)


class ExecuTorchRunner:
    """A ``.pte`` exported by ``fedlora_edge.export.build.export_executorch``: ``forward(input_ids [1, s],
    cache_position [s]) -> logits [1, s, vocab]`` with the KV cache as the program's own mutable
    buffers.  A prompt fills the cache from position 0 in one call (positions past it are masked,
    so what an earlier prompt left there is never read), then one call per new token.  ``data``:
    the ``.ptd`` holding the base's weights (None for a program that holds them all, as exports
    before the base was kept apart did)."""

    def __init__(self, path: Path, threads: int = 0, max_seq_len: int = 256, data: Path | None = None):
        from executorch.runtime import Runtime

        if threads:
            from fedlora_edge.edge_client.et_train import set_runtime_threads

            set_runtime_threads(threads)  # before any method runs: nothing is executing
        try:
            self.method = Runtime.get().load_program(str(path), data_path=data).load_method("forward")
        except Exception as exc:  # the runtime raises RuntimeError/ValueError with its own codes
            what = f"{path} with {data}" if data else str(path)
            raise ArtifactError(f"{what}: the ExecuTorch runtime cannot load it "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        self.max_seq_len = max_seq_len

    def _call(self, ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long)
        pos = torch.arange(start, start + len(ids), dtype=torch.long)
        return self.method.execute([x, pos])[0]

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return np.stack([self._call([int(t) for t in row], 0)[0].float().numpy() for row in np.asarray(ids)])

    def generate(self, ids: list[int], max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        budget = min(max_new_tokens, self.max_seq_len - len(ids))
        nxt = int(self._call(list(ids), 0)[0, -1].argmax())
        new: list[int] = []
        while len(new) < budget and nxt != eos:
            new.append(nxt)
            if len(new) == budget:
                break
            nxt = int(self._call([nxt], len(ids) + len(new) - 1)[0, -1].argmax())
        return new, time.perf_counter() - t0


def artifact_folder(artifact: str | Path) -> Path:
    """The export's folder: ``artifact`` itself (an ONNX export is a folder) or the one holding the file."""
    return Path(artifact) if Path(artifact).is_dir() else Path(artifact).parent


def read_meta(artifact: str | Path) -> dict:
    """The ``export.json`` written beside an artifact (tokenizer folder, format, limits)."""
    meta = artifact_folder(artifact) / META
    if not meta.is_file():
        raise ArtifactError(f"{artifact}: no {META} beside it (export it with `fedlora export`)")
    return json.loads(meta.read_text())


def load_runner(path: str | Path, threads: int = 0, adapter: str | Path | None = None) -> Runner:
    """A runner for an exported artifact: an ONNX folder or its ``model.onnx``, or a ``.pte``.
    ``threads``: the runtime's CPU threads (0: its own default, which for ExecuTorch's thread pool
    is not ``OMP_NUM_THREADS``; set it).  ``adapter``: another run's adapter to use with this
    export's base instead of the one the export wrote: for ONNX an ``.onnx_adapter``, for
    ExecuTorch a ``.pte`` (the program and its adapter) run on this export's ``base.<quant>.ptd``."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    if path.suffix == ".onnx":
        from .onnx_genai import GenaiRunner

        if not (path.parent / "genai_config.json").is_file():
            raise ArtifactError(f"{path}: no genai_config.json beside it (export it again with `fedlora export`: "
                                "ONNX artifacts are built by onnxruntime-genai's model builder)")
        meta = read_meta(path) if (path.parent / META).is_file() else {}
        if adapter is None and meta.get("adapter_file"):
            adapter = path.parent / meta["adapter_file"]
        return GenaiRunner(path.parent, Path(adapter) if adapter else None, threads)
    if path.suffix == ".pte":
        meta = read_meta(path) if (path.parent / META).is_file() else {}
        data = path.parent / meta["base_file"] if meta.get("base_file") else None
        if data is not None and not data.is_file():
            raise ArtifactError(f"{path}: its base weights {data} are missing (export.json names them)")
        if adapter is not None:
            if data is None:
                raise ArtifactError(f"{path}: this ExecuTorch artifact has its adapter merged in (an export from "
                                    "before the base was kept apart); --adapter-file needs one with a base.*.ptd")
            if Path(adapter).suffix != ".pte" or not Path(adapter).is_file():
                raise ArtifactError(f"--adapter-file {adapter}: for an ExecuTorch artifact, give another export's "
                                    "model.<quant>.pte (the program and its adapter)")
            path = Path(adapter)
        return ExecuTorchRunner(path, threads, meta.get("max_seq_len", 256), data)
    raise ArtifactError(f"{path}: unknown artifact type '{path.suffix}' (expected .onnx or .pte)")
