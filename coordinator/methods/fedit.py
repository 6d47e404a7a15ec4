"""FedIT / FedAvg-LoRA (Zhang et al., 2024, "Towards Building the Federated GPT").

Every client trains the same rank ``r = lora.rank``; the server averages A and B separately with
data-size weights: ``A ← Σ_k p_k A_k``, ``B ← Σ_k p_k B_k``, ``p_k = n_k / Σ n``.  (Inexact:
``Σ p_k B_k A_k ≠ (Σ p_k B_k)(Σ p_k A_k)``; that is the method.)

Planner mapping: none; a device whose capacity is below ``r`` cannot take part and is skipped
(reported with its capacity).  With zero valid updates the caller keeps the global adapter.

Aggregation streams: each update is folded into running sums as it is validated, then dropped
(:class:`~coordinator.methods.base.Averaging`), so a round holds adapter-sized sums whatever its
number of updates.
"""

from __future__ import annotations

from fedlora_edge.core.lora import uniform_plan

from .base import Averaging, MethodContext, register


@register
class FedIT:
    name = "fedit"
    dp_normalise = "trainers"  # under privacy.dp: DP-FedAvg over the same plans

    def global_rank(self, ctx: MethodContext) -> int:
        return ctx.rank

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return uniform_plan(ctx.modules, ctx.rank, ctx.scale) if capacity >= ctx.rank else None

    def accumulator(self, global_factors, ctx, state):
        return Averaging(global_factors, "trainers")
