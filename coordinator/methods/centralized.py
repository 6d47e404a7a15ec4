"""Centralized training: every client's data pooled on the server, the upper reference point.

One pseudo-client holding all the training data trains rank ``R = lora.max_rank`` for
``train.steps × clients_per_round`` steps per round (the federated methods' total step budget);
its result replaces the global adapter.  No adapter crosses a wire, so bytes are zero; the data
itself would have to, which is what federated training avoids.

Aggregation streams: each update is folded into running sums as it is validated, then dropped
(:class:`~coordinator.methods.base.Averaging`), so a round holds adapter-sized sums whatever its
number of updates.
"""

from __future__ import annotations

from fedlora_edge.core.lora import uniform_plan

from .base import Averaging, register


@register
class Centralized:
    name = "centralized"
    pools_data = True

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return uniform_plan(ctx.modules, ctx.max_rank, ctx.scale)

    def accumulator(self, global_factors, ctx, state):
        return Averaging(global_factors, "trainers")
