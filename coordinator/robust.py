"""The standard robust-aggregation defences' arithmetic, on each client's update ``ΔW``: pure
functions on plain tensors (no I/O), shared by the defence methods (``median``, ``trimmed-mean``,
``multi-krum``, ``norm-bound`` in :mod:`fedlora_edge.coordinator.methods`).

Factors cannot be compared across clients (``B A = (B M)(M⁻¹ A)`` for any invertible ``M``, and
ranks differ), so every defence works on what a client changed: per adapted module,
``Δ_k = B_k A_k − B0_k A0_k`` with ``B0_k A0_k`` the product of the components it was sent (the
first ``r_k`` components of the global adapter, its plan's).  In factors, ``Δ_k = [B_k, −B0_k]
[A_k; A0_k]``, of rank at most ``2 r_k``, so norms and distances come from small Gram matrices
(float64) without forming any ``m x n`` matrix; only the coordinate-wise rules (median, trimmed
mean) form the dense ``Δ_k``.  The robust combination ``D`` of the ``Δ_k`` is applied to the whole
global product, ``G ← G + D``, and refactored to the global rank by a truncated SVD (as FlexLoRA
does), so a client of any rank takes part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .aggregate import Contribution, product_svd_factors, svd_factors

Pair = tuple[torch.Tensor, torch.Tensor]  # (B', A') with Δ = B' A'


def delta_factors(global_factors: Mapping[str, Pair], c: Contribution, module: str) -> Pair:
    """``(B', A')`` with ``B' A' = B_k A_k − B0_k A0_k``: the client's trained factors beside the
    negated start components of its plan (the global components it was sent)."""
    a, b = c.factors[module]
    ga, gb = global_factors[module]
    idx = torch.tensor(c.plan.modules[module].components, dtype=torch.long)
    return (torch.cat([b, -gb.index_select(1, idx)], dim=1).double(),
            torch.cat([a, ga.index_select(0, idx)], dim=0).double())


def client_deltas(global_factors: Mapping[str, Pair], contributions: Sequence[Contribution]) -> list[dict[str, Pair]]:
    """Every client's update in factors, per module (:func:`delta_factors`)."""
    return [{m: delta_factors(global_factors, c, m) for m in global_factors} for c in contributions]


def apply_weighted_all(global_factors: Mapping[str, Pair], deltas: Sequence[Mapping[str, Pair]],
                       weights: Sequence[float], rank: int) -> dict[str, Pair]:
    """:func:`apply_weighted` for every module: the global adapter moved by ``Σ_k w_k Δ_k``."""
    return {m: apply_weighted(global_factors, m, [d[m] for d in deltas], weights, rank) for m in global_factors}


def inner(x: Pair, y: Pair) -> float:
    """``<B_x A_x, B_y A_y>_F = Σ (B_xᵀ B_y) ∘ (A_x A_yᵀ)``."""
    return float(((x[0].T @ y[0]) * (x[1] @ y[1].T)).sum())


def update_norms(deltas: Sequence[Mapping[str, Pair]]) -> list[float]:
    """``‖Δ_k‖_F`` of each client over every module (its whole update as one vector)."""
    return [sum(inner(d[m], d[m]) for m in d) ** 0.5 for d in deltas]


def squared_distances(deltas: Sequence[Mapping[str, Pair]]) -> torch.Tensor:
    """``K x K`` matrix of ``‖Δ_i − Δ_j‖²_F`` over every module (float64, from Gram matrices)."""
    k = len(deltas)
    g = torch.zeros((k, k), dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            g[i, j] = g[j, i] = sum(inner(deltas[i][m], deltas[j][m]) for m in deltas[i])
    diag = torch.diagonal(g)
    return (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0.0)


def krum_scores(d2: torch.Tensor, byzantine: int) -> tuple[torch.Tensor, int]:
    """Krum's score per client: the sum of its squared distances to its ``K − f − 2`` nearest
    others (at least 1, at most ``K − 1``), and that neighbour count (Blanchard et al., 2017)."""
    k = d2.shape[0]
    if k == 1:
        return torch.zeros(1, dtype=d2.dtype), 0
    n = min(max(1, k - byzantine - 2), k - 1)
    others = d2 + torch.diag(torch.full((k,), float("inf"), dtype=d2.dtype))  # not its own neighbour
    return others.sort(dim=1).values[:, :n].sum(dim=1), n


def dense_deltas(global_factors: Mapping[str, Pair], contributions: Sequence[Contribution], module: str) -> torch.Tensor:
    """``K x m x n`` stack of the clients' ``Δ_k`` for one module (float32, as the factors)."""
    out = []
    for c in contributions:
        b, a = delta_factors(global_factors, c, module)
        out.append((b @ a).to(global_factors[module][0].dtype))
    return torch.stack(out)


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """The median of each coordinate over dim 0; for an even count the mean of the two middle values."""
    k = stack.shape[0]
    s = stack.sort(dim=0).values
    return (s[(k - 1) // 2] + s[k // 2]) / 2


def trimmed_mean(stack: torch.Tensor, trim: int) -> torch.Tensor:
    """The mean of each coordinate after dropping its ``trim`` largest and ``trim`` smallest values."""
    k = stack.shape[0]
    if not 0 <= 2 * trim < k:
        raise ValueError(f"cannot trim {trim} from each side of {k} values")
    s = stack.sort(dim=0).values
    return s[trim:k - trim].mean(dim=0)


def apply_dense(global_factors: Mapping[str, Pair], module: str, delta: torch.Tensor, rank: int) -> Pair:
    """The global factors of ``module`` moved by the dense update ``delta`` and refactored to ``rank``."""
    ga, gb = global_factors[module]
    return svd_factors(gb @ ga + delta, rank, fill_a=ga)


def apply_weighted(global_factors: Mapping[str, Pair], module: str, deltas: Sequence[Pair],
                   weights: Sequence[float], rank: int) -> Pair:
    """The global factors of ``module`` moved by ``Σ_k w_k Δ_k`` (``deltas`` in factors) and refactored
    to ``rank`` from the stacked factors (:func:`~coordinator.aggregate.product_svd_factors`)."""
    ga, gb = global_factors[module]
    bs = torch.cat([gb.double()] + [w * b for (b, _), w in zip(deltas, weights)], dim=1)
    as_ = torch.cat([ga.double()] + [a for _, a in deltas], dim=0)
    a, b = product_svd_factors(bs, as_, rank, fill_a=ga.double())
    return a.to(ga.dtype), b.to(gb.dtype)
