"""Checks on every incoming update before it is aggregated.

An update is rejected, with a reason that names the client, when its keys differ from the
client's *assigned* plan, a shape differs, a tensor is not float32, or a value is NaN or Inf.
A claimed example count is capped (a client cannot buy weight by lying).
"""

from __future__ import annotations

import math
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
        if not t.numel():
            continue
        lo, hi = torch.aminmax(t)  # one pass; NaN propagates into both
        peak = max(-float(lo), float(hi))
        if not math.isfinite(peak) or math.isnan(float(lo)):
            raise UpdateRejected(f"client {client}: '{key}' holds NaN or Inf values")
        if peak > MAX_ABS_VALUE:
            raise UpdateRejected(f"client {client}: '{key}' has |value| {peak:.3g} > "
                                 f"{MAX_ABS_VALUE:g}, not a trained LoRA factor")


def capped_weight(claimed: int, cap: int) -> int:
    """The aggregation weight of a client that claims ``claimed`` examples, at most ``cap``."""
    if claimed < 1:
        raise UpdateRejected(f"example count must be positive, got {claimed}")
    return min(int(claimed), int(cap))


def check_report(client: str, report, round_idx: int, max_steps: int) -> dict:
    """The device's JSON report of one update, checked: the round it names, a positive integer
    example count, 1..``max_steps`` steps, finite non-negative losses and seconds.  Returns the
    fields the coordinator keeps; UpdateRejected naming the client and the field otherwise."""
    if not isinstance(report, dict):
        raise UpdateRejected(f"client {client}: the update's report is not a JSON object")

    def number(key: str, integer: bool = False, low: float = 0.0, high: float | None = None):
        v = report.get(key)
        if (not isinstance(v, (int, float)) or (integer and not isinstance(v, int)) or isinstance(v, bool)
                or not math.isfinite(v) or v < low or (high is not None and v > high)):
            bound = f" <= {high:g}" if high is not None else ""
            raise UpdateRejected(f"client {client}: report field '{key}' must be a finite "
                                 f"{'integer' if integer else 'number'} >= {low:g}{bound}, got {str(v)[:40]!r}")
        return v

    if report.get("round", round_idx) != round_idx:
        raise UpdateRejected(f"client {client}: report names round {str(report.get('round'))[:20]}, "
                             f"the update is for round {round_idx}")
    kept = {"round": round_idx, "num_examples": number("num_examples", True, 1),
            "steps": number("steps", True, 1, max_steps), "first_loss": float(number("first_loss")),
            "last_loss": float(number("last_loss")), "seconds": float(number("seconds"))}
    losses = report.get("losses")  # optional: every step's loss
    if losses is not None:
        if (not isinstance(losses, list) or len(losses) != kept["steps"]
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                           for x in losses)):
            raise UpdateRejected(f"client {client}: report field 'losses' must list {kept['steps']} finite "
                                 "non-negative numbers, one per step")
        kept["losses"] = [float(x) for x in losses]
    return kept
