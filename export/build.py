"""Write an inference artifact with a KV cache for an edge runtime, from a base and an adapter.

- ONNX (``fedlora_edge.export.onnx_genai``): the base built by onnxruntime-genai's model builder, the adapter
  a separate file that onnxruntime applies at run time (a device keeps the base and receives only
  the adapter after a run).
- ExecuTorch: a ``.pte`` lowered to XNNPACK whose forward keeps a static KV cache
  (:class:`KVCacheLM`) and runs the adapter's LoRA branches beside the base's layers, with the base's
  weights in a separate ``base.<quant>.ptd`` (ExecuTorch's program-data separation).  The ``.pte`` is
  the program and the adapter (kilobytes to a few MB); the ``.ptd`` is the same bytes for every
  adapter of one base and quantization, so a device keeps it and downloads only the ``.pte``.

The recipes were measured on the pinned versions of the ``export`` extra (pyproject.toml):
quantization for ExecuTorch goes through torchao's ``quantize_`` (the PT2E quantizer breaks on the
causal-mask code), and 8da4w skips linear layers whose input size is not a multiple of its group size.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ExportError

FORMATS = {"onnx": ("fp32", "int8", "int4"), "executorch": ("fp32", "8da8w", "8da4w")}
GROUP = 32  # 8da8w / 8da4w weight group size


def check_format(fmt: str, quant: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown format '{fmt}'; formats: {', '.join(FORMATS)}")
    if quant not in FORMATS[fmt]:
        raise ExportError(f"--quant: '{quant}' is not available for {fmt}; {fmt} takes {', '.join(FORMATS[fmt])}")


def system_prompt_of(adapter) -> str | None:
    """The system prompt the adapter's run trained with: ``system_prompt`` in its ``fedlora.json``,
    where a run records its examples' own (the built-in tasks' for them; null: none).  The run's
    ``report.json`` (``RUN/adapter``, ``RUN/clients/<id>/adapter``, ``RUN/checkpoints/<round>``) decides a
    null written before runs recorded the built-in tasks' prompt: a run on the built-in tasks trained
    with it.  The base alone, or a folder without ``fedlora.json``: the built-in tasks' prompt."""
    from fedlora_edge.core.data import SYSTEM_PROMPT
    from fedlora_edge.core.models import adapter_sidecar

    side = adapter_sidecar(adapter) if adapter is not None else {}
    if "system_prompt" not in side:
        return SYSTEM_PROMPT
    if side["system_prompt"] is not None:
        return side["system_prompt"]
    folder = Path(adapter).resolve()
    for run in (folder.parent, *folder.parents[1:3]):
        try:
            data = json.loads((run / "report.json").read_text())["config"]["data"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        builtin = isinstance(data, dict) and not any(data.get(k) for k in ("train_file", "train_dir", "dataset"))
        return SYSTEM_PROMPT if builtin else None
    return None


def _with_adapter(model_spec: str, adapter: str | Path | None):
    """``(model, tokenizer)``: the base with the peft adapter in ``adapter`` loaded on it (not merged)."""
    from fedlora_edge.core.models import load_model

    model, tok = load_model(model_spec)
    if adapter is None:
        return model, tok
    folder = Path(adapter)
    if (folder / "mixture.json").is_file() or (folder / "model" / "mixture.json").is_file():
        raise ExportError(f"{folder}: a FedLEASE client model routes between experts per token; it cannot be "
                         "merged into the base weights (export a plain LoRA adapter folder)")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise ExportError(f"--adapter {folder}: no {name} (expected a peft adapter folder, e.g. RUN/adapter)")
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder)), tok
    except (RuntimeError, ValueError, KeyError) as exc:
        from fedlora_edge.core.models import adapter_base

        trained_on = adapter_base(folder)
        hint = (f"it was trained on {trained_on} (its fedlora.json or adapter_config.json), not on {model_spec}; "
                f"give --model {trained_on} or leave --model out" if trained_on and trained_on != model_spec
                else f"it does not fit {model_spec}")
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"--adapter {folder}: cannot be loaded onto --model {model_spec}: {hint} ({first})") from None


def merged_model(model_spec: str, adapter: str | Path | None = None):
    """``(model, tokenizer)``: the base with the adapter in ``adapter`` (a peft folder, as
    ``simulate`` writes under ``adapter/`` and ``clients/<id>/adapter/``) merged into its weights."""
    model, tok = _with_adapter(model_spec, adapter)
    return _merged(model), tok


def _merged(peft_or_base):
    """The reference an artifact must match: a peft model's adapter merged into its fp32 base (a
    bare base as it is), without transformers' cache, in eval mode."""
    from peft import PeftModel

    model = peft_or_base.merge_and_unload() if isinstance(peft_or_base, PeftModel) else peft_or_base
    model.config.use_cache = False
    return model.eval()


def quantize_linears(model, quant: str) -> list[str]:
    """Apply torchao's 8da8w (int8 weights per output channel: XNNPACK takes groups only for
    4-bit weights) or 8da4w (int4 weights in groups of 32 along the input), with int8 dynamic
    activations, to the linear layers in place; returns the names of the linear layers left in
    fp32: the output head (the most output-sensitive matmul, docs/results.md) and, for 8da4w, any
    whose input size is not a multiple of the group.  An unmerged adapter's LoRA factors (peft's
    ``lora_A``/``lora_B``) stay in fp32 and are not listed: they are the adapter, not the base."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quant == "8da8w":
        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    else:
        # torch.int4 exists (a sub-byte dtype for torchao's configs) but torch's stubs leave it out
        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,  # type: ignore[attr-defined]
                                                    weight_granularity=PerGroup(GROUP))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    def take(mod, fqn):
        return (isinstance(mod, torch.nn.Linear) and mod is not head and not _is_lora(fqn)
                and (quant == "8da8w" or mod.in_features % GROUP == 0))

    skipped = [name for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and not _is_lora(name) and not take(mod, name)]
    quantize_(model, cfg, filter_fn=take)
    return skipped


def _is_lora(name: str) -> bool:
    """A peft LoRA factor's module, parameter or graph constant (``...q_proj.lora_A.default...``)."""
    return "lora_" in name.lower()


BASE_TAG = "base"  # the constants ExecuTorch writes to the base's .ptd (everything but the LoRA factors)


def _base_constant(node) -> str | None:
    return None if _is_lora(str(node.target)) else BASE_TAG


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class KVCacheLM(torch.nn.Module):
    """A Llama-architecture causal LM with a static KV cache, for ExecuTorch:
    ``forward(input_ids [1, S], cache_position [S]) -> logits [1, S, vocab]``, any ``S`` up to
    ``max_len``.  The model's own modules (embedding, norms, projections, MLPs, rotary embedding,
    head) are reused; only attention is written out, to keep one K and one V buffer per layer
    (``[1, kv_heads, max_len, head_dim]``) that ``index_copy_`` fills at ``cache_position``.
    ExecuTorch keeps them as mutable buffers across calls of one loaded method.  Attention runs over
    the whole fixed-size cache with key ``j`` visible to query ``i`` iff ``j <= cache_position[i]``,
    so a new prompt restarts at position 0 and what an earlier one left is never read."""

    key_pos: torch.Tensor  # a buffer (register_buffer), 0 .. max_len - 1

    def __init__(self, model, max_len: int):
        super().__init__()
        cfg, inner = model.config, model.model
        self.embed_tokens, self.layers, self.norm = inner.embed_tokens, inner.layers, inner.norm
        self.rotary_emb, self.lm_head = inner.rotary_emb, model.lm_head
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_len = max_len
        dt = next(model.parameters()).dtype
        for i in range(len(self.layers)):
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, self.n_kv, max_len, self.hd, dtype=dt), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, self.n_kv, max_len, self.hd, dtype=dt), persistent=False)
        self.register_buffer("key_pos", torch.arange(max_len), persistent=False)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        s = input_ids.shape[1]
        cos, sin = self.rotary_emb(x, cache_position.unsqueeze(0))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        visible = self.key_pos.unsqueeze(0) <= cache_position.unsqueeze(1)
        mask = torch.where(visible, 0.0, float("-inf")).to(x.dtype)
        group = self.n_heads // self.n_kv
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            h = layer.input_layernorm(x)
            q = att.q_proj(h).view(1, s, self.n_heads, self.hd).transpose(1, 2)
            k = att.k_proj(h).view(1, s, self.n_kv, self.hd).transpose(1, 2)
            v = att.v_proj(h).view(1, s, self.n_kv, self.hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = getattr(self, f"k_cache_{i}"), getattr(self, f"v_cache_{i}")
            kc.index_copy_(2, cache_position, k)
            vc.index_copy_(2, cache_position, v)
            if group > 1:
                shape = (1, self.n_kv, group, self.max_len, self.hd)
                kk = kc.unsqueeze(2).expand(shape).reshape(1, self.n_heads, self.max_len, self.hd)
                vv = vc.unsqueeze(2).expand(shape).reshape(1, self.n_heads, self.max_len, self.hd)
            else:
                kk, vv = kc, vc
            o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=att.scaling)
            x = x + att.o_proj(o.transpose(1, 2).reshape(1, s, self.n_heads * self.hd))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x))


KV_ARCHITECTURES = ("llama", "mistral")  # q/k/v/o projections, rotary embedding, no attention extras


def export_executorch(model, out: Path, quant: str, max_seq_len: int,
                      log: Callable[[str], None] | None = None) -> tuple[Path, list[str], dict]:
    """``model.<quant>.pte`` lowered to XNNPACK with a static KV cache of ``max_seq_len`` positions
    (:class:`KVCacheLM`), batch 1, dynamic length, and ``base.<quant>.ptd`` beside it.  ``model`` is
    the base, with an unmerged peft adapter on it or none.  The base's weights (every constant but
    the LoRA factors, delegated or not) are tagged into the ``.ptd``; the program and the LoRA factors
    stay in the ``.pte``.  The caches' zero start is written into the program (else ExecuTorch leaves
    mutated buffers uninitialised, and a NaN there passes a masked softmax as 0 x NaN), and updated
    in place (no copy of the cache per call).  ``log``: a line per stage.  Returns ``(pte,
    unquantized layers, meta fields)``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass
    from torch.export import Dim

    from fedlora_edge.core.durable import sha256_file

    kind = getattr(model.config, "model_type", "")
    if kind not in KV_ARCHITECTURES:
        raise ExportError(f"--format executorch: the KV-cached program is written for {', '.join(KV_ARCHITECTURES)} "
                          f"models; this one is '{kind}' (use --format onnx)")
    log = log or (lambda line: None)
    skipped = []
    if quant != "fp32":
        from torchao.utils import unwrap_tensor_subclass

        log(f"quantizing the base's linear layers ({quant}, torchao)")
        skipped = quantize_linears(model, quant)
        # plain tensors (int weights, scales) as parametrizations, so that each can be tagged for the .ptd
        unwrap_tensor_subclass(model)
    wrapped = KVCacheLM(model, max_seq_len).eval()
    seq = Dim("seq", min=1, max=max_seq_len)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.arange(4))
    dynamic = {"input_ids": {1: seq}, "cache_position": {0: seq}}
    log(f"exporting the program with a KV cache of {max_seq_len} positions (torch.export)")
    with torch.no_grad():
        # the delegate's constants are tagged on the unlifted graph (get_attr nodes), which is then exported again
        unlifted = torch.export.export(wrapped, example, dynamic_shapes=dynamic, strict=False).module()
        delegate_external_constants_pass_unlifted(unlifted, _base_constant)
        ep = torch.export.export(unlifted, example, dynamic_shapes=dynamic, strict=False)
        log("lowering to XNNPACK and to an ExecuTorch program (the longest stage: minutes for SmolLM2)")
        program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch(
            ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])],
                                    run_reinplace_pass=True, external_constants=_base_constant))
    path, base = out / f"model.{quant}.pte", out / f"base.{quant}.ptd"
    log(f"writing {path.name} and {base.name}")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        program.write_tensor_data_to_file(tmp)
        written = Path(tmp) / f"{BASE_TAG}.ptd"
        if not written.is_file():
            raise ExportError(f"--format executorch: the installed ExecuTorch wrote no {BASE_TAG}.ptd "
                              f"(it wrote {sorted(p.name for p in Path(tmp).iterdir())})")
        _replace(written, base)
        (Path(tmp) / path.name).write_bytes(program.buffer)
        _replace(Path(tmp) / path.name, path)
    fields = {"base_file": base.name, "base_bytes": base.stat().st_size, "base_sha256": sha256_file(base),
              "adapter_file": path.name, "adapter_bytes": path.stat().st_size}
    return path, skipped, fields


def _replace(src: Path, dst: Path) -> None:
    """``src`` fsynced and renamed over ``dst`` (what was there stays until the rename)."""
    from fedlora_edge.core.durable import fsync_dir

    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    fsync_dir(dst.parent)


def _onnx(model_spec: str, adapter: str | Path | None, out: Path, quant: str, max_seq_len: int, log):
    """The KV-cached ONNX base (built once per model, adapted modules, quant and length, and cached)
    and the adapter file beside it; returns ``(model.onnx, unquantized layers, meta fields, merged
    reference, tokenizer)``."""
    from fedlora_edge.core.lora import adapted_modules
    from fedlora_edge.core.models import default_target_modules, load_model, weights_digest

    from . import onnx_genai

    peft_or_base, tok = _with_adapter(model_spec, adapter)
    factors = onnx_genai.lora_factors(peft_or_base) if adapter is not None else None
    modules = ({m: (a.shape[0], b.shape[1]) for m, (a, b) in factors.items()} if factors is not None
               else adapted_modules(peft_or_base, default_target_modules(peft_or_base)))
    base_dir, cached = onnx_genai.cached_base(model_spec, modules, quant, max_seq_len,
                                              lambda: load_model(model_spec),
                                              weights_digest(peft_or_base, tok), log=log)
    for f in base_dir.iterdir():
        if f.name.startswith(onnx_genai.MODEL_FILE):
            onnx_genai.link_or_copy(f, out / f.name)
        elif f.is_file() and f.name != onnx_genai.BASE_META:  # small files: copies of the export's own
            (out / f.name).unlink(missing_ok=True)
            shutil.copyfile(f, out / f.name)
    base_meta = json.loads((base_dir / onnx_genai.BASE_META).read_text())
    fields = {"base_sha256": base_meta["sha256"], "base_bytes": onnx_genai.base_bytes(out), "base_reused": cached,
              "adapted_modules": len(modules)}
    if base_meta.get("grid"):  # int4 or int8 from a 4-bit GGUF: the file's own codes (export/gguf_grid.py)
        fields.update(weights_grid=base_meta["grid"], grid_tensors=base_meta["grid_tensors"],
                      requantized_tensors=base_meta["requantized"])
    if base_meta.get("weights_note"):  # int8 on a 4-bit GGUF: the int4 graph (onnx_genai.build_base)
        fields.update(weights_note=base_meta["weights_note"])
    adapter_file = out / onnx_genai.ADAPTER_FILE
    adapter_file.unlink(missing_ok=True)
    if factors is not None:  # an adapter was given
        log(f"writing the adapter apart: {adapter_file.name} (onnxruntime's adapter format, fp32)")
        onnx_genai.write_adapter(factors, adapter_file, base_meta.get("lora"))  # q/k/v: one fused branch per layer
        fields.update(adapter_file=adapter_file.name, adapter_bytes=adapter_file.stat().st_size)
    skipped = base_meta["unquantized"]
    return out / onnx_genai.MODEL_FILE, skipped, fields, _merged(peft_or_base), tok


def _onnx_merged(model_spec: str, adapter: str | Path | None, out: Path, quant: str, max_seq_len: int, log):
    """The adapter merged into the base's weights, then built (and quantized) as one model by
    onnxruntime-genai's builder with this export's settings: no LoRA branch and no adapter file,
    for a device that never swaps adapters.  Built afresh for every adapter (no cached base); a
    4-bit GGUF base's own codes cannot be kept, since merging changes every adapted weight."""
    from . import onnx_genai

    reference, tok = merged_model(model_spec, adapter)
    for f in [*out.glob(onnx_genai.MODEL_FILE + "*"), out / onnx_genai.ADAPTER_FILE]:
        f.unlink(missing_ok=True)  # an earlier export's base or adapter in this folder
    with tempfile.TemporaryDirectory(prefix="fedlora-merged-", dir=out) as tmp:
        model_path, left, _ = onnx_genai.build_base(reference, tok, {}, Path(tmp), quant, max_seq_len,
                                                   log_file=out / "builder.log", gguf=None, log=log)
        for f in Path(tmp).iterdir():
            if f.is_file():
                _replace(f, out / f.name)
    fields = {"merged": True, "base_bytes": onnx_genai.base_bytes(out), "adapted_modules": 0}
    return out / onnx_genai.MODEL_FILE, left, fields, reference, tok


def export(model_spec: str, adapter: str | Path | None, fmt: str, quant: str, out: str | Path,
           max_seq_len: int = 256, log: Callable[[str], None] | None = None,
           merged: bool = False) -> tuple[Path, dict, object, object]:
    """Export; writes the artifact, the tokenizer and ``export.json`` under ``out``.  Returns
    ``(artifact, meta, reference model, tokenizer)``; the reference is the base with the adapter
    merged, in fp32 (what the artifact must match).

    ONNX: the base (KV cache, weight-only quantization) and the adapter as a separate
    ``adapter.onnx_adapter`` that onnxruntime applies at run time.  ExecuTorch: the program with a
    static KV cache and the adapter's LoRA branches in ``model.<quant>.pte``, the base's weights in
    ``base.<quant>.ptd``.  ``merged`` (ONNX): the adapter merged into the base's weights and built as
    one model instead (:func:`_onnx_merged`).  ``log``: a line per stage, each with the seconds since the start."""
    check_format(fmt, quant)
    if merged and fmt != "onnx":
        raise ExportError("--merged is for --format onnx (an ExecuTorch program keeps its adapter apart)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def stage(line: str) -> None:
        if log is not None:
            log(f"export: {line} ({time.perf_counter() - t0:.0f} s)")

    stage(f"loading {model_spec}" + (f" with the adapter {adapter}" if adapter is not None else ""))
    extra: dict = {}
    if fmt == "onnx" and merged:
        artifact, skipped, extra, reference, tok = _onnx_merged(model_spec, adapter, out, quant, max_seq_len, stage)
    elif fmt == "onnx":
        artifact, skipped, extra, reference, tok = _onnx(model_spec, adapter, out, quant, max_seq_len, stage)
    else:
        peft_or_base, tok = _with_adapter(model_spec, adapter)
        # the program is built from a copy (torchao quantizes in place, the wrapper takes its modules);
        # the reference is the adapter merged into the fp32 base
        model = copy.deepcopy(peft_or_base.get_base_model() if adapter is not None else peft_or_base)
        model.config.use_cache = False
        artifact, skipped, extra = export_executorch(model.eval(), out, quant, max_seq_len, stage)
        reference = _merged(peft_or_base)
    tok.save_pretrained(str(out / "tokenizer"))
    meta = {"format": fmt, "quant": quant, "artifact": artifact.name, "base_model": model_spec,
            "adapter": str(adapter) if adapter else None, "tokenizer": "tokenizer", "max_seq_len": max_seq_len,
            "skipped_layers": skipped, "system_prompt": system_prompt_of(adapter), **extra}
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    stage(f"wrote {artifact}")
    return artifact, meta, reference, tok
