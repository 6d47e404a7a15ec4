"""CLAIR (He, Chen & Feng, 2026, "Federated LoRA Fine-Tuning for LLMs via Collaborative Alignment",
arXiv 2605.21217): recover the clients' shared LoRA subspace by a low-rank plus block-sparse
decomposition of their updates, flag the contaminated clients, refine the others.

Only the paper's abstract is public (no full text, no code).  What the abstract states: clean
client updates share a low-rank subspace, contamination is block-sparse (one block per client),
the method works from the clients' local estimates, flags the contaminated clients, and refines a
benign client's update by "cross-client averaging off the subspace while preserving client-specific
variation within it".  **Everything below that makes this concrete is a reconstruction**:

1. Per adapted matrix, client ``k``'s update is its round's change ``Δ_k = B_k A_k − B0_k A0_k``
   (``B0_k A0_k``: the adapter it was sent; the scale ``s`` is common and left out), whatever its
   rank; in factors ``[B_k, −B0_k] [A_k; A0_k]``.  With ``clair.side: output`` the updates are
   stacked side by side, ``Y = [Δ_1, …, Δ_K]``, and the shared subspace is a column (output)
   space ``U``; the default ``input`` does the same on ``Δ_kᵀ``, so ``U`` is a row (input) space:
   LoRA clients that start from one A change B far more than A, and their updates share A's rows
   (on tiny-llama the output side found no shared subspace at all).  ``Y`` is never formed: with
   ``A_kᵀ = Q_k R_k`` (thin QR), ``Δ_k = (B_k R_kᵀ) Q_kᵀ`` and ``Q_k`` has orthonormal columns, so the
   decomposition is solved exactly on the compressed blocks ``B_k R_kᵀ`` (``m × r_k``): the nuclear
   norm, the block norms and the column space are unchanged by ``Q_kᵀ``, and the optimum's row
   space lies in the data's.
2. Outlier pursuit with client blocks (convex; chosen over the non-convex rank-r variant because it
   needs no rank, only ``λ``): ``min ‖L‖_* + λ Σ_k ‖S_k‖_F  s.t.  Y = L + S``, ``Y`` scaled to unit
   Frobenius norm, solved by the inexact augmented Lagrangian method (ADMM: singular-value
   thresholding for ``L``, block soft-thresholding per client for ``S``; Lin, Chen & Ma 2010).
   ``λ = clair.lam_scale · sqrt(ρ)`` with ``ρ`` the blocks' mean stable rank: an outlier block
   costs about ``sqrt(ρ)‖Y_k‖_F`` in ``L`` and ``λ‖Y_k‖_F`` in ``S``, so ``λ < sqrt(ρ)`` sends it to
   ``S``, while a benign block that shares ``U`` with the others adds far less to ``‖L‖_*``
   (:func:`block_lambda` gives the range that worked on synthetic updates).
3. Client ``k``'s score is the share of its update in the sparse part over all adapted matrices,
   ``sqrt(Σ ‖S_k‖²) / sqrt(Σ ‖Y_k‖²)``; it is flagged when the score exceeds
   ``clair.threshold``.  A block-sparse test cannot see an attack that stays in the subspace (a
   sign-flipped or scaled copy of a benign update has the same subspace), so a second check,
   **not from the paper** and switched by ``clair.consistency``, also flags a client whose update
   points away from the others' or whose norm exceeds ``clair.max_norm_ratio`` times the unflagged
   median.  A client's agreement is the median of its cosines with the other unflagged clients
   (robust to the bad ones among them); it is flagged below ``clair.cosine_ratio`` times the
   median agreement of all (how much clients agree varies from run to run and round to round), and
   always below 0.
4. ``Û``: the left singular vectors of ``L̂`` restricted to the benign clients, with singular value
   above 1e-3 of the largest.  Benign client ``k``'s refined change is
   ``Δ̃_k = Û Ûᵀ Δ_k + (I − Û Ûᵀ) Σ_{j∈C} p_j Δ_j``; its own adapter becomes ``B0_k A0_k + Δ̃_k``
   refactored to its rank by SVD (what it starts from next time and what its evaluation uses).
   The global adapter is the benign clients' adapters averaged, ``Σ_{j∈C} p_j B_j A_j``,
   refactored to rank R: flagged clients do not touch it.  Iterated every round (the abstract
   reads one-shot; a federated run is many rounds).

The thresholds' defaults come from synthetic updates (the tests) and tiny-llama runs with 2 of 8
clients contaminated; what they catch on SmolLM2 is measured in docs/results.md ("CLAIR under
contamination").

Planner mapping: as FlexLoRA, rank ``r_k = min(capacity_k, R)``.  The report lists, per round, the
flagged clients and every client's scores.

Heterogeneous ranks: the decomposition works on ``Δ_k`` whatever its rank, and ranks shared by
several clients are no trouble.  A client alone above every other's rank is: the directions only it
trains have no company and read as its own sparse block, so it is flagged though benign (measured
on tiny-llama, :func:`alone_at_top_rank`).  The round's record then carries a ``caution`` that says
so; the fix is a fleet where a second device reaches that rank, or a lower ``lora.max_rank``.

Aggregation needs every update at once (the decomposition is over the whole fleet's updates): a
round keeps each update's decoded factors.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..aggregate import Contribution, product_svd_factors, stacked_factors, svd_factors
from ..errors import ConfigError
from .base import capacity_plan, own_or_global, register


@dataclass(frozen=True)
class ClairSettings:
    """``clair:``: the decomposition's weight and the detection thresholds."""

    side: str = "input"            # the shared subspace: input (row space of ΔW = BA) or output (column space)
    lam_scale: float = 0.75        # λ = lam_scale · sqrt(the updates' mean stable rank) on the block-sparse part
    threshold: float = 0.5         # flag a client whose update is more than this share block-sparse
    consistency: bool = True       # also flag updates that point away or are far larger (not in the paper)
    cosine_ratio: float = 0.25     # ... agreement (median cosine with the others) below this share of the typical one
    max_norm_ratio: float = 3.0    # ... or norm above this multiple of the unflagged median

    def __post_init__(self):
        if self.side not in ("input", "output"):
            raise ConfigError("clair.side: must be 'input' or 'output'")
        if not self.lam_scale > 0:
            raise ConfigError("clair.lam_scale: must be positive")
        for name in ("threshold", "cosine_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"clair.{name}: must be in (0, 1)")
        if not self.max_norm_ratio > 1.0:
            raise ConfigError("clair.max_norm_ratio: must be above 1")


def compress(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``B Rᵀ`` with ``Aᵀ = Q R``: an ``m × r`` block with the same column space, Frobenius and
    nuclear norm as ``B A``."""
    _, r = torch.linalg.qr(a.T.to(torch.float64))
    return b.to(torch.float64) @ r.T


def svt(x: torch.Tensor, tau: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u * torch.clamp(s - tau, min=0.0)) @ vh


def block_soft(x: torch.Tensor, tau: float) -> torch.Tensor:
    n = float(x.norm())
    return x * max(0.0, 1.0 - tau / n) if n > 0 else x


def outlier_pursuit(blocks: Sequence[torch.Tensor], lam: float | Sequence[float], max_iter: int = 500,
                    tol: float = 1e-7) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``min ‖L‖_* + Σ_k λ_k ‖S_k‖_F  s.t.  [Y_k] = L + S`` by inexact ALM; returns the blocks of
    ``L`` and of ``S``.  ``blocks`` share their row count (``m × n_k`` each); ``lam``: one weight
    for every block, or one per block."""
    widths = [blk.shape[1] for blk in blocks]
    lams = [float(lam)] * len(blocks) if isinstance(lam, (int, float)) else [float(x) for x in lam]
    y = torch.cat(list(blocks), dim=1)
    norm = float(y.norm())
    if norm == 0:
        return [torch.zeros_like(blk) for blk in blocks], [torch.zeros_like(blk) for blk in blocks]
    y = y / norm
    spec = float(torch.linalg.matrix_norm(y, ord=2))
    mu, rho = 1.25 / spec, 1.5
    mu_max = mu * 1e7
    lag = torch.zeros_like(y)
    s = torch.zeros_like(y)
    for _ in range(max_iter):
        low = svt(y - s + lag / mu, 1.0 / mu)
        parts = torch.split(y - low + lag / mu, widths, dim=1)
        s = torch.cat([block_soft(p, w / mu) for p, w in zip(parts, lams)], dim=1)
        z = y - low - s
        lag = lag + mu * z
        mu = min(mu * rho, mu_max)
        if float(z.norm()) < tol:
            break
    return ([blk * norm for blk in torch.split(low, widths, dim=1)],
            [blk * norm for blk in torch.split(s, widths, dim=1)])


def block_lambda(blocks: Sequence[torch.Tensor], lam_scale: float) -> list[float]:
    """Each block's weight ``λ_k = lam_scale · sqrt(ρ_k)``, ``ρ_k = (‖Y_k‖_* / ‖Y_k‖_F)²`` its
    stable rank.

    A block off the others' subspace costs ``‖Y_k‖_* = sqrt(ρ_k)·‖Y_k‖_F`` in ``L`` and
    ``λ_k·‖Y_k‖_F`` in ``S``, so ``λ_k < sqrt(ρ_k)`` sends it to ``S`` whatever its rank; a block
    inside the shared subspace adds far less to ``‖L‖_*`` and stays there.  One weight for all
    (from the blocks' mean stable rank) let a rank-1 or rank-2 outlier among higher ranks cost
    less in ``L`` than in ``S`` and pass unseen; per block it does not.  On synthetic fleets
    (4 to 32 clients, ranks 1 to 16, noise up to 20%) ``lam_scale`` 0.75 is the default."""
    out = []
    for blk in blocks:
        fro = float(blk.norm())
        rho = (float(torch.linalg.matrix_norm(blk, ord="nuc")) / fro) ** 2 if fro > 0 else 1.0
        out.append(lam_scale * math.sqrt(rho))
    return out


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    d = float(x.norm() * y.norm())
    return float((x * y).sum()) / d if d > 0 else 0.0


def clair_round(updates: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], weights: dict[str, float],
                lam_scale: float = 0.75, threshold: float = 0.5, consistency: bool = True, cosine_ratio: float = 0.25,
                max_norm_ratio: float = 3.0, side: str = "input") -> dict:
    """The numeric core: ``updates[client][module] = (A, B)``.  Returns ``{"flagged", "scores",
    "benign", "subspace" (module -> Û), "refined" (client -> module -> Δ̃)}``.  ``side="output"``: the shared subspace is a column space of ``Δ = BA``;
    ``"input"``: a row space (computed on ``Δᵀ = AᵀBᵀ`` and transposed back)."""
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', not {side!r}")
    if side == "input":
        flipped = {c: {m: (b.T, a.T) for m, (a, b) in f.items()} for c, f in updates.items()}
        res = clair_round(flipped, weights, lam_scale, threshold, consistency, cosine_ratio, max_norm_ratio, "output")
        res["refined"] = {c: {m: d.T for m, d in f.items()} for c, f in res["refined"].items()}
        return res
    clients = sorted(updates)
    modules = sorted(next(iter(updates.values())))
    sparse2 = dict.fromkeys(clients, 0.0)
    total2 = dict.fromkeys(clients, 0.0)
    lows = {}
    for m in modules:
        blocks = [compress(*updates[c][m]) for c in clients]
        lam = block_lambda(blocks, lam_scale)
        low, sp = outlier_pursuit(blocks, lam) if len(clients) > 1 else (blocks, [torch.zeros_like(blocks[0])])
        lows[m] = low
        for c, blk, s in zip(clients, blocks, sp):
            sparse2[c] += float(s.norm()) ** 2
            total2[c] += float(blk.norm()) ** 2
    scores = {c: {"sparse_share": math.sqrt(sparse2[c] / total2[c]) if total2[c] > 0 else 0.0} for c in clients}
    flagged = {c for c in clients if scores[c]["sparse_share"] > threshold}
    deltas = {c: {m: updates[c][m][1].double() @ updates[c][m][0].double() for m in modules} for c in clients}
    if consistency and len(clients) - len(flagged) >= 3:
        ok = [c for c in clients if c not in flagged]
        flat = {c: torch.cat([deltas[c][m].flatten() for m in modules]) for c in clients}
        norms = {c: float(flat[c].norm()) for c in clients}
        med = statistics.median(norms[c] for c in ok)
        for c in clients:
            # the median of its cosines with the others: robust to a minority of bad updates among them
            scores[c]["cosine"] = statistics.median(_cos(flat[c], flat[j]) for j in ok if j != c)
            scores[c]["norm_ratio"] = norms[c] / med if med > 0 else 0.0
        typical = statistics.median(scores[c]["cosine"] for c in clients)
        floor = cosine_ratio * typical if typical > 0 else 0.0  # no agreement to measure against: sign only
        flagged |= {c for c in clients if scores[c]["cosine"] < floor or scores[c]["norm_ratio"] > max_norm_ratio}
    benign = [c for c in clients if c not in flagged]
    result = {"flagged": sorted(flagged), "scores": scores, "benign": benign, "subspace": {}, "refined": {}}
    if not benign:
        return result
    wsum = sum(weights[c] for c in benign)
    for m in modules:
        mean = sum((weights[c] / wsum) * deltas[c][m] for c in benign)
        low = torch.cat([lows[m][clients.index(c)] for c in benign], dim=1)
        u, s, _ = torch.linalg.svd(low, full_matrices=False)
        keep = s > 1e-3 * float(s[0]) if s.numel() and float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
        basis = u[:, keep]
        result["subspace"][m] = basis
        off = mean - basis @ (basis.T @ mean)
        for c in benign:
            d = deltas[c][m]
            result["refined"].setdefault(c, {})[m] = basis @ (basis.T @ d) + off
    return result


@register
class CLAIR:
    name = "clair"
    Settings = ClairSettings
    personalised = True
    personal_fallback = "global"  # a client with no refined adapter (never trained, or flagged) uses the global one

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return capacity_plan(capacity, ctx)

    start_factors = staticmethod(own_or_global)

    def aggregate(self, global_factors, contributions: Sequence[Contribution], ctx, state):
        cfg = ctx.settings
        # what each client started from (what it was sent: its own adapter, or the global slice)
        starts = {c.client: own_or_global(c.client, global_factors, c.plan, state) for c in contributions}
        res = clair_round({c.client: round_change(c.factors, starts[c.client]) for c in contributions},
                          {c.client: c.weight for c in contributions},
                          cfg.lam_scale, cfg.threshold, cfg.consistency, cfg.cosine_ratio, cfg.max_norm_ratio,
                          cfg.side)
        detection = {"flagged": res["flagged"],
                     "scores": {c: {k: round(v, 4) for k, v in s.items()} for c, s in res["scores"].items()}}
        alone = alone_at_top_rank({c.client: c.plan.rank for c in contributions}, res["flagged"])
        if alone:
            detection["caution"] = alone
        record = {"detection": detection}
        if not res["benign"]:
            return global_factors, record
        personal = state.setdefault("personal", {})
        by_client = {c.client: c for c in contributions}
        for c, refined in res["refined"].items():
            rank = by_client[c].plan.rank
            personal[c] = {m: _refactor(_product(starts[c][m]) + d, rank, global_factors[m][0])
                           for m, d in refined.items()}
        for c in res["flagged"]:
            personal.pop(c, None)
        # Σ_C p_j (start_j + Δ̃_j) = Σ_C p_j (start_j + Δ_j): the benign clients' adapters, averaged
        benign = [c for c in contributions if c.client in res["benign"]]
        return {m: tuple(t.to(torch.float32) for t in
                         product_svd_factors(*stacked_factors(benign, m, torch.float64), ctx.max_rank, fill_a=a))
                for m, (a, _) in global_factors.items()}, record


def alone_at_top_rank(ranks: dict[str, int], flagged: Sequence[str]) -> str | None:
    """A caution when a flagged client holds a rank above every other client's: the directions only
    it trains have no company in the decomposition and read as its own sparse block, contaminated
    or not (on tiny-llama a lone rank-4 client among ranks 1-2 scored 0.65, its peers below 0.05;
    with a second rank-4 client both scored below 0.2).  Such a flag needs company at that rank or a
    look by hand."""
    if len(ranks) < 2:
        return None
    top = max(ranks.values())
    holders = [c for c, r in ranks.items() if r == top]
    if len(holders) != 1 or holders[0] not in flagged:
        return None
    rest = max(r for c, r in ranks.items() if c != holders[0])
    return (f"{holders[0]} holds rank {top}, above every other client's (at most {rest}): the directions only it "
            "trains look like contamination to the decomposition, so its flag may come from its rank")


def round_change(factors, start) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the round's change ``B A − B0 A0`` as factors ``([A; A0], [B, −B0])``."""
    return {m: (torch.cat([a, start[m][0]]), torch.cat([b, -start[m][1]], dim=1)) for m, (a, b) in factors.items()}


def _product(ab: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ab[1].double() @ ab[0].double()


def _refactor(delta_w: torch.Tensor, rank: int, fill_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.to(torch.float32) for t in svd_factors(delta_w, rank, fill_a=fill_a))
