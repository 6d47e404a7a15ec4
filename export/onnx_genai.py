"""ONNX artifacts with a KV cache, and LoRA adapters that swap without the base.

The base is built by onnxruntime-genai's model builder (``onnxruntime_genai.models.builder``): a
decoder with a KV cache (``past_key_values.*`` in, ``present.*`` out), fused attention
(``GroupQueryAttention``) and, for ``int8``/``int4``, weight-only ``MatMulNBits`` quantization.
Its ``genai_config.json`` lets onnxruntime-genai's ``Generator`` run it.

Every adapted projection then gets a LoRA branch ``x · A' · B'`` added to the output of its
(possibly quantized) base matmul, where ``A'`` (``[in, r]``) and ``B'`` (``[r, out]``, the scale
folded in) are graph *inputs* with a default of rank 0: with no adapter the model is the base; an
``.onnx_adapter`` file (onnxruntime's adapter format, written by :func:`write_adapter`) supplies
them at run time, at any rank per module.  So a device keeps one base and receives only the
adapter after a run; the adapter's factors stay in fp32 whatever the base's quantization.

The builder's file names the projections ``/model/layers.{i}/attn/{q,k,v,o}_proj/...`` and
``/model/layers.{i}/mlp/{gate,up,down}_proj/...``; q/k/v fusion is turned off so that each
projection keeps its own matmul to hang the branch on.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import ArtifactError, ExportError
from .onnx_edit import insert_after

ADAPTER_FILE = "adapter.onnx_adapter"
MODEL_FILE = "model.onnx"
BASE_META = "base.json"
# bump when the built base changes (a cached base of another version is not reused); 2: int4 keeps a
# GGUF base's own grid; 3: its block sums shared by projections of one input; 4: centred zero points;
# 5: int8 keeps it too
FORMAT_VERSION = 5
_MODULE = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)$")

# The builder's weight-only quantization per --quant, at the CPU kernel's accuracy level 4 (int8
# activations inside MatMulNBits, the builder's CPU default): level 1 (fp32 activations) agreed no
# better on the answer tokens of trained SmolLM2 adapters and decoded 30x slower.  int4 uses k-quant
# and keeps the largest, most output-sensitive matmul (lm_head) in int8.  A base loaded from a 4-bit
# GGUF (the built-in SmolLM2) gets its own file's codes instead, in int4 and int8 alike
# (export/gguf_grid.py): on that base, no int4 that quantized again reached 90% agreement, its own
# grid does; int8 quantized again lost the bar on the quick run's adapter (docs/results.md).
PRECISION = {
    "fp32": ("fp32", {}),
    "int8": ("int8", {"block_size": "32", "accuracy_level": "4", "is_symmetric": "true"}),
    "int4": ("int4", {"block_size": "32", "accuracy_level": "4", "is_symmetric": "true",
                      "algo_config": "k_quant", "matmul_mixed_precision": "last_matmul:int8"}),
}


def _input_names(module: str) -> tuple[str, str]:
    return f"lora.{module}.A", f"lora.{module}.B"


def _node_prefix(module: str) -> str:
    m = _MODULE.match(module)
    if m is None:
        raise ExportError(f"LoRA on '{module}': the ONNX base only takes adapters on a decoder layer's "
                          "attention or MLP projections (layers.N.self_attn.*_proj, layers.N.mlp.*_proj)")
    block = "attn" if m["block"] == "self_attn" else "mlp"
    return f"/model/layers.{m['layer']}/{block}/{m['proj']}/"


def stage_model(model, tokenizer, folder: Path) -> None:
    """The base as a transformers folder the builder reads (the GGUF loader leaves the config's
    ``architectures`` empty; saving the loaded model fills it)."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def run_builder(stage: Path, out: Path, quant: str, tied: bool, log_file: Path, defaults: bool = False) -> None:
    """The builder in a child process (its progress output goes to ``log_file``).  ``defaults``:
    the builder's own options for the precision, as its users run it (``bench/export.py``)."""
    precision, extra = PRECISION[quant]
    opts = {"hf_token": "false"} if defaults else {"fuse_qkv": "false", "hf_token": "false", **extra}
    if tied and not defaults:
        opts["shared_embeddings"] = "true"  # one copy of the tied embedding / lm_head weight
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(stage), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(stage / "builder-cache"),
           "--extra_options", *[f"{k}={v}" for k, v in opts.items()]]
    with open(log_file, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        raise ExportError(f"onnxruntime-genai's model builder failed ({quant}): {' | '.join(tail)} "
                          f"(log: {log_file})")


def add_lora_inputs(model_path: Path, modules: dict[str, tuple[int, int]]) -> None:
    """Hang a LoRA branch with overridable rank-0 factors on each module's base matmul, in place."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(model_path), load_external_data=False)
    g = m.graph
    by_prefix: dict[str, int] = {}  # a matmul node's name prefix -> the index of its first node
    for i, n in enumerate(g.node):
        if n.op_type in ("MatMul", "MatMulNBits"):
            by_prefix.setdefault(n.name.rsplit("/", 1)[0] + "/", i)
    after: dict[int, list] = {}
    for module, (n_in, n_out) in sorted(modules.items()):
        prefix = _node_prefix(module)
        if prefix not in by_prefix:
            raise ExportError(f"LoRA on '{module}': no matmul named {prefix}* in the built model")
        node = g.node[by_prefix[prefix]]
        a_name, b_name = _input_names(module)
        rank = f"r.{module}"
        g.input.extend([helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [n_in, rank]),
                        helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [rank, n_out])])
        g.initializer.extend([helper.make_tensor(a_name, TensorProto.FLOAT, [n_in, 0], []),
                              helper.make_tensor(b_name, TensorProto.FLOAT, [0, n_out], [])])
        base_out = node.output[0]
        node.output[0] = f"{base_out}/base"
        after[by_prefix[prefix]] = [
            helper.make_node("MatMul", [node.input[0], a_name], [f"{prefix}lora_A/output_0"],
                             name=f"{prefix}lora_A/MatMul"),
            helper.make_node("MatMul", [f"{prefix}lora_A/output_0", b_name], [f"{prefix}lora_B/output_0"],
                             name=f"{prefix}lora_B/MatMul"),
            helper.make_node("Add", [node.output[0], f"{prefix}lora_B/output_0"], [base_out],
                             name=f"{prefix}lora/Add"),
        ]
    insert_after(g, after)  # each branch right after its base matmul
    onnx.save(m, str(model_path))



def _tune_config(folder: Path, max_seq_len: int) -> None:
    """Cap the KV cache at the export's ``max_seq_len`` (the builder sizes it to the model's whole
    context, 8192 positions for SmolLM2: 380 MB of cache buffers on a device)."""
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["search"]["max_length"] = max_seq_len
    cfg["model"]["context_length"] = min(cfg["model"].get("context_length", max_seq_len), max_seq_len)
    path.write_text(json.dumps(cfg, indent=4))


def build_base(model, tokenizer, modules: dict[str, tuple[int, int]], out: Path, quant: str,
               max_seq_len: int, log_file: Path | None = None, gguf: Path | None = None,
               log=None) -> tuple[Path, list[str], dict]:
    """Build the KV-cached base with LoRA inputs on ``modules`` into ``out``; returns
    ``(model.onnx, layers left unquantized, how the int4/int8 weights were quantized)``.  ``gguf``: the
    file the base was loaded from; for int4 and int8, its own 4-bit grid is kept where it can be
    (:mod:`fedlora_edge.export.gguf_grid`) instead of quantizing its dequantized weights again.  ``log``: a line
    per stage."""
    log = log or (lambda line: None)
    grid_info: dict = {}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedlora-onnx-") as tmp:
        stage = Path(tmp) / "stage"
        stage_model(model, tokenizer, stage)
        built = Path(tmp) / "built"
        log(f"running onnxruntime-genai's model builder ({quant}; its log: {log_file or out.parent / 'builder.log'})")
        run_builder(stage, built, quant, bool(getattr(model.config, "tie_word_embeddings", False)),
                    log_file or out.parent / "builder.log")
        if quant in ("int4", "int8") and gguf is not None:
            from .gguf_grid import apply_grids, as_int8, read_grids

            log(f"carrying the codes of {gguf.name} into the {quant} matmuls")
            try:
                grids = read_grids(gguf, model.state_dict())
            except (ValueError, OSError, KeyError) as exc:  # a file gguf cannot read: quantize again
                print(f"export: {gguf}: its tensors cannot be read ({exc}); {quant} quantizes the weights again",
                      file=sys.stderr)
                grids = {}
            if quant == "int8":
                grids = {name: as_int8(g) for name, g in grids.items()}
            carried, other = apply_grids(built / MODEL_FILE, grids)
            if carried:
                grid_info = {"grid": "gguf", "grid_tensors": len(carried), "requantized": sorted(other)}
        log(f"adding LoRA inputs to {len(modules)} projections")
        add_lora_inputs(built / MODEL_FILE, modules)
        _tune_config(built, max_seq_len)
        for f in built.iterdir():
            if f.is_file():
                shutil.move(str(f), str(out / f.name))
    import onnx

    g = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    consts = {t.name for t in g.initializer}
    left = [n.name for n in g.node if n.op_type == "MatMul" and quant != "fp32"
            and any(i in consts for i in n.input) and "/lora_" not in n.name and "/grid/" not in n.name]
    return out / MODEL_FILE, left, grid_info


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a base shared by many exports costs its bytes once), else a copy."""
    import os

    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def base_bytes(folder: Path) -> int:
    """Bytes a device downloads for the base: the graph, its weights and the runtime's config."""
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.name.startswith(MODEL_FILE) or p.name == "genai_config.json")


def _intact(folder: Path) -> bool:
    """The cached files are all there with the sizes recorded when the base was built."""
    try:
        sizes = json.loads((folder / BASE_META).read_text()).get("sizes", {})
        return bool(sizes) and all((folder / n).is_file() and (folder / n).stat().st_size == z for n, z in sizes.items())
    except (OSError, ValueError):
        return False


def _set_aside(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        folder.rename(folder.with_name(f".broken-{folder.name}-{time.time_ns()}"))


def _gguf_of(model_spec: str) -> Path | None:
    """The GGUF file a model is loaded from (the built-in SmolLM2, a ``.gguf`` path), else None."""
    from fedlora_edge.core.models import resolve_model

    src = resolve_model(model_spec)
    return Path(src.location) / src.gguf_file if src.gguf_file else None


def _file_digest(*paths: Path) -> str:
    """sha256 over the files' bytes, one after another."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def cached_base(model_spec: str, modules: dict[str, tuple[int, int]], quant: str, max_seq_len: int,
                load, weights: str, log=None) -> tuple[Path, bool]:
    """The built base for these settings from the cache (``FEDLORA_CACHE``, default
    ``~/.cache/fedlora-edge``), building it on a miss; returns ``(folder, reused)``.  ``load``
    gives ``(model, tokenizer)`` of the bare base, called only on a miss; ``weights`` is its
    :func:`fedlora_edge.core.models.weights_digest`.  A folder is complete once renamed into place.
    ``log``: a line per stage."""
    import importlib.util

    from fedlora_edge.core.models import cache_root

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise ExportError("--format onnx needs onnxruntime-genai (pip install '.[export]')")
    import onnx
    import onnxruntime
    import onnxruntime_genai

    gguf = _gguf_of(model_spec) if quant in ("int4", "int8") else None
    key_fields = {"weights": weights, "modules": sorted(f"{m}:{i}x{o}" for m, (i, o) in modules.items()),
                  "gguf": _file_digest(gguf) if gguf is not None else None,
                  "quant": quant, "options": PRECISION[quant][1], "max_seq_len": max_seq_len, "format": FORMAT_VERSION,
                  "builder": onnxruntime_genai.__version__, "onnxruntime": onnxruntime.__version__,
                  "onnx": onnx.__version__}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    root = cache_root() / "onnx-bases"
    folder = root / f"{quant}-{key}"
    log = log or (lambda line: None)
    if (folder / BASE_META).is_file():
        if _intact(folder):
            log(f"the {quant} base: reused from the cache ({folder})")
            return folder, True
        _set_aside(folder)  # sizes differ from what was recorded: build it again
    elif folder.exists():
        _set_aside(folder)  # no base.json: an unfinished or damaged folder
    log(f"building the {quant} base (once per model, quantization, adapted modules and --max-seq-len; then "
        f"cached in {root}): loading the bare base")
    model, tok = load()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{quant}-{key}-", dir=root))
    except OSError as exc:
        raise ExportError(f"cannot write the ONNX base cache in {root}: {exc}") from None
    try:
        _, left, grid = build_base(model, tok, modules, tmp, quant, max_seq_len,
                                   log_file=root / f"{quant}-{key}.builder.log", gguf=gguf, log=log)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / BASE_META).write_text(json.dumps({**key_fields, "model": model_spec, "sha256": base_digest(tmp),
                                                 "unquantized": left, "sizes": sizes, **grid}, indent=1))
        for p in tmp.iterdir():
            p.chmod(0o444)  # exports hard-link these files: a write through a link would change the cache
        try:
            tmp.rename(folder)
        except OSError:  # another process finished the same base first: use theirs
            if not (folder / BASE_META).is_file():
                raise
    except OSError as exc:
        raise ExportError(f"cannot write the ONNX base cache in {root}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, False


def lora_factors(peft_model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module -> (A' [in, r], B' [r, out]) with peft's own scale folded into B', from a loaded
    (unmerged) ``PeftModel``."""
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            module = name.split("base_model.model.", 1)[-1]
            a = mod.lora_A["default"].weight.detach().float()
            b = mod.lora_B["default"].weight.detach().float() * float(mod.scaling["default"])
            out[module] = (a.T.contiguous().numpy(), b.T.contiguous().numpy())
    return out


def write_adapter(factors: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """An ``.onnx_adapter`` file (onnxruntime's adapter format) holding the LoRA inputs."""
    import onnxruntime as ort

    params = {}
    for module, (a, b) in factors.items():
        a_name, b_name = _input_names(module)
        params[a_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        params[b_name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(b, dtype=np.float32))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    tmp = path.with_suffix(".tmp")
    fmt.export_adapter(str(tmp))
    tmp.replace(path)
    return path


def base_digest(folder: Path) -> str:
    """sha256 over the base's files (graph and weights): equal digests, the same base on a device."""
    return _file_digest(*(folder / name for name in sorted(p.name for p in folder.iterdir()
                                                            if p.name.startswith(MODEL_FILE))))


class GenaiRunner:
    """The base and (optionally) an adapter in onnxruntime: ``logits(ids)`` over a whole sequence
    (one pass from an empty cache, for parity) and ``generate`` with onnxruntime-genai's
    ``Generator`` and its KV cache."""

    def __init__(self, folder: Path, adapter: Path | None, threads: int = 0):
        import importlib.util

        import onnxruntime as ort

        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise ArtifactError(f"{folder}: running an ONNX artifact needs onnxruntime-genai (pip install '.[export]')")
        import onnxruntime_genai as og

        self.folder, self.threads = Path(folder), threads
        if adapter is not None and not Path(adapter).is_file():
            raise ArtifactError(f"{adapter}: no such adapter file")
        if adapter is not None:
            self._check_adapter(Path(adapter))
        try:
            cfg = json.loads((self.folder / "genai_config.json").read_text())
            dec = cfg["model"]["decoder"]
            self.layers, self.kv_heads, self.head = dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]
            self.max_length = cfg["search"]["max_length"]
            config = og.Config(str(self.folder))
            # the folder's files are left as they are (a base may be shared by several exports)
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {
                "log_severity_level": 3, **({"intra_op_num_threads": threads} if threads else {})}}}}))
            self.model = og.Model(config)
            self.adapters = None
            if adapter is not None:
                self.adapters = og.Adapters(self.model)
                self.adapters.load(str(adapter), "run")
        except Exception as exc:  # a broken config or model; onnxruntime-genai raises its own error type
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
            raise ArtifactError(f"{self.folder}: onnxruntime-genai cannot load it ({why})") from None
        self._adapter, self._session, self._ort = adapter, None, ort

    def _check_adapter(self, adapter: Path) -> None:
        """The adapter's factors are LoRA inputs of this base with fitting shapes, or ArtifactError."""
        import onnx

        try:
            params = self._ort_adapter_params(adapter)
            graph = onnx.load(str(self.folder / MODEL_FILE), load_external_data=False).graph
        except Exception as exc:  # a file that is not an adapter or not a model: onnxruntime's own errors
            raise ArtifactError(f"{adapter}: cannot be read as an adapter for {self.folder} ({str(exc)[:200]})") from None
        inputs = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                  for i in graph.input if i.name.startswith("lora.")}
        for name, shape in params.items():
            want = inputs.get(name)
            fits = want is not None and len(want) == len(shape) and all(w is None or w == g for w, g in zip(want, shape))
            if not fits:
                raise ArtifactError(f"{adapter}: its factor {name} {list(shape)} is not a LoRA input of the base in "
                                    f"{self.folder} (an adapter for another model or other modules)")

    @staticmethod
    def _ort_adapter_params(adapter: Path) -> dict[str, list[int]]:
        import onnxruntime as ort

        return {k: list(v.shape()) for k, v in ort.AdapterFormat.read_adapter(str(adapter)).get_parameters().items()}

    def _sess(self):
        try:
            return self._open_session()
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"{self.folder}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None

    def _open_session(self):
        if self._session is None:
            so = self._ort.SessionOptions()
            so.log_severity_level = 3  # the LoRA inputs' defaults are meant to be overridable: no warning per input
            if self.threads:
                so.intra_op_num_threads = self.threads
            self._session = self._ort.InferenceSession(str(self.folder / MODEL_FILE), so,
                                                       providers=["CPUExecutionProvider"])
            self._run_opts = self._ort.RunOptions()
            if self._adapter is not None:
                self._lora = self._ort.LoraAdapter()  # held: the run options keep only a pointer to it
                self._lora.Load(str(self._adapter))
                self._run_opts.add_active_adapter(self._lora)
        return self._session

    def logits(self, ids: np.ndarray) -> np.ndarray:
        sess = self._sess()
        ids = np.asarray(ids, dtype=np.int64)
        batch, seq = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64)}
        empty = np.zeros((batch, self.kv_heads, 0, self.head), dtype=np.float32)
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"] = empty
            feeds[f"past_key_values.{i}.value"] = empty
        return sess.run(["logits"], feeds, self._run_opts)[0]

    def generate(self, ids: list[int], max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        length = min(self.max_length, len(ids) + max_new_tokens)
        # eos None: decode all max_new_tokens (the runtime stops at the model's own eos otherwise)
        params.set_search_options(max_length=length, do_sample=False, **({"min_length": length} if eos is None else {}))
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        if self.adapters is not None:
            gen.set_active_adapter(self.adapters, "run")
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        new: list[int] = []
        while len(new) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            tok = int(gen.get_next_tokens()[0])
            if eos is not None and tok == eos:
                break
            new.append(tok)
        return new, time.perf_counter() - t0
