"""The base's precisions by name, torch-free: the coordinator's config and the device's trainer check
``train.dtype`` against them without importing torch (:mod:`fedlora_edge.core.precision` does the work)."""

from __future__ import annotations

DTYPES = ("fp32", "bf16", "fp16")
BASE_QUANTS = ("none", "nf4", "int8")


class PrecisionError(ValueError):
    """A dtype or quantized base this device cannot train with; the message says why and what can."""


def check_device(dtype: str, device) -> None:
    """Refuse an unknown ``train.dtype``, and ``fp16`` off CUDA: a CPU has no fast float16 matmul,
    and fp16 training needs loss scaling that only the CUDA path has."""
    import torch

    if dtype not in DTYPES:
        raise PrecisionError(f"train.dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    kind = torch.device(device).type
    if dtype == "fp16" and kind != "cuda":
        raise PrecisionError(f"train.dtype: fp16 needs a CUDA device, and this one trains on '{kind}'; "
                             "use bf16 (half the base's bytes on a CPU as well) or fp32")
