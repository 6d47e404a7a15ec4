"""Fed-PLoRA (Zhang, Hu & Xu, ICLR 2026, "Heterogeneous Federated Fine-Tuning with Parallel
One-Rank Adaptation", arXiv 2602.16936): parallel one-rank modules with Select-N-Fold.

The server keeps ``R = lora.max_rank`` one-rank modules ``B[:, j] A[j, :]`` per adapted matrix and
sends all ``R`` to every client.  Client ``i`` selects ``r_i = min(capacity_i, R)`` of them
uniformly at random (redrawn every round), folds the others into its frozen base
(``W0 + s·Σ_{j∉K_i} B_j A_j``, so its starting function is exactly the global model) and trains
the selected ones from their global values.  It uploads only those, indexed by position, and the
server averages each index over the clients that trained it (``Q_j``), data-size weighted; an
index nobody trained keeps its value.  With ``r_i = R`` for all it is FedIT.

Planner mapping: the knob is the number of modules ``r_i``, the largest that fits the device's
memory, round deadline and transfer budget *with a rank-R download* (every client receives all R
modules, so a slow link can leave no room for even one module; such a device is reported and not
sampled) and a copy of the adapted base weights in memory (the fold is undone by copying back).

Reconstructed (the official code could not be read; the paper's equations were read in
summaries): the selection is drawn independently per adapted matrix (the paper's notation has one
set per client); weights are data sizes (the paper's mean may be uniform); an untrained index
keeps its previous value.

Aggregation streams: each update is folded into running sums as it is validated, then dropped
(:class:`~coordinator.methods.base.Averaging`), so a round holds adapter-sized sums whatever its
number of updates.
"""

from __future__ import annotations

from fedlora_edge.core.lora import DeviceSteps

from ..planner import Footprint
from .base import Averaging, MethodContext, global_copy, random_plan, register, trained_rank


@register
class FedPLoRA:
    name = "fed-plora"
    dp_normalise = "trainers"  # under privacy.dp: DP-FedAvg over the same plans
    plain_plans = False  # its plans hold the R modules and fold the untrained ones
    knob = "modules r"
    start_factors = staticmethod(global_copy)

    def footprint(self, ctx: MethodContext) -> Footprint:
        return Footprint(down_rank=ctx.max_rank, fold=True)

    def plan(self, client, capacity, ctx, round_idx, state=None):
        r = trained_rank(capacity, ctx)
        if r < 1:
            return None
        return random_plan(ctx, "fed-plora", client, round_idx, r, ctx.scale, DeviceSteps(hold=ctx.max_rank, frozen="fold").to_extra())

    def accumulator(self, global_factors, ctx, state):
        return Averaging(global_factors, "trainers")
