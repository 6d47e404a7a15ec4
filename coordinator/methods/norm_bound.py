"""Norm bounding (Sun, Kairouz, Suresh & McMahan, 2019, "Can You Really Backdoor Federated
Learning?"), on each client's update ``ΔW``, with a threshold from the round's own updates.

Planning and the update ``Δ_k = B_k A_k − B0_k A0_k`` as for ``median`` (:mod:`fedlora_edge.coordinator.robust`),
all adapted modules of a client taken as one vector.  Each update is scaled to at most the
threshold ``τ``: ``Δ_k ← Δ_k · min(1, τ / ‖Δ_k‖_F)``, then the clipped updates are averaged with
data-size weights, added to the global product and refactored to rank R from the stacked factors.
``τ = norm_bound.scale × median_k ‖Δ_k‖`` (robust: a minority of huge updates cannot raise it), or
``norm_bound.max_norm`` when that is set and smaller.  It bounds what any one client can move the
model by; an update scaled to just under ``τ``, or one that points the wrong way at a normal
norm, passes (that is norm bounding's limit, not this implementation's).  The record gives the
threshold and each clipped client's factor.

Aggregation needs every update at once (the median norm): a round keeps each update's decoded
factors.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..errors import ConfigError
from ..robust import apply_weighted_all, client_deltas, update_norms
from .base import capacity_plan, register


@dataclass(frozen=True)
class NormBoundSettings:
    """``norm_bound:``: the threshold, relative to the round's median update norm or absolute."""

    scale: float = 1.0     # τ = scale × the median of the round's update norms
    max_norm: float = 0.0  # an absolute cap on τ (0: none)

    def __post_init__(self):
        if not self.scale > 0:
            raise ConfigError("norm_bound.scale: must be positive")
        if not self.max_norm >= 0:
            raise ConfigError("norm_bound.max_norm: must be non-negative (0: no absolute cap)")


@register
class NormBound:
    name = "norm-bound"
    dp_normalise = "trainers"  # under privacy.dp: DP-FedAvg over the same plans
    Settings = NormBoundSettings

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    def aggregate(self, global_factors, contributions, ctx, state):
        st = ctx.settings
        deltas = client_deltas(global_factors, contributions)
        norms = update_norms(deltas)
        tau = st.scale * statistics.median(norms)
        if st.max_norm:
            tau = min(tau, st.max_norm)
        clip = [min(1.0, tau / n) if n > 0 else 1.0 for n in norms]
        total = sum(c.weight for c in contributions)
        weights = [c.weight / total * f for c, f in zip(contributions, clip)]
        factors = apply_weighted_all(global_factors, deltas, weights, ctx.max_rank)
        return factors, {"norm_bound": {"threshold": tau, "clipped": {
            c.client: round(f, 6) for c, f in zip(contributions, clip) if f < 1.0}}}
