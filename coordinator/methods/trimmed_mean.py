"""Coordinate-wise trimmed mean (Yin et al., ICML 2018), on each client's update ``ΔW``.

Planning and the update ``Δ_k = B_k A_k − B0_k A0_k`` as for ``median`` (:mod:`fedlora_edge.coordinator.robust`).
Per coordinate the server drops the ``⌊β K⌋`` largest and the ``⌊β K⌋`` smallest of the round's K
values (``β = trimmed_mean.trim``), averages the rest (unweighted), adds the result to the global
product and refactors to rank R.  It tolerates up to ``⌊β K⌋`` arbitrary updates per coordinate;
with ``β = 0`` it is the plain mean of the updates.  With too few updates to trim (``2⌊β K⌋ ≥ K``)
the round trims as many as it can and says so in its record (``trimmed``).

Aggregation needs every update at once (a sort per coordinate): a round keeps each update's
decoded factors and forms the dense ``Δ_k`` of one module at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..robust import apply_dense, dense_deltas, trimmed_mean
from .base import capacity_plan, register


@dataclass(frozen=True)
class TrimmedMeanSettings:
    """``trimmed_mean:``: the fraction trimmed from each side of every coordinate."""

    trim: float = 0.2  # β: ⌊β K⌋ values dropped from each end

    def __post_init__(self):
        if not 0.0 <= self.trim < 0.5:
            raise ConfigError("trimmed_mean.trim: must be in [0, 0.5)")


@register
class TrimmedMean:
    name = "trimmed-mean"
    Settings = TrimmedMeanSettings

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    def aggregate(self, global_factors, contributions, ctx, state):
        k = len(contributions)
        trim = min(math.floor(ctx.settings.trim * k), (k - 1) // 2)
        return ({m: apply_dense(global_factors, m, trimmed_mean(dense_deltas(global_factors, contributions, m), trim),
                                ctx.max_rank) for m in global_factors},
                {"trimmed": {"per_side": trim, "of": k}})
