"""Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, NeurIPS 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent"), on each client's update ``ΔW``.

Planning and the update ``Δ_k = B_k A_k − B0_k A0_k`` as for ``median`` (:mod:`fedlora_edge.coordinator.robust`),
all adapted modules of a client taken as one vector.  Each client's score is the sum of its
squared distances to its ``K − f − 2`` nearest others (``f = multi_krum.byzantine``, the number of
hostile clients the round should survive; at least one neighbour), computed exactly from the
factors' Gram matrices.  The ``m`` lowest-scoring clients (``multi_krum.keep``; 0: ``K − f``) are
kept and their updates averaged with data-size weights; the sum is added to the global product
and refactored to rank R from the stacked factors (no dense ``m x n`` matrix while the stacks are
narrower).  ``keep: 1`` is Krum.  The guarantee needs ``K > 2f + 2``; with fewer clients the
scores still rank them, and the record says ``guarantee: false``.  The round's record lists the
kept clients and every score.

Aggregation needs every update at once (all pairwise distances): a round keeps each update's
decoded factors.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..robust import apply_weighted_all, client_deltas, krum_scores, squared_distances
from .base import capacity_plan, register


@dataclass(frozen=True)
class MultiKrumSettings:
    """``multi_krum:``: the hostile clients to survive, and how many clients to keep."""

    byzantine: int = 1  # f
    keep: int = 0       # m; 0: K − f

    def __post_init__(self):
        if not isinstance(self.byzantine, int) or self.byzantine < 0:
            raise ConfigError("multi_krum.byzantine: must be a non-negative integer")
        if not isinstance(self.keep, int) or self.keep < 0:
            raise ConfigError("multi_krum.keep: must be a non-negative integer (0: all but multi_krum.byzantine)")


@register
class MultiKrum:
    name = "multi-krum"
    Settings = MultiKrumSettings

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    def aggregate(self, global_factors, contributions, ctx, state):
        st, k = ctx.settings, len(contributions)
        deltas = client_deltas(global_factors, contributions)
        scores, neighbours = krum_scores(squared_distances(deltas), st.byzantine)
        keep = min(k, st.keep or max(1, k - st.byzantine))
        chosen = sorted(range(k), key=lambda i: (float(scores[i]), contributions[i].client))[:keep]
        total = sum(contributions[i].weight for i in chosen)
        weights = [contributions[i].weight / total for i in chosen]
        factors = apply_weighted_all(global_factors, [deltas[i] for i in chosen], weights, ctx.max_rank)
        return factors, {"krum": {"kept": sorted(contributions[i].client for i in chosen),
                                  "scores": {c.client: float(s) for c, s in zip(contributions, scores)},
                                  "neighbours": neighbours, "guarantee": k > 2 * st.byzantine + 2}}
