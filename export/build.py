"""Merge an adapter into its base and write an inference artifact for an edge runtime.

The recipes and their workarounds were measured on the pinned versions of the ``export`` extra
(pyproject.toml): the ONNX export uses an example batch of 2 (a batch of 1 specialises the batch
dimension to 1); quantization for ExecuTorch goes through torchao's ``quantize_`` (the PT2E
quantizer breaks on the causal-mask code), and 8da4w skips linear layers whose input size is not
a multiple of its group size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .runners import ExportError, LogitsOnly

FORMATS = {"onnx": ("fp32", "int8", "int4"), "executorch": ("fp32", "8da8w", "8da4w")}
GROUP = 32  # 8da4w weight group size
ONNX_BLOCK = 32  # MatMulNBits block size of the weight-only ONNX formats (as onnxruntime-genai's builder)


def check_format(fmt: str, quant: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown format '{fmt}'; formats: {', '.join(FORMATS)}")
    if quant not in FORMATS[fmt]:
        raise ExportError(f"--quant: '{quant}' is not available for {fmt}; {fmt} takes {', '.join(FORMATS[fmt])}")


def _system_prompt_of(adapter) -> str | None:
    """The system prompt the adapter's run trained with (its ``fedlora.json``); the built-in
    tasks' for the base alone or an adapter that does not say."""
    from edge_client.data import SYSTEM_PROMPT
    from edge_client.models import adapter_sidecar

    side = adapter_sidecar(adapter) if adapter is not None else {}
    return side.get("system_prompt", SYSTEM_PROMPT)


def merged_model(model_spec: str, adapter: str | Path | None = None):
    """``(model, tokenizer)``: the base with the adapter in ``adapter`` (a peft folder, as
    ``simulate`` writes under ``adapter/`` and ``clients/<id>/adapter/``) merged into its weights."""
    from edge_client.models import load_model

    model, tok = load_model(model_spec)
    if adapter is not None:
        folder = Path(adapter)
        if (folder / "mixture.json").is_file() or (folder / "model" / "mixture.json").is_file():
            raise ExportError(f"{folder}: a FedLEASE client model routes between experts per token; it cannot be "
                             "merged into the base weights (export a plain LoRA adapter folder)")
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / name).is_file():
                raise ExportError(f"--adapter {folder}: no {name} (expected a peft adapter folder, e.g. RUN/adapter)")
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as exc:
            from edge_client.models import adapter_base

            trained_on = adapter_base(folder)
            hint = (f"it was trained on {trained_on} (its fedlora.json or adapter_config.json), not on {model_spec}; "
                    f"give --model {trained_on} or leave --model out" if trained_on and trained_on != model_spec
                    else f"it does not fit {model_spec}")
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ExportError(f"--adapter {folder}: cannot be loaded onto --model {model_spec}: {hint} ({first})") from None
    model.config.use_cache = False
    return model.eval(), tok


def export_onnx(model, out: Path, quant: str, max_seq_len: int) -> tuple[Path, list[str]]:
    """``model.onnx`` (fp32), or ``model.int8.onnx`` / ``model.int4.onnx``: weight-only
    quantization of every MatMul with a constant weight to onnxruntime's ``MatMulNBits`` (8 or 4
    bits, symmetric, blocks of 32 along the input; activations stay fp32).  Dynamic int8
    (``MatMulInteger``, activations quantized per tensor on the fly) was the earlier int8 and held
    0.61 top-1 agreement on SmolLM2; weight-only int8 holds where that broke (docs/results.md)."""
    from torch.export import Dim

    vocab = model.config.vocab_size
    path = out / "model.onnx"
    example = torch.randint(0, vocab, (2, 8))
    torch.onnx.export(LogitsOnly(model).eval(), (example,), str(path), dynamo=True, input_names=["input_ids"],
                      output_names=["logits"], external_data=False, verbose=False,
                      dynamic_shapes={"input_ids": {0: Dim("batch", min=1, max=64),
                                                    1: Dim("seq", min=2, max=max_seq_len)}})
    if quant == "fp32":
        return path, []
    import logging

    import onnx

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:], root.level = handlers, level  # its import configures the root logger at INFO

    bits = 8 if quant == "int8" else 4
    # accuracy_level 0: the kernel computes in fp32 (4 would quantize activations to int8 inside it)
    q = MatMulNBitsQuantizer(onnx.load(str(path)), bits=bits, block_size=ONNX_BLOCK, is_symmetric=True,
                             accuracy_level=0)
    q.process()
    qpath = out / f"model.{quant}.onnx"
    q.model.save_model_to_file(str(qpath), False)
    path.unlink()
    left = [n.name for n in q.model.model.graph.node if n.op_type == "MatMul" and
            any(i in {t.name for t in q.model.model.graph.initializer} for i in n.input)]
    return qpath, left


def quantize_linears(model, quant: str) -> list[str]:
    """Apply torchao's 8da8w (int8 per-channel weights) or 8da4w (int4, groups of 32) to the
    linear layers in place; returns the names of the linear layers the scheme had to skip."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quant == "8da8w":
        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    else:
        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP))
    skipped = [name for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and quant == "8da4w" and mod.in_features % GROUP]

    def take(mod, fqn):
        return isinstance(mod, torch.nn.Linear) and (quant != "8da4w" or mod.in_features % GROUP == 0)

    quantize_(model, cfg, filter_fn=take)
    return skipped


def export_executorch(model, out: Path, quant: str, max_seq_len: int) -> tuple[Path, list[str]]:
    """``model.<quant>.pte`` lowered to XNNPACK, batch 1, dynamic sequence length."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from torch.export import Dim

    skipped = [] if quant == "fp32" else quantize_linears(model, quant)
    example = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        ep = torch.export.export(LogitsOnly(model).eval(), (example,),
                                 dynamic_shapes={"input_ids": {1: Dim("seq", min=2, max=max_seq_len)}})
        program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = out / f"model.{quant}.pte"
    path.write_bytes(program.buffer)
    return path, skipped


def export(model_spec: str, adapter: str | Path | None, fmt: str, quant: str, out: str | Path,
           max_seq_len: int = 256) -> tuple[Path, dict, object, object]:
    """Merge and export; writes the artifact, the tokenizer and ``export.json`` under ``out``.
    Returns ``(artifact, meta, reference model, tokenizer)``; the reference is the merged model in
    fp32 (what was exported, before any in-place quantization)."""
    check_format(fmt, quant)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reference, tok = merged_model(model_spec, adapter)
    # torchao quantizes the exported copy in place; the other exports leave the model as it was
    model = copy.deepcopy(reference) if fmt == "executorch" and quant != "fp32" else reference
    builder = export_onnx if fmt == "onnx" else export_executorch
    artifact, skipped = builder(model, out, quant, max_seq_len)
    tok.save_pretrained(str(out / "tokenizer"))
    meta = {"format": fmt, "quant": quant, "artifact": artifact.name, "base_model": model_spec,
            "adapter": str(adapter) if adapter else None, "tokenizer": "tokenizer", "max_seq_len": max_seq_len,
            "skipped_layers": skipped, "system_prompt": _system_prompt_of(adapter)}
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    return artifact, meta, reference, tok
