"""The frozen base as peft and transformers users train it: its dtype, and a quantized base.

``train.dtype`` (``fp32 | bf16 | fp16``) is the dtype of the frozen base's weights and of the
compute through them, what ``AutoModelForCausalLM.from_pretrained(..., dtype=torch.bfloat16)``
gives; the LoRA factors stay float32 and trainable (peft's ``autocast_adapter_dtype``, on by
default, casts a half-precision adapter back to float32), and the loss is computed on float32
logits (transformers upcasts them).  ``fp16`` is for CUDA devices only: it trains with a
``torch.amp.GradScaler`` (as ``TrainingArguments(fp16=True)`` does), and on a CPU it is refused.

``train.base_quant`` (``none | nf4 | int8``) quantizes the base's Linear weights, QLoRA-style,
with torchao (the library torchtune's QLoRA uses; it runs on CPU and CUDA alike):

- ``nf4``: :func:`torchao.quantization.to_nf4`, QLoRA's 4-bit NormalFloat with blocks of 64
  weights and double-quantized block scales (int8, in scaler blocks of up to 256, each with one
  scale in the base's dtype): about 0.52 bytes per weight.  torchao asks a weight's block count to
  divide into scaler blocks; each weight gets the largest scaler block of at most 256 that does
  (SmolLM2's 576-wide projections cannot take 256).  A weight whose size is not a multiple of 64
  stays unquantized (:func:`quantize_base` says which).
- ``int8``: ``quantize_(model, Int8WeightOnlyConfig())``, symmetric int8 per output row: 1 byte
  per weight and one scale per row.

Quantized are the Linear layers of the decoder, not the embedding and not the output head (tied to
the embedding in SmolLM2), as bitsandbytes' ``llm_int8_skip_modules`` and torchtune leave them.
The quantized weights are frozen (the LoRA factors are all that trains); the forward pass
dequantizes a weight where it is used, in the base's dtype.  Each quantized Linear becomes a
:class:`FrozenQuantLinear`, whose backward pass dequantizes the weight again instead of letting
autograd keep a dequantized copy of every weight until the backward pass (torchao's int8
weight-only linear would: measured +0.3 GB on SmolLM2 at batch 8; its NF4 linear does what this
class does, and this class keeps both on one path).

Folding a component into the base (Fed-PLoRA) needs a base it can add to: a quantized base refuses
(:func:`is_quantized` tells), and the coordinator refuses the combination before a run starts.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .dtypes import BASE_QUANTS, DTYPES, PrecisionError, check_device

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NF4_BLOCK = 64          # QLoRA's block of weights sharing one scale
NF4_SCALER_BLOCK = 256  # QLoRA's (and torchao's default) block of scales sharing one second-level scale


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise PrecisionError(f"train.dtype must be one of {', '.join(DTYPES)}, got '{name}'")
    return TORCH_DTYPES[name]


def _torchao(what: str):
    try:
        import torchao.quantization as tq
    except ImportError:
        raise PrecisionError(f"train.base_quant: {what} needs torchao (`pip install torchao`, or the project's "
                             "`quant` extra)") from None
    return tq


class _FrozenQuantLinearFn(torch.autograd.Function):
    """``F.linear`` on a frozen quantized weight that keeps the quantized weight for the backward
    pass (the input's gradient ``grad @ W``), never a dequantized copy; the weight gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)  # torchao's own linear for the weight's tensor type

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ dequantized(weight, grad.dtype), None, None


class FrozenQuantLinear(torch.nn.Linear):
    """A Linear whose weight is a frozen torchao quantized tensor (see :class:`_FrozenQuantLinearFn`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenQuantLinearFn.apply(x, self.weight, self.bias)


def dequantized(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A quantized weight back in ``dtype`` (torchao's dequantization); a plain tensor cast."""
    from torchao.utils import TorchAOBaseTensor

    if isinstance(weight, TorchAOBaseTensor):
        return weight.dequantize().to(dtype)
    return weight.to(dtype)  # NF4Tensor: ``to(dtype)`` dequantizes (torchao's LinearNF4 does the same)


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is a torchao quantized tensor (NF4 or int8), not a plain float tensor."""
    return type(weight) is not torch.Tensor and type(weight) is not torch.nn.Parameter


def quant_kind(weight: torch.Tensor) -> str:
    """``nf4``, ``int8`` or ``none`` for a Linear's weight."""
    name = type(weight).__name__
    return "nf4" if name == "NF4Tensor" else "int8" if name == "Int8Tensor" else "none"


def base_linears(model) -> Iterator[tuple[str, torch.nn.Linear]]:
    """``(path, module)`` of the Linear layers a quantized base quantizes: every Linear but the
    output head (and any module sharing its weight) and a peft model's LoRA factors."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    for name, mod in model.named_modules():
        if (isinstance(mod, torch.nn.Linear) and mod is not head and mod.weight is not head_w
                and not any(part.startswith("lora_") for part in name.split("."))):
            yield name, mod


def _nf4_scaler_block(n_blocks: int) -> int:
    """The largest scaler block of at most QLoRA's 256 that divides ``n_blocks`` (torchao's NF4
    requires it)."""
    return max(d for d in range(1, NF4_SCALER_BLOCK + 1) if n_blocks % d == 0)


def quantize_base(model, kind: str) -> list[str]:
    """Quantize the base's Linear weights (:func:`base_linears`) to ``kind`` (``nf4`` or ``int8``)
    in place, each Linear becoming a :class:`FrozenQuantLinear`; returns the paths of the weights
    left unquantized (an NF4 weight whose size is not a multiple of 64)."""
    if kind not in BASE_QUANTS or kind == "none":
        raise PrecisionError(f"train.base_quant must be one of {', '.join(BASE_QUANTS)}, got '{kind}'")
    tq = _torchao(kind)
    left, done = [], []
    for name, mod in list(base_linears(model)):
        w = mod.weight.detach()
        if kind == "nf4":
            if w.numel() % NF4_BLOCK:
                left.append(name)
                continue
            q = tq.to_nf4(w, NF4_BLOCK, _nf4_scaler_block(w.numel() // NF4_BLOCK))
            mod.weight = torch.nn.Parameter(q, requires_grad=False)
        else:
            tq.quantize_(mod, tq.Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: True)
            mod.weight.requires_grad_(False)
        done.append(name)
        del w
        release_memory(collect=False)  # each weight's transients back to the OS, not left as holes among the next
    for name in done:
        _swap_frozen(model, name)
    return left


def _swap_frozen(model, name: str) -> None:
    """Replace the Linear at ``name`` with a :class:`FrozenQuantLinear` holding the same tensors."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, leaf)
    new = FrozenQuantLinear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    setattr(parent, leaf, new)


def prepare_base(model, dtype: str = "fp32", base_quant: str = "none", device: str | torch.device = "cpu") -> list[str]:
    """Cast the frozen base to ``dtype``, move it to ``device`` and quantize it per ``base_quant``,
    in place; returns the paths of Linear weights a quantized base left unquantized.  Where the
    weights were read straight from a file (a mapping of it) and a quantization replaced most of
    them, the rest are copied off the file and freed memory is handed back, so the process holds
    the quantized base, not the file."""
    check_device(dtype, device)
    if base_quant not in BASE_QUANTS:
        raise PrecisionError(f"train.base_quant must be one of {', '.join(BASE_QUANTS)}, got '{base_quant}'")
    if dtype != "fp32":
        model.to(torch_dtype(dtype))
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None:  # see _contiguous_input
            head.register_forward_pre_hook(_contiguous_input)
    model.to(device)
    if base_quant == "none":
        return []
    left = quantize_base(model, base_quant)
    with torch.no_grad():
        for p in model.parameters():
            if not is_quantized(p.data) and p.device.type == "cpu":
                p.data = p.data.clone()  # off the safetensors mapping: freed with the weights it shared it with
    release_memory()
    return left


def _contiguous_input(module, args):
    """The output head's input made contiguous.  transformers slices the last position off the
    hidden states for ``logits_to_keep=1`` (every evaluation's prefill); on torch 2.13's CPU a
    bfloat16 ``F.linear`` of such a view materialises the weight once per row: 1 GB for SmolLM2's
    head at 18 prompts, where the contiguous copy costs 18 x 576 numbers."""
    return (args[0].contiguous(), *args[1:])


def release_memory(collect: bool = True) -> None:
    """Collect garbage (``collect``) and hand freed heap memory back to the OS (glibc's
    ``malloc_trim``; a no-op elsewhere), so that a resident-memory figure shows what is held."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def base_form(model) -> tuple[str, str]:
    """``(dtype, base_quant)`` of a loaded base, read off its weights: the embedding's dtype and the
    quantization of its first base Linear."""
    emb = model.get_input_embeddings().weight
    dtype = next((k for k, v in TORCH_DTYPES.items() if v == emb.dtype), str(emb.dtype))
    first = next(base_linears(model), None)
    return dtype, quant_kind(first[1].weight) if first else "none"
