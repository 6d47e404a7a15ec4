"""Tensor payloads as they cross a wire or a disk: safetensors bytes, never pickle.

A payload is a safetensors blob of float32 tensors in peft's key format plus a flat string
metadata header.  The byte counts in reports are ``len(encode_tensors(...))``: the same bytes the
MQTT transport sends, not an estimate.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save


class PayloadError(ValueError):
    """A payload is too large or cannot be parsed; the message says which."""


def encode_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    cont = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _st_save(cont, metadata=dict(metadata) if metadata else None)


def decode_tensors(blob: bytes, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Parse a safetensors blob; the size limit is checked before anything is parsed."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise PayloadError(f"payload of {len(blob)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        return _st_load(bytes(blob))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad blob
        raise PayloadError(f"payload is not valid safetensors: {exc}") from None


def write_factors_file(path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a state dict (peft keys) as a safetensors file, as peft's adapter_model.safetensors."""
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})
