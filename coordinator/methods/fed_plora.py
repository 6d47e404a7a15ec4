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
sampled).

Reconstructed (the official code could not be read; the paper's equations were read in
summaries): the selection is drawn independently per adapted matrix (the paper's notation has one
set per client); weights are data sizes (the paper's mean may be uniform); an untrained index
keeps its previous value.
"""

from __future__ import annotations

import random

from edge_client.lora import ClientPlan, ModulePlan

from ..aggregate import average_components
from . import MethodContext, register


def random_components(rng: random.Random, modules, k: int, total: int) -> dict[str, ModulePlan]:
    """``k`` of ``total`` components per module, uniformly without replacement (sorted)."""
    return {m: ModulePlan(tuple(sorted(rng.sample(range(total), k)))) for m in sorted(modules)}


class FedPLoRA:
    name = "fed-plora"
    knob = "modules r"
    personalised = False
    global_model = True
    pooled = False

    def global_rank(self, ctx: MethodContext) -> int:
        return ctx.max_rank

    def full_downlink(self, ctx: MethodContext) -> bool:
        return True

    def plan(self, client, capacity, ctx, round_idx, state=None):
        big_r = self.global_rank(ctx)
        r = min(capacity, big_r)
        if r < 1:
            return None
        rng = random.Random(f"fed-plora|{ctx.seed}|{round_idx}|{client}")
        return ClientPlan(random_components(rng, ctx.modules, r, big_r), ctx.scale, r,
                          {"hold": big_r, "frozen": "fold"})

    def start_factors(self, client, global_factors, plan, state):
        return {m: (a.clone(), b.clone()) for m, (a, b) in global_factors.items()}

    def aggregate(self, global_factors, contributions, ctx, state):
        return average_components(global_factors, contributions, "trainers")


register("fed-plora")(FedPLoRA)
