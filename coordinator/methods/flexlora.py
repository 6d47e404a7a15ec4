"""FlexLoRA (Bai et al., NeurIPS 2024, "Federated Fine-tuning of LLMs under Heterogeneous Tasks
and Client Resources").

Client k trains rank ``r_k = min(capacity_k, R)`` (``R = lora.max_rank``).  The server forms the
full update ``ΔW = Σ_k p_k B_k A_k`` (``p_k = n_k / Σ n``, the scale ``s`` common to all), takes
its SVD ``U Σ Vᵀ`` and keeps the global adapter as ``B = U[:, :R] Σ[:R]``, ``A = Vᵀ[:R]``.  A client of
rank r receives the first r components: the best rank-r approximation of ΔW.  The split of Σ
(all on B) follows the FSLoRA authors' baseline; it keeps A's rows unit-norm so that components
beyond rank(ΔW) (B = 0) still receive gradient.

Round 1 starts from the common random initialisation (A random, B = 0), as plain LoRA does.

Aggregation needs every update of the round (the SVD is of their sum), but only in factored
form: the clients' factors are stacked (``Σ r_k`` wide) and the exact truncated SVD comes from a
QR of each stack and the SVD of a small core (:func:`fedlora_edge.coordinator.aggregate.product_svd_factors`);
no ``m x n`` matrix is formed while ``Σ r_k < min(m, n)``.

Aggregation needs every update at once (the SVD of their weighted sum): a round keeps each
update's decoded factors, the factored form the re-factorisation works on, and no dense ΔW.
"""

from __future__ import annotations

from ..aggregate import product_svd_factors, stacked_factors
from .base import capacity_plan, register


@register
class FlexLoRA:
    name = "flexlora"

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    def aggregate(self, global_factors, contributions, ctx, state):
        return {m: product_svd_factors(*stacked_factors(contributions, m), ctx.max_rank, fill_a=a)
                for m, (a, _) in global_factors.items()}, {}
