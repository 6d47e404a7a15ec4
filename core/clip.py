"""The clip of device-level differential privacy, which both sides apply: a device clips what it
sends (:func:`clip_to_start`), the coordinator checks the bound (:func:`update_norm`).  An update is
every tensor a device sends, as one vector, minus what it started from.  Importance scores (HAFL)
are not a change from a start: the device sends them scaled to norm 1 (:func:`unit_norm`), which
bounds one device's part in their sum as the clip bounds its part in the update's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def update_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of every tensor of ``tensors`` taken as one vector (float64 sums)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip_update(delta: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """(``delta`` scaled to norm at most ``clip_norm``, its norm before).  An update within the
    bound is returned unchanged (copied)."""
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = update_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (t * scale).to(t.dtype) for k, t in delta.items()}, norm


def clip_to_start(trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor],
                  clip_norm: float) -> tuple[dict[str, torch.Tensor], float]:
    """On a device: what it sends is ``start + clip(trained - start)`` (every tensor it sends, as
    one vector); returns it with the update's norm before the clip.  ``start`` holds the same keys."""
    missing = sorted(set(trained) - set(start))
    if missing:
        raise ValueError(f"cannot clip: no start value for {missing[:3]}")
    delta = {k: trained[k] - start[k] for k in trained}
    clipped, norm = clip_update(delta, clip_norm)
    return {k: start[k] + clipped[k] for k in trained}, norm


def unit_norm(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (as one vector) scaled to norm 1; all zeros stay zeros.  Only the ranking of a
    device's importance scores matters to the coordinator, and the scale bounds their sensitivity."""
    norm = update_norm(tensors)
    return {k: (t / norm if norm > 0 else t.clone()).to(t.dtype) for k, t in tensors.items()}
