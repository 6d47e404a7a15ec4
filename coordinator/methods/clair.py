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
   needs no rank, only ``λ``): ``min ‖L‖_* + Σ_k λ_k ‖S_k‖_F  s.t.  Y = L + S``, ``Y`` scaled to unit
   Frobenius norm, solved by the inexact augmented Lagrangian method (ADMM: singular-value
   thresholding for ``L``, block soft-thresholding per client for ``S``; Lin, Chen & Ma 2010).
   The paper's single ``λ`` is one weight per client here, ``λ_k = clair.lam_scale ·
   sqrt(min(ρ_k, ρ̄))`` with ``ρ_k`` the block's stable rank and ``ρ̄`` the mean
   (:func:`block_lambda` says why: with one weight, a low-rank outlier among higher ranks stays in
   ``L``).
3. **What is judged, and rank** (``clair.reach``, on by default; not from the paper).  A rank-r
   client starts from an adapter ``B0 A0`` whose A has r rows, and its change
   ``Δ_k = (B − B0) A0 + B (A − A0)`` lies in the span of those rows (its *reach*) except for
   what A's own step moves: whatever B it learns on its own A rows is what LoRA lets it do.
   Judged whole, a rank-32 update among rank-2 and rank-3 ones has 29 directions that no other
   client can move, which the decomposition reads as that client's own sparse block: honest
   top-rank clients were flagged (in generated rounds of 4 drawn from ``spread10``'s ranks, half
   of the rank-32 updates; on SmolLM2, 53-85 %), while rounds of 10 flagged none.  So, with
   ``clair.side: input``, the decomposition runs on each update's part **off its own reach**,
   ``(I − Q_k Q_kᵀ) Y_k`` (``Q_k`` an orthonormal basis of the rows of the A the client started
   from, the server's own copy).  For an honest client that part is A's step along the inputs: a
   minority of the update (8-29 % of its norm on SmolLM2, ``spread10``, 20 rounds, growing with
   the rounds), and alike between clients that see alike inputs.  For an update with rows of
   its own (a random or crafted A) it is most of the update.  Every client is judged so, whatever
   its rank and the round's size: a client alone at its rank, or in directions no other client
   reaches, is judged only on what it moved off its own rows, where the others' A steps give the
   comparison, and the record says how much that leaves aside: ``in_reach``, the share of its
   update inside its own rows (not judged by the decomposition), and ``unshared``, the share in
   directions of its rows that no other client of the round reaches.  With ``clair.side:
   output`` nothing bounds a client's column space (B moves freely), so the whole update is
   judged, as with ``clair.reach: false``.

   Client ``k``'s score is the share of its update in the sparse part over all adapted matrices,
   ``sqrt(Σ ‖S_k‖²) / sqrt(Σ ‖Y_k‖²)`` (``Y_k`` the whole update, also when only its part off
   its reach was decomposed); it is flagged when the score exceeds ``clair.threshold``.  A
   block-sparse test cannot see an attack that stays in the subspace (a
   sign-flipped or scaled copy of a benign update has the same subspace; so has a random ``B``
   on the start's ``A``, which is what a random update of a LoRA adapter mostly is), so a second
   check, **not from the paper** and switched by ``clair.consistency``, also flags a client whose
   update points away from the others' or is far larger, each judged against the fleet's own
   spread with medians and median absolute deviations (:func:`consistency_check`:
   ``clair.z`` robust spreads, 3.5 by default; a norm bar of at least ``clair.max_norm_ratio``).
   Honest clients of a non-IID fleet point their own ways, and then nobody is flagged for it.
   It needs a fleet of 8 clients, 5 of them unflagged, to measure a spread (with 6, a non-IID
   fleet's spread came out too narrow); in a smaller one only the decomposition judges, and
   in-subspace attacks are out of its reach.

   Out of reach of this detector, and of any that sees only updates: an update that looks like
   an honest client's.  Shuffled or backdoored data trained honestly gives such updates; so does
   the honest mean minus a small multiple of the honest spread (``mean_ksigma``), a negated
   update when the honest clients do not agree beyond their spread, and one scaled to just under
   the norm bar; with ``clair.reach``, any update that stays on its own A rows (a random or
   crafted B on them) leaves the decomposition nothing to judge, and only the consistency check
   sees it.  The tests (tests/test_clair_fleets.py) hold the targets on generated updates: at most
   1 % of honest updates flagged in LoRA-shaped rounds of 4, 10 and 40 drawn from spread ranks
   (round 1 and later rounds, one task or each client its own), none in clean fleets of the
   model's own shape, off-subspace updates caught at precision and recall >= 0.95;
   docs/results.md measures the rest on SmolLM2.  Where the reach rule gives way: when A's step
   carries a large share of honest updates (a global B far larger than its A step, clients whose
   inputs differ), their parts off their rows differ from client to client and low-rank clients
   are flagged (``python bench/clair_detection.py --only limit``).
4. ``Û``: the left singular vectors of ``L̂`` restricted to the benign clients (with
   ``clair.reach``, ``L̂_k`` is the low-rank part of the judged block plus the part inside the
   client's own rows), with singular value above 1e-3 of the largest.  Benign client ``k``'s refined change is
   ``Δ̃_k = Û Ûᵀ Δ_k + (I − Û Ûᵀ) Σ_{j∈C} p_j Δ_j``; its own adapter becomes ``B0_k A0_k + Δ̃_k``
   refactored to its rank by SVD (what it starts from next time and what its evaluation uses).
   The global adapter is the benign clients' adapters averaged, ``Σ_{j∈C} p_j B_j A_j``,
   refactored to rank R: flagged clients do not touch it.  Iterated every round (the abstract
   reads one-shot; a federated run is many rounds).

The thresholds' defaults come from generated fleets (the tests) and tiny-llama runs with 2 of 8
clients contaminated; what they catch on SmolLM2, beside the standard defences, is measured in
docs/results.md ("Robust aggregation under attack").

Planner mapping: as FlexLoRA, rank ``r_k = min(capacity_k, R)``.  The report lists, per round, the
flagged clients and every client's scores.

Heterogeneous ranks: with ``clair.reach`` (step 3) a client's rank sets only what is left out of
its judgement, its own A rows.  Judged whole (``clair.reach: false`` or ``clair.side: output``), a
client alone above every other's rank has directions with no company that read as its own sparse
block, so it is flagged though benign (on tiny-llama, :func:`alone_at_top_rank`); the round's
record then carries a ``caution`` that says so.

Aggregation needs every update at once (the decomposition is over the whole fleet's updates): a
round keeps each update's decoded factors.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypedDict

import torch

from ..aggregate import Contribution, product_svd_factors, stacked_factors, svd_factors
from ..errors import ConfigError
from .base import capacity_plan, own_or_global, register


@dataclass(frozen=True)
class ClairSettings:
    """``clair:``: the decomposition's weight and the detection thresholds."""

    side: str = "input"            # the shared subspace: input (row space of ΔW = BA) or output (column space)
    lam_scale: float = 0.75        # a client's weight on the block-sparse part: this × sqrt(its stable rank, capped at the mean)
    threshold: float = 0.5         # flag a client whose update is more than this share block-sparse
    consistency: bool = True       # also flag updates that point away or are far larger (not in the paper)
    z: float = 3.5                 # ... by more than this many robust spreads of the fleet's own (pointing away: and cosine < 0)
    max_norm_ratio: float = 3.0    # ... and a norm above at least this multiple of the unflagged median
    reach: bool = True             # judge only what lies off each client's own A rows (side input); false: the whole update

    def __post_init__(self):
        if self.side not in ("input", "output"):
            raise ConfigError("clair.side: must be 'input' or 'output'")
        if not self.lam_scale > 0:
            raise ConfigError("clair.lam_scale: must be positive")
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError("clair.threshold: must be in (0, 1)")
        if not self.z > 0:
            raise ConfigError("clair.z: must be positive (robust spreads, 3.5 by default)")
        if not self.max_norm_ratio > 1.0:
            raise ConfigError("clair.max_norm_ratio: must be above 1")
        if not isinstance(self.reach, bool):
            raise ConfigError("clair.reach: must be true or false")


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
    """Each block's weight ``λ_k = lam_scale · sqrt(min(ρ_k, ρ̄))``: ``ρ_k = (‖Y_k‖_* / ‖Y_k‖_F)²``
    its stable rank, ``ρ̄`` the blocks' mean.

    A block off the others' subspace costs up to ``‖Y_k‖_* = sqrt(ρ_k)·‖Y_k‖_F`` in ``L`` and
    ``λ_k·‖Y_k‖_F`` in ``S``, so ``λ_k`` must stay below ``sqrt(ρ_k)`` for it to go to ``S``; a
    block inside the shared subspace adds far less to ``‖L‖_*`` and stays there.  One weight for
    all, ``lam_scale · sqrt(ρ̄)``, let a rank-1 or rank-2 outlier among higher ranks (``ρ_k < ρ̄``)
    cost less in ``L`` than in ``S`` and pass unseen: its own stable rank caps its weight.  The
    cap is one way only: a block of high stable rank (a random update, in real adapters whose
    honest updates are dominated by a few directions) keeps the common weight, as its marginal cost
    in ``L`` is below ``sqrt(ρ_k)·‖Y_k‖_F`` once the fleet's blocks fill the input space.  On
    generated fleets (4 to 32 clients, ranks 1 to 16, noise up to 20%; tests/test_clair_fleets.py)
    and tiny-llama runs ``lam_scale`` 0.75 holds; it is the default."""
    rhos = []
    for blk in blocks:
        fro = float(blk.norm())
        rhos.append((float(torch.linalg.matrix_norm(blk, ord="nuc")) / fro) ** 2 if fro > 0 else 1.0)
    mean = sum(rhos) / len(rhos) if rhos else 1.0
    return [lam_scale * math.sqrt(min(r, mean)) for r in rhos]


MAD_TO_SD = 1.4826  # a normal sample's standard deviation over its median absolute deviation
MIN_FLEET, MIN_SPREAD = 8, 5  # the consistency check needs this many clients, and this many of them unflagged
MIN_AWAY = 0.05     # pointing away needs a cosine below minus this, whatever the spread


def robust_spread(values: Sequence[float]) -> tuple[float, float]:
    """``(median, 1.4826 · median absolute deviation)``: a centre and a scale that a minority of
    outliers cannot move."""
    med = statistics.median(values)
    return med, MAD_TO_SD * statistics.median(abs(v - med) for v in values)


def rank_trend(log_norms: dict[str, float], log_ranks: dict[str, float], ok: Sequence[str]) -> float:
    """The slope of log norm on log rank among ``ok`` (Theil-Sen: the median of the pairwise
    slopes, robust to a minority of odd clients), kept in [0, 1]; 0 when every rank is the same."""
    slopes = [(log_norms[c] - log_norms[d]) / (log_ranks[c] - log_ranks[d])
              for i, c in enumerate(ok) for d in ok[i + 1:] if log_ranks[c] != log_ranks[d]]
    return min(1.0, max(0.0, statistics.median(slopes))) if slopes else 0.0


def consistency_check(flat: dict[str, torch.Tensor], ok: Sequence[str], z: float, max_norm_ratio: float,
                      ranks: dict[str, int] | None = None) -> tuple[dict[str, dict[str, float]], set[str]]:
    """The in-subspace check (not from the paper): per client, its ``cosine`` (the median of its
    cosines with the unflagged others) and ``norm_ratio`` (its norm over their median), and the
    clients it flags.  Both are judged against the fleet's own spread, measured on the unflagged
    clients ``ok`` with medians and median absolute deviations (robust to a minority of bad ones):

    - *pointing away*: a cosine below ``-MIN_AWAY`` (-0.05) **and** more than ``z`` spreads below
      the typical one.  Late in a run every client's update is nearly orthogonal to the others'
      (cosines within ±0.06 by round 5 on SmolLM2), the spread shrinks with them, and an honest
      client at -0.01 would stand out; an update that close to orthogonal moves the average by
      almost nothing along it, flagged or not.  The
      spread is the larger of the clients' cosines' and of the pairwise cosines' among the agreeing
      half of ``ok`` (those at or above the typical cosine; a minority of bad clients cannot be all
      of it): whether one honest client may point against another is a property of the fleet, and
      a client is flagged only when its agreement with the others is further out than a pair's.  Honest
      clients of a non-IID fleet point their own ways (typical cosine near 0, a wide spread): nobody
      is flagged, and a sign-flipped update is then one more direction among theirs;
    - *far larger*: a norm above ``max_norm_ratio`` times the median for its rank, or above
      ``exp(z · s)`` times it when the fleet's norms spread more (``s`` the robust spread of the
      log-norms): a wide honest spread widens the bar, never narrows it below the ratio.  "For its
      rank": with ``ranks``, log norms are first compared along the fleet's own trend with log rank
      (:func:`rank_trend`; higher ranks train larger updates), so a low-rank client scaled up
      stands out against its rank, not against the whole fleet's spread.
    """
    def cosine(c: str, d: str) -> float:
        den = float(flat[c].norm() * flat[d].norm())
        return float((flat[c] * flat[d]).sum()) / den if den > 0 else 0.0

    pair: dict[tuple[str, str], float] = {}
    for i, c in enumerate(ok):
        for d in ok[i + 1:]:
            pair[c, d] = pair[d, c] = cosine(c, d)
    cos = {c: statistics.median(pair[c, d] if c in ok else cosine(c, d) for d in ok if d != c) for c in flat}
    norms = {c: max(float(flat[c].norm()), 1e-300) for c in flat}
    typical, spread = robust_spread([cos[c] for c in ok])
    core = [c for c in ok if cos[c] >= typical]  # the agreeing half: a minority of bad ones cannot be in it
    _, pair_spread = robust_spread([pair[c, d] for i, c in enumerate(core) for d in core[i + 1:]] or [0.0])
    spread = max(spread, pair_spread)
    log_n = {c: math.log(norms[c]) for c in flat}
    log_r = {c: math.log((ranks or {}).get(c, 1)) for c in flat}
    slope = rank_trend(log_n, log_r, ok)
    resid = {c: log_n[c] - slope * log_r[c] for c in flat}
    centre, log_spread = robust_spread([resid[c] for c in ok])
    bar = max(max_norm_ratio, math.exp(z * log_spread))
    scores, flagged = {}, set()
    for c in flat:
        ratio = math.exp(resid[c] - centre)
        scores[c] = {"cosine": cos[c], "norm_ratio": ratio}
        if (cos[c] < -MIN_AWAY and cos[c] < typical - z * spread) or ratio > bar:
            flagged.add(c)
    return scores, flagged


def reach_basis(rows: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """An orthonormal basis (``n × k`` columns) of the span of ``rows``' rows (``r × n``); empty when
    they are all zero."""
    u, s, _ = torch.linalg.svd(rows.T.to(torch.float64), full_matrices=False)
    return u[:, s > tol * float(s[0])] if s.numel() and float(s[0]) > 0 else u[:, :0]


def unshared_bases(bases: dict[str, torch.Tensor], tol: float = 1e-6) -> dict[str, torch.Tensor]:
    """Per client, an orthonormal basis of the directions of its reach that no other client reaches:
    ``range((I − P_{O_k}) Q_k)`` with ``Q_k`` its reach's basis and ``O_k`` the span of the others'
    (a rank-32 client among rank-2 ones: its components 3-32).  Only reported, not judged on."""
    out = {}
    for c, q in bases.items():
        others = [bases[d] for d in bases if d != c and bases[d].shape[1]]
        if others:
            o = reach_basis(torch.cat(others, dim=1).T)
            q = q - o @ (o.T @ q)
        u, s, _ = torch.linalg.svd(q, full_matrices=False)
        out[c] = u[:, s > tol]
    return out


class ClairResult(TypedDict):
    """What :func:`clair_round` finds in a round."""

    flagged: list[str]                            # the clients set aside, sorted
    scores: dict[str, dict[str, float]]           # client -> sparse_share (and in_reach, unshared)
    benign: list[str]                             # the others, in client order
    subspace: dict[str, torch.Tensor]             # module -> the shared subspace's basis Û
    refined: dict[str, dict[str, torch.Tensor]]   # benign client -> module -> its refined change Δ̃


def clair_round(updates: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], weights: dict[str, float],
                lam_scale: float = 0.75, threshold: float = 0.5, consistency: bool = True, z: float = 3.5,
                max_norm_ratio: float = 3.0, side: str = "input",
                reach: dict[str, dict[str, torch.Tensor]] | None = None) -> ClairResult:
    """The numeric core: ``updates[client][module] = (A, B)``, each client's change in factors.
    Returns ``{"flagged", "scores", "benign", "subspace" (module -> Û), "refined" (client -> module
    -> Δ̃)}``.  ``side="output"``: the shared subspace is a column space of ``Δ = BA``; ``"input"``: a
    row space (computed on ``Δᵀ = AᵀBᵀ`` and transposed back).

    ``reach[client][module]``: rows whose span is where the client's plan lets it move on that side
    (with ``side="input"``: the A it started from, ``r_k × n``).  Given, the decomposition runs on
    each update's part off its own reach, ``(I − Q_k Q_kᵀ) Y_k``, the score stays ``‖S_k‖ / ‖Y_k‖``
    over the whole update, and the scores add ``in_reach`` (the share of the update inside its reach,
    which the decomposition does not judge) and ``unshared`` (the share in directions of its reach
    that no other client in the round reaches).  ``None``: the whole update is judged."""
    if side not in ("input", "output"):
        raise ValueError(f"side must be 'input' or 'output', not {side!r}")
    if side == "input":
        flipped = {c: {m: (b.T, a.T) for m, (a, b) in f.items()} for c, f in updates.items()}
        res = clair_round(flipped, weights, lam_scale, threshold, consistency, z, max_norm_ratio, "output", reach)
        res["refined"] = {c: {m: d.T for m, d in f.items()} for c, f in res["refined"].items()}
        return res
    clients = sorted(updates)
    modules = sorted(next(iter(updates.values())))
    sparse2 = dict.fromkeys(clients, 0.0)
    total2 = dict.fromkeys(clients, 0.0)
    own2 = dict.fromkeys(clients, 0.0)
    unshared2 = dict.fromkeys(clients, 0.0)
    lows = {}
    for m in modules:
        blocks = [compress(*updates[c][m]) for c in clients]
        judged = blocks
        if reach is not None:
            bases = {c: reach_basis(reach[c][m]) for c in clients}
            alone = unshared_bases(bases)
            judged = [blk - bases[c] @ (bases[c].T @ blk) for c, blk in zip(clients, blocks)]
            for c, blk in zip(clients, blocks):
                own2[c] += float((bases[c].T @ blk).norm()) ** 2
                unshared2[c] += float((alone[c].T @ blk).norm()) ** 2
        if len(clients) > 1:
            low, sp = outlier_pursuit(judged, block_lambda(judged, lam_scale))
        else:
            low, sp = judged, [torch.zeros_like(judged[0])]
        # what was not judged (inside the client's own reach) belongs with the low-rank part
        lows[m] = [lo + (blk - j) for lo, blk, j in zip(low, blocks, judged)]
        for c, blk, s in zip(clients, blocks, sp):
            sparse2[c] += float(s.norm()) ** 2
            total2[c] += float(blk.norm()) ** 2

    def share(x: dict[str, float], c: str) -> float:
        return math.sqrt(x[c] / total2[c]) if total2[c] > 0 else 0.0

    scores = {c: {"sparse_share": share(sparse2, c)} for c in clients}
    if reach is not None:
        for c in clients:
            scores[c].update(in_reach=share(own2, c), unshared=share(unshared2, c))
    flagged = {c for c in clients if scores[c]["sparse_share"] > threshold}
    deltas = {c: {m: updates[c][m][1].double() @ updates[c][m][0].double() for m in modules} for c in clients}
    if consistency and len(clients) >= MIN_FLEET and len(clients) - len(flagged) >= MIN_SPREAD:
        ok = [c for c in clients if c not in flagged]
        flat = {c: torch.cat([deltas[c][m].flatten() for m in modules]) for c in clients}
        ranks = {c: max(a.shape[0] for a, _ in updates[c].values()) for c in clients}
        scores_c, moved = consistency_check(flat, ok, z, max_norm_ratio, ranks)
        for c in clients:
            scores[c].update(scores_c[c])
        flagged |= moved
    benign = [c for c in clients if c not in flagged]
    result: ClairResult = {"flagged": sorted(flagged), "scores": scores, "benign": benign, "subspace": {},
                           "refined": {}}
    if not benign:
        return result
    wsum = sum(weights[c] for c in benign)
    for m in modules:
        mean = sum((weights[c] / wsum) * deltas[c][m] for c in benign)
        stacked = torch.cat([lows[m][clients.index(c)] for c in benign], dim=1)
        u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
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
        # where each client's plan lets it move: the rows of the A it started from (input side only;
        # on the output side B moves freely, so nothing bounds a client's column space)
        reach = ({c: {m: a for m, (a, _) in f.items()} for c, f in starts.items()}
                 if cfg.reach and cfg.side == "input" else None)
        res = clair_round({c.client: round_change(c.factors, starts[c.client]) for c in contributions},
                          {c.client: c.weight for c in contributions},
                          cfg.lam_scale, cfg.threshold, cfg.consistency, cfg.z, cfg.max_norm_ratio,
                          cfg.side, reach)
        detection = {"flagged": res["flagged"], "judged": "off own reach" if reach else "whole update",
                     "scores": {c: {k: round(v, 4) for k, v in s.items()} for c, s in res["scores"].items()}}
        alone = None if reach else alone_at_top_rank({c.client: c.plan.rank for c in contributions}, res["flagged"])
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
    a, b = svd_factors(delta_w, rank, fill_a=fill_a)
    return a.to(torch.float32), b.to(torch.float32)
