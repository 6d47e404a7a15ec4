"""Coordinate-wise median (Yin, Chen, Ramchandran & Bartlett, ICML 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates"), on each client's update ``ΔW``.

Client k trains rank ``r_k = min(capacity_k, R)`` (the planner's, as HetLoRA and FlexLoRA) from the
first ``r_k`` global components.  Per adapted module the server forms each client's update
``Δ_k = B_k A_k − B0_k A0_k`` (what it changed, whatever its rank: :mod:`fedlora_edge.coordinator.robust`),
takes the median of every coordinate over the round's clients (for an even count the mean of the
two middle values; unweighted, as the rule is), adds it to the global product and refactors to
rank R by a truncated SVD.  A minority of arbitrary updates cannot move a coordinate beyond the
honest clients' range; the price is the statistical efficiency of the mean, and under non-IID
clients a median can lag every one of them.

Aggregation needs every update at once (a median per coordinate): a round keeps each update's
decoded factors and forms the dense ``Δ_k`` of one module at a time (``K·m·n`` floats).
"""

from __future__ import annotations

from ..robust import apply_dense, coordinate_median, dense_deltas
from .base import capacity_plan, register


@register
class Median:
    name = "median"

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    def aggregate(self, global_factors, contributions, ctx, state):
        return {m: apply_dense(global_factors, m, coordinate_median(dense_deltas(global_factors, contributions, m)),
                               ctx.max_rank) for m in global_factors}, {}
