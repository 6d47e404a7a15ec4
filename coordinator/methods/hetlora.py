"""HetLoRA zero-padding (Cho et al., 2024, "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models"), in the plain form later papers compare against.

The server keeps rank ``R = lora.max_rank``.  Client k gets the first ``r_k`` components
(``B[:, :r_k]``, ``A[:r_k, :]``) with ``r_k = min(capacity_k, R)`` from the planner.  Aggregation
zero-pads each client's *delta* to R and averages over all K participating clients:

``c_j ← c_j + Σ_{k: r_k > j} p_k (c_{k,j} − c_j)``,  ``p_k = n_k / Σ_all n``,

so component j moves by the fraction of weight that trained it (the "information dilution" HAFL
complains of).  Padding deltas rather than factors (as the FSLoRA authors' baseline does) keeps a
component that no sampled client trained instead of zeroing it.  The original paper's rank
self-pruning and norm-based weights are not implemented.

Aggregation streams: each update is folded into running sums as it is validated, then dropped
(:class:`~coordinator.methods.base.Averaging`), so a round holds adapter-sized sums whatever its
number of updates.
"""

from __future__ import annotations

from .base import Averaging, capacity_plan, register


@register
class HetLoRA:
    name = "hetlora"
    dp_normalise = "all"  # under privacy.dp: DP-FedAvg over the same plans

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    def accumulator(self, global_factors, ctx, state):
        return Averaging(global_factors, "all")
