"""Local training only: the reference point "each client alone".

Each client trains its own adapter at its planner rank ``min(capacity, R)`` every round it is
sampled, starting from the common initialisation and then from its own previous adapter; nothing
is averaged.  Evaluation uses each client's own adapter (``personalised``); the global adapter
stays at its initialisation and is not meaningful for this method.

Aggregation keeps each update (it becomes that client's own adapter): no sum is formed.
"""

from __future__ import annotations

from .base import capacity_plan, own_or_global, register


@register
class Local:
    name = "local"
    personalised = True
    global_model = False

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    start_factors = staticmethod(own_or_global)

    def aggregate(self, global_factors, contributions, ctx, state):
        personal = state.setdefault("personal", {})
        for c in contributions:
            personal[c.client] = c.factors
        return global_factors, {}
