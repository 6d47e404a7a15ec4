"""Checks on every incoming update before it is aggregated.

An update is rejected, with a reason that names the client, when its keys differ from the
client's *assigned* plan, a shape differs, a tensor is not float32, or a value is NaN or Inf.
A claimed example count is capped (a client cannot buy weight by lying).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# LoRA factors of a working adapter are O(1); values past this are a broken or hostile update.
MAX_ABS_VALUE = 1e4


class UpdateRejected(ValueError):
    """The update is not aggregated; ``str(exc)`` is the reason, naming the client."""


def validate_update(client: str, tensors: Mapping[str, torch.Tensor],
                    expected: Mapping[str, tuple[int, ...]]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise UpdateRejected(f"client {client}: {len(missing)} expected tensor(s) missing, e.g. '{missing[0]}'")
    if extra:
        raise UpdateRejected(f"client {client}: {len(extra)} unexpected tensor(s), e.g. '{extra[0]}'")
    for key, shape in expected.items():
        t = tensors[key]
        if t.dtype != torch.float32:
            raise UpdateRejected(f"client {client}: '{key}' has dtype {t.dtype}, expected float32")
        if tuple(t.shape) != tuple(shape):
            raise UpdateRejected(f"client {client}: '{key}' has shape {tuple(t.shape)}, its plan says {tuple(shape)}")
        if not bool(torch.isfinite(t).all()):
            raise UpdateRejected(f"client {client}: '{key}' holds NaN or Inf values")
        if t.numel() and float(t.abs().max()) > MAX_ABS_VALUE:
            raise UpdateRejected(f"client {client}: '{key}' has |value| {float(t.abs().max()):.3g} > "
                                 f"{MAX_ABS_VALUE:g}, not a trained LoRA factor")


def capped_weight(claimed: int, cap: int) -> int:
    """The aggregation weight of a client that claims ``claimed`` examples, at most ``cap``."""
    if claimed < 1:
        raise UpdateRejected(f"example count must be positive, got {claimed}")
    return min(int(claimed), int(cap))
