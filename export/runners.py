"""One interface over the runtimes: ``logits(ids) -> [batch, seq, vocab]`` (numpy), and greedy
decoding on top of it (no KV cache: every step runs the whole sequence, as the exported graphs
take ``input_ids`` alone)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

META = "export.json"
SUFFIXES = {".onnx": "onnx", ".pte": "executorch"}


class ExportError(ValueError):
    """Bad input to an export: an unknown format or quantization, an adapter folder that is not one."""


class ArtifactError(ExportError):
    """An artifact that is missing, of an unknown kind, or that its runtime cannot load."""


class LogitsOnly(torch.nn.Module):
    """``forward(input_ids) -> logits`` around a causal LM, without a cache (what is exported)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


def torch_runner(model) -> Callable[[np.ndarray], np.ndarray]:
    wrapped = LogitsOnly(model).eval()

    @torch.no_grad()
    def run(ids: np.ndarray) -> np.ndarray:
        return wrapped(torch.from_numpy(np.asarray(ids, dtype=np.int64))).float().numpy()

    return run


def load_runner(path: str | Path, threads: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """A runner for an exported ``.onnx`` or ``.pte`` file; ArtifactError names what is wrong.
    ``threads``: the runtime's CPU threads (0: its own default, which for ExecuTorch's thread pool
    is not ``OMP_NUM_THREADS``; set it)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    kind = SUFFIXES.get(path.suffix)
    if kind is None:
        raise ArtifactError(f"{path}: unknown artifact type '{path.suffix}' (expected .onnx or .pte)")
    if kind == "onnx":
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        try:
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None

        def run(ids: np.ndarray) -> np.ndarray:
            return sess.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)})[0]

        return run
    from executorch.runtime import Runtime

    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)  # before any method runs: nothing is executing
    try:
        method = Runtime.get().load_program(str(path)).load_method("forward")
    except Exception as exc:  # the runtime raises RuntimeError/ValueError with its own codes
        raise ArtifactError(f"{path}: the ExecuTorch runtime cannot load it ({str(exc).splitlines()[0]})") from None

    def run_et(ids: np.ndarray) -> np.ndarray:
        return method.execute([torch.from_numpy(np.asarray(ids, dtype=np.int64))])[0].float().numpy()

    return run_et


def greedy(run: Callable[[np.ndarray], np.ndarray], ids: list[int], max_new_tokens: int,
           eos: int | None = None) -> tuple[list[int], float]:
    """(new token ids, seconds) of greedy decoding from prompt ``ids``."""
    out = list(ids)
    t0 = time.perf_counter()
    for _ in range(max_new_tokens):
        nxt = int(run(np.array([out], dtype=np.int64))[0, -1].argmax())
        if eos is not None and nxt == eos:
            break
        out.append(nxt)
    return out[len(ids):], time.perf_counter() - t0


def read_meta(artifact: str | Path) -> dict:
    """The ``export.json`` written beside an artifact (tokenizer folder, format, limits)."""
    meta = Path(artifact).parent / META
    if not meta.is_file():
        raise ArtifactError(f"{artifact}: no {META} beside it (export it with `fedlora export`)")
    return json.loads(meta.read_text())
