"""Local training only: the reference point "each client alone".

Each client trains its own adapter at its planner rank ``min(capacity, R)`` every round it is
sampled, starting from the common initialisation and then from its own previous adapter; nothing
is averaged.  Evaluation uses each client's own adapter (``personalised``); the global adapter
stays at its initialisation and is not meaningful for this method.
"""

from __future__ import annotations

from edge_client.lora import slice_factors

from . import MethodContext, capacity_plan, register


class Local:
    name = "local"
    personalised = True
    global_model = False
    pooled = False

    def global_rank(self, ctx: MethodContext) -> int:
        return ctx.max_rank

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    def start_factors(self, client, global_factors, plan, state):
        own = state.get("personal", {}).get(client)
        return {m: (a.clone(), b.clone()) for m, (a, b) in own.items()} if own else slice_factors(global_factors, plan)

    def aggregate(self, global_factors, contributions, ctx, state):
        personal = state.setdefault("personal", {})
        for c in contributions:
            personal[c.client] = c.factors
        return global_factors


register("local")(Local)
