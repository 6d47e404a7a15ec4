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

The builder fuses a layer's q/k/v projections into one matmul ``/model/layers.{i}/attn/qkv_proj/``
(its default: a third of the attention matmuls, and of the nodes around them), and names the others
``/model/layers.{i}/attn/o_proj/...`` and ``/model/layers.{i}/mlp/{gate,up,down}_proj/...``.  A layer
whose q, k or v is adapted gets ONE branch on the fused matmul, inputs ``lora.layers.{i}.attn.qkv.A``
(``[in, r]``) and ``.B`` (``[r, out_q + out_k + out_v]``): :func:`write_adapter` puts the adapted
projections' factors side by side, ``A = [A_q | A_v]`` and ``B`` a block matrix with ``B_q`` in
q's columns, ``B_v`` in v's and zeros elsewhere (each projection its own rank), which is the same
sum as one branch per projection.  Every other adapted projection keeps a branch of its own,
``lora.<module>.A`` / ``.B``.  Where the three cannot be fused (the builder keeps them apart), q, k
and v each get their own branch as the others do.
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
# 5: int8 keeps it too; 6: q/k/v fused with one LoRA branch per layer, int8 on a 4-bit GGUF base built
# as int4 (its own 4-bit grid in 4-bit matmuls)
FORMAT_VERSION = 6
QKV = ("q_proj", "k_proj", "v_proj")
# what the export's meta and parity report say of an int8 base built as int4 (build_base)
INT8_ON_4BIT = "int8 on a 4-bit GGUF base: its own 4-bit grid, kept exact in 4-bit matmuls; lm_head int8"
_MODULE = re.compile(r"^(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)$")

# The builder's weight-only quantization per --quant, at the CPU kernel's accuracy level 4 (int8
# activations inside MatMulNBits, the builder's CPU default): level 1 (fp32 activations) agreed no
# better on the answer tokens of trained SmolLM2 adapters and decoded 30x slower.  int4 uses k-quant
# and keeps the largest, most output-sensitive matmul (lm_head) in int8.  A base loaded from a 4-bit
# GGUF (the built-in SmolLM2) gets its own file's codes instead (export/gguf_grid.py): on that base,
# no int4 that quantized again reached 90% agreement, its own grid does; int8 quantized again lost the
# bar on the quick run's adapter (docs/results.md).  There int8 builds the int4 graph (build_base):
# 8-bit matmuls can hold no more than the file's 4-bit codes, and measured slower and noisier
# (SmolLM2, 1 thread: 11.4 against 9.1 ms/token; KL to PyTorch 0.0053 against 0.0036 on the base).
PRECISION = {
    "fp32": ("fp32", {}),
    "int8": ("int8", {"block_size": "32", "accuracy_level": "4", "is_symmetric": "true"}),
    "int4": ("int4", {"block_size": "32", "accuracy_level": "4", "is_symmetric": "true",
                      "algo_config": "k_quant", "matmul_mixed_precision": "last_matmul:int8"}),
}


def _input_names(stem: str) -> tuple[str, str]:
    return f"lora.{stem}.A", f"lora.{stem}.B"


def _node_prefix(module: str) -> str:
    m = _MODULE.match(module)
    if m is None:
        raise ExportError(f"LoRA on '{module}': the ONNX base only takes adapters on a decoder layer's "
                          "attention or MLP projections (layers.N.self_attn.*_proj, layers.N.mlp.*_proj)")
    block = "attn" if m["block"] == "self_attn" else "mlp"
    return f"/model/layers.{m['layer']}/{block}/{m['proj']}/"


def _fused_stem(module: str) -> tuple[str, str] | None:
    """``(input stem, node prefix)`` of the fused q/k/v matmul that ``module`` (a q, k or v
    projection) is a part of, else None."""
    m = _MODULE.match(module)
    if m is None or m["block"] != "self_attn" or m["proj"] not in QKV:
        return None
    return f"layers.{m['layer']}.attn.qkv", f"/model/layers.{m['layer']}/attn/qkv_proj/"
def stage_model(model, tokenizer, folder: Path) -> None:
    """The base as a transformers folder the builder reads (the GGUF loader leaves the config's
    ``architectures`` empty; saving the loaded model fills it)."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def run_builder(stage: Path, out: Path, quant: str, tied: bool, log_file: Path, defaults: bool = False) -> None:
    """The builder in a child process (its progress output goes to ``log_file``).  ``defaults``:
    the builder's own options for the precision, as its users run it (``bench/export.py``).  q/k/v are
    fused either way (the builder's default)."""
    precision, extra = PRECISION[quant]
    opts = {"hf_token": "false"} if defaults else {"hf_token": "false", **extra}
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


def add_lora_inputs(model_path: Path, modules: dict[str, tuple[int, int]],
                    qkv: tuple[int, int, int] | None = None) -> dict[str, dict]:
    """Hang a LoRA branch with overridable rank-0 factors on each adapted projection's base matmul,
    in place: one per layer on the fused q/k/v matmul for its adapted q/k/v (``qkv``: their output
    widths, in that order), one per other module.  Returns the branches, ``{input stem: {"in": n,
    "out": m, "columns": {module: [start, end]}}}``, what :func:`write_adapter` lays the factors out by."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(model_path), load_external_data=False)
    g = m.graph
    by_prefix: dict[str, int] = {}  # a matmul node's name prefix -> the index of its first node
    for i, n in enumerate(g.node):
        if n.op_type in ("MatMul", "MatMulNBits"):
            by_prefix.setdefault(n.name.rsplit("/", 1)[0] + "/", i)
    branches: dict[str, dict] = {}
    prefixes: dict[str, str] = {}
    for module, (n_in, n_out) in sorted(modules.items()):
        fused = _fused_stem(module)
        if fused is not None and fused[1] in by_prefix:
            stem, prefix = fused
            if qkv is None:
                raise ExportError(f"LoRA on '{module}': the built model fuses q/k/v and their widths were not given")
            if stem not in branches:
                head = module.rsplit(".", 1)[0]
                edges = np.cumsum([0, *qkv]).tolist()
                branches[stem] = {"in": n_in, "out": int(edges[-1]),
                                  "columns": {f"{head}.{p}": [edges[j], edges[j + 1]] for j, p in enumerate(QKV)}}
                prefixes[stem] = prefix
            lo, hi = branches[stem]["columns"][module]
            if (n_in, n_out) != (branches[stem]["in"], hi - lo):
                raise ExportError(f"LoRA on '{module}' ({n_in} -> {n_out}): not its part of the fused q/k/v "
                                  f"matmul ({branches[stem]['in']} -> {hi - lo})")
            continue
        prefix = _node_prefix(module)
        if prefix not in by_prefix:
            raise ExportError(f"LoRA on '{module}': no matmul named {prefix}* in the built model")
        branches[module] = {"in": n_in, "out": n_out, "columns": {module: [0, n_out]}}
        prefixes[module] = prefix
    after: dict[int, list] = {}
    for stem, branch in branches.items():
        prefix = prefixes[stem]
        node = g.node[by_prefix[prefix]]
        width = {a.name: a.i for a in node.attribute}.get("N", branch["out"])  # MatMulNBits says its output width
        if width != branch["out"]:
            raise ExportError(f"LoRA on {prefix}: the built matmul has {width} outputs, the projections {branch['out']}")
        a_name, b_name = _input_names(stem)
        rank = f"r.{stem}"
        n_in, n_out = branch["in"], branch["out"]
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
    return branches


def qkv_widths(model) -> tuple[int, int, int] | None:
    """The output widths of a decoder layer's q, k and v projections (the same in every layer of the
    llama-family models the builder takes), or None where the model has none."""
    widths = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in QKV and leaf not in widths and hasattr(mod, "out_features"):
            widths[leaf] = int(mod.out_features)
    return (widths["q_proj"], widths["k_proj"], widths["v_proj"]) if len(widths) == 3 else None


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
    ``(model.onnx, layers left unquantized, fields for base.json)``: how the int4/int8 weights were
    quantized (``grid``, ``grid_tensors``, ``requantized``, ``weights_note``) and the LoRA branches
    (``lora``: :func:`add_lora_inputs`).  ``gguf``: the file the base was loaded from; for int4 and
    int8, its own 4-bit grid is kept where it can be (:mod:`fedlora_edge.export.gguf_grid`) instead of
    quantizing its dequantized weights again, q|k|v concatenated for the fused matmul.  On a base whose
    every decoder projection has a 4-bit grid, int8 builds the int4 graph (the file's codes in 4-bit
    matmuls, lm_head int8): an 8-bit container holds no more of those codes, and its kernel was slower
    and noisier.  ``log``: a line per stage."""
    log = log or (lambda line: None)
    info: dict = {}
    out.mkdir(parents=True, exist_ok=True)
    grids: dict = {}
    if quant in ("int4", "int8") and gguf is not None:
        from .gguf_grid import read_grids

        try:
            grids = read_grids(gguf, model.state_dict())
        except (ValueError, OSError, KeyError) as exc:  # a file gguf cannot read: quantize again
            print(f"export: {gguf}: its tensors cannot be read ({exc}); {quant} quantizes the weights again",
                  file=sys.stderr)
    build = quant
    if quant == "int8" and grids:
        from .gguf_grid import decoder_on_4bit

        if decoder_on_4bit(grids, model.state_dict()):
            build = "int4"
            info["weights_note"] = INT8_ON_4BIT
    with tempfile.TemporaryDirectory(prefix="fedlora-onnx-") as tmp:
        stage = Path(tmp) / "stage"
        stage_model(model, tokenizer, stage)
        built = Path(tmp) / "built"
        log(f"running onnxruntime-genai's model builder ({build}"
            f"{f' for --quant {quant}: the GGUF file is 4-bit' if build != quant else ''}; "
            f"its log: {log_file or out.parent / 'builder.log'})")
        run_builder(stage, built, build, bool(getattr(model.config, "tie_word_embeddings", False)),
                    log_file or out.parent / "builder.log")
        if grids:
            from .gguf_grid import apply_grids, as_int8, fuse_qkv

            log(f"carrying the codes of {gguf.name if gguf else 'the GGUF file'} into the {build} matmuls")
            if build == "int8":
                grids = {name: as_int8(g) for name, g in grids.items()}
            carried, other = apply_grids(built / MODEL_FILE, fuse_qkv(grids))
            if carried:
                info.update(grid="gguf", grid_tensors=len(carried), requantized=sorted(other))
            else:
                info.pop("weights_note", None)
        log(f"adding LoRA inputs to {len(modules)} projections")
        info["lora"] = add_lora_inputs(built / MODEL_FILE, modules, qkv_widths(model))
        _tune_config(built, max_seq_len)
        for f in built.iterdir():
            if f.is_file():
                shutil.move(str(f), str(out / f.name))
    import onnx

    g = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    consts = {t.name for t in g.initializer}
    left = [n.name for n in g.node if n.op_type == "MatMul" and quant != "fp32"
            and any(i in consts for i in n.input) and "/lora_" not in n.name and "/grid/" not in n.name]
    return out / MODEL_FILE, left, info


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
    # int8 on a 4-bit GGUF may build the int4 graph: both precisions' options are part of what it is
    options = {q: PRECISION[q][1] for q in ("int8", "int4")} if quant == "int8" and gguf else PRECISION[quant][1]
    key_fields = {"weights": weights, "modules": sorted(f"{m}:{i}x{o}" for m, (i, o) in modules.items()),
                  "gguf": _file_digest(gguf) if gguf is not None else None,
                  "quant": quant, "options": options, "max_seq_len": max_seq_len, "format": FORMAT_VERSION,
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
        _, left, info = build_base(model, tok, modules, tmp, quant, max_seq_len,
                                   log_file=root / f"{quant}-{key}.builder.log", gguf=gguf, log=log)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / BASE_META).write_text(json.dumps({**key_fields, "model": model_spec, "sha256": base_digest(tmp),
                                                 "unquantized": left, "sizes": sizes, **info}, indent=1))
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


def write_adapter(factors: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                  branches: dict[str, dict] | None = None) -> Path:
    """An ``.onnx_adapter`` file (onnxruntime's adapter format) holding the LoRA inputs.  ``branches``:
    the base's (:func:`add_lora_inputs`, ``base.json``'s ``lora``); the factors of the modules that
    share one branch go side by side, ``A = [A_1 | A_2 ...]`` (``[in, r_1 + r_2 ...]``) and ``B`` the
    block matrix with each ``B_j`` in its module's columns and zeros elsewhere (a projection without
    LoRA: none of the rank, zero columns), so ``x·A·B = Σ_j x·A_j·B_j`` placed in each module's
    columns.  A module in no branch (or no ``branches``) keeps inputs of its own name, which a base
    without them refuses at load."""
    import onnxruntime as ort

    owner = {module: (stem, cols) for stem, b in (branches or {}).items() for module, cols in b["columns"].items()}
    arrays: dict[str, np.ndarray] = {}
    shared: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for module, (a, b) in sorted(factors.items()):
        a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
        if module in owner:
            shared.setdefault(owner[module][0], []).append((module, a, b))
        else:
            a_name, b_name = _input_names(module)
            arrays[a_name], arrays[b_name] = a, b
    for stem, parts in shared.items():
        branch = (branches or {})[stem]
        rank = sum(a.shape[1] for _, a, _ in parts)
        a_cat = np.zeros((branch["in"], rank), dtype=np.float32)
        b_block = np.zeros((rank, branch["out"]), dtype=np.float32)
        r0 = 0
        for module, a, b in sorted(parts, key=lambda part: branch["columns"][part[0]][0]):
            lo, hi = branch["columns"][module]
            if a.shape[0] != branch["in"] or b.shape != (a.shape[1], hi - lo):
                raise ExportError(f"LoRA on '{module}': factors {list(a.shape)} x {list(b.shape)} do not fit its "
                                  f"branch ({branch['in']} -> {hi - lo})")
            a_cat[:, r0:r0 + a.shape[1]] = a
            b_block[r0:r0 + a.shape[1], lo:hi] = b
            r0 += a.shape[1]
        arrays.update(zip(_input_names(stem), (a_cat, b_block)))
    params = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x)) for name, x in arrays.items()}
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
        """The adapter's factors are LoRA inputs of this base with fitting shapes, both factors of
        each branch given, the rank they share the same in both; or ArtifactError."""
        import onnx

        try:
            params = self._ort_adapter_params(adapter)
            graph = onnx.load(str(self.folder / MODEL_FILE), load_external_data=False).graph
        except Exception as exc:  # a file that is not an adapter or not a model: onnxruntime's own errors
            raise ArtifactError(f"{adapter}: cannot be read as an adapter for {self.folder} ({str(exc)[:200]})") from None
        inputs = {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                           for d in i.type.tensor_type.shape.dim]
                  for i in graph.input if i.name.startswith("lora.")}
        fused = any(".attn.qkv." in name for name in inputs)
        ranks: dict[str, int] = {}
        for name, shape in params.items():
            want = inputs.get(name)
            fits = want is not None and len(want) == len(shape) and all(
                w is None or isinstance(w, str) or w == g for w, g in zip(want, shape))
            if not fits:
                old = fused and name not in inputs and any(f".self_attn.{p}." in name for p in QKV)
                hint = (" (an adapter written for a base with q/k/v apart: this base fuses them, one branch "
                        "lora.layers.N.attn.qkv.{A,B} per layer; export it again)" if old else
                        " (an adapter for another model or other modules)")
                raise ArtifactError(f"{adapter}: its factor {name} {list(shape)} is not a LoRA input of the base in "
                                    f"{self.folder}{hint}")
            for w, got in zip(want or [], shape):
                if isinstance(w, str) and ranks.setdefault(w, got) != got:
                    raise ArtifactError(f"{adapter}: its factors of one branch disagree on their rank {w} "
                                        f"({ranks[w]} and {got})")
        for name in params:
            stem, factor = name.rsplit(".", 1)
            other = f"{stem}.{'B' if factor == 'A' else 'A'}"
            if factor in ("A", "B") and other not in params:
                raise ArtifactError(f"{adapter}: it gives {name} without {other}")

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
