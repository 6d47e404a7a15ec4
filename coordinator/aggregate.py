"""Aggregation over the rank-1 component view: pure functions on plain tensors.

A :class:`Contribution` is one client's trained factors for one round, the plan that says which
global components they are, and the client's aggregation weight (its example count).  No I/O, no
logging: these functions are what the methods' aggregation rules are made of.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedlora_edge.core.lora import ClientPlan, Factors


@dataclass(frozen=True)
class Contribution:
    client: str
    plan: ClientPlan
    factors: Factors
    weight: float
    importance: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> per-component scores (HAFL)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> tensor, e.g. FedLEASE's routers


def adam_step(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
              lr: float, betas: tuple[float, float], weight_decay: float = 0.0, eps: float = 1e-8) -> torch.Tensor:
    """One AdamW step (bias-corrected, decoupled weight decay) on ``param``; ``m``, ``v`` updated in place."""
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat, v_hat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    return param * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)


def server_step(old: Factors, aggregate: Factors, settings, state: dict) -> Factors:
    """The server optimiser's step (``server:`` in the config, :class:`~coordinator.config.ServerSettings`)
    from the global factors ``old`` and the round's ``aggregate``: the pseudo-gradient ``old − aggregate``
    to SGD (``old − lr·grad``, with momentum) or AdamW.  Its moments and step count live in ``state``
    (the method's state: ``state["tensors"]["server.*"]`` and ``state["server_step"]``, saved with
    the run).  A module whose shape changed (a method that re-sizes the global adapter) takes the
    aggregate as it is, and its moments start again."""
    if settings.optimizer == "none":
        return aggregate
    tensors = state.setdefault("tensors", {})
    step = int(state.get("server_step", 0)) + 1
    state["server_step"] = step
    out: Factors = {}
    for module, (na, nb) in aggregate.items():
        prev = old.get(module)
        if prev is None or prev[0].shape != na.shape or prev[1].shape != nb.shape:
            out[module] = (na, nb)
            for which in ("A", "B"):
                for k in ("m", "v"):
                    tensors.pop(f"server.{k}.{module}.{which}", None)
            continue
        oa, ob = prev
        new = []
        for which, g, agg in (("A", oa, na), ("B", ob, nb)):
            grad = g - agg
            m = tensors.get(f"server.m.{module}.{which}")
            if m is None or m.shape != g.shape:
                m = tensors[f"server.m.{module}.{which}"] = torch.zeros_like(g)
            if settings.optimizer == "sgd":
                if settings.momentum:
                    m.mul_(settings.momentum).add_(grad)
                    grad = m
                new.append(g - settings.lr * grad)
                continue
            v = tensors.get(f"server.v.{module}.{which}")
            if v is None or v.shape != g.shape:
                v = tensors[f"server.v.{module}.{which}"] = torch.zeros_like(g)
            new.append(adam_step(g, grad, m, v, step, settings.lr, tuple(settings.betas), settings.weight_decay))
        out[module] = (new[0], new[1])
    return out


class ComponentAverager:
    """:func:`average_components` as a running sum: :meth:`add` folds one contribution into
    per-component numerators and weight totals (then the contribution can be dropped),
    :meth:`result` gives the new factors.  Memory: three adapter-sized buffers, whatever the
    number of contributions.  The arithmetic per element is that of the one-shot loop, in the
    order the contributions are added, so the same order gives the same bits."""

    def __init__(self, global_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], normalise: str):
        if normalise not in ("trainers", "all"):
            raise ValueError(f"normalise must be 'trainers' or 'all', not {normalise!r}")
        self.global_factors = global_factors
        self.normalise = normalise
        self.total = 0.0
        self._num = {m: (torch.zeros_like(ga), torch.zeros_like(gb)) for m, (ga, gb) in global_factors.items()}
        self._z = {m: torch.zeros(ga.shape[0], dtype=ga.dtype) for m, (ga, _) in global_factors.items()}
        self._tmp: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # reused: no allocation per client

    def add(self, c: Contribution) -> None:
        for module, planned in c.plan.modules.items():
            if module in self.global_factors and max(planned.components) >= self.global_factors[module][0].shape[0]:
                raise ValueError(f"client {c.client}: plan trains component {max(planned.components)} of "
                                 f"'{module}', which has {self.global_factors[module][0].shape[0]}")
        self.total += c.weight
        for module, (ga, gb) in self.global_factors.items():
            mp = c.plan.modules.get(module)
            if mp is None:
                continue
            num_a, num_b = self._num[module]
            z = self._z[module]
            a, b = c.factors[module]
            if len(mp.components) == ga.shape[0] and list(mp.components) == list(range(ga.shape[0])):
                # the plan covers every component in order: no gather or scatter (the same
                # arithmetic as below, so the same bits)
                if module not in self._tmp:
                    self._tmp[module] = (torch.empty_like(ga), torch.empty_like(gb))
                for num, x, g, tmp in ((num_a, a, ga, self._tmp[module][0]), (num_b, b, gb, self._tmp[module][1])):
                    torch.sub(x, g, out=tmp)
                    num.add_(tmp.mul_(c.weight))
                z += float(c.weight)
                continue
            idx = torch.tensor(mp.components, dtype=torch.long)
            num_a.index_add_(0, idx, c.weight * (a - ga.index_select(0, idx)))
            num_b.index_add_(1, idx, c.weight * (b - gb.index_select(1, idx)))
            z.index_add_(0, idx, torch.full((len(idx),), float(c.weight), dtype=ga.dtype))

    @classmethod
    def from_sums(cls, global_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], normalise: str,
                  num: Mapping[str, tuple[torch.Tensor, torch.Tensor]], z: Mapping[str, torch.Tensor],
                  total: float) -> ComponentAverager:
        """An averager holding sums computed elsewhere (secure aggregation's): ``num`` the weighted
        changes, ``z`` the weight per component (0 where nobody trained), ``total`` the weight."""
        avg = cls(global_factors, normalise)
        avg._num = {m: (a.clone(), b.clone()) for m, (a, b) in num.items()}
        avg._z = {m: v.clone() for m, v in z.items()}
        avg.total = float(total)
        return avg

    def sums(self) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module, the weighted sums of the contributions' changes, ``Σ_k w_k (c_kj − c_j)``
        (zero for a component nobody trained): the numerators :meth:`result` divides."""
        return self._num

    def result(self) -> Factors:
        out: Factors = {}
        for module, (ga, gb) in self.global_factors.items():
            num_a, num_b = self._num[module]
            z = self._z[module]
            if self.normalise == "all":
                z = torch.where(z > 0, torch.full_like(z, float(self.total)), z)
            denom = torch.where(z > 0, z, torch.ones_like(z))
            out[module] = (ga + num_a / denom[:, None], gb + num_b / denom[None, :])
        return out


def average_components(global_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       contributions: Sequence[Contribution], normalise: str) -> Factors:
    """Per module and per global component ``j``, move the global value by the weighted client
    deltas of the clients that trained ``j``:

    ``c_j ← c_j + Σ_{k∈Q_j} w_k (c_{k,j} − c_j) / Z_j``,

    with ``Z_j = Σ_{k∈Q_j} w_k`` (``normalise="trainers"``: the per-index mean of HAFL and
    Fed-PLoRA; with every client training every component this is FedIT's weighted average) or
    ``Z_j = Σ_k w_k`` over all contributions (``normalise="all"``: HetLoRA's zero-padding, where
    a component trained by few clients moves only part of the way).  A component nobody trained
    keeps its value.  With no contribution the global factors are returned unchanged (copied).
    The one-shot form of :class:`ComponentAverager`.
    """
    avg = ComponentAverager(global_factors, normalise)
    for c in contributions:
        avg.add(c)
    return avg.result()


class OrderedFold:
    """A round's aggregation fed while the round runs, in a fixed order whatever the arrival order.

    ``order`` is the round's devices in assignment order.  ``offer(client, contribution, reload)``
    hands over a validated contribution: when it is the next in ``order`` it is folded into the
    method's accumulator at once (and so is every parked one that follows); otherwise it is
    *parked*: with a ``reload`` (a callable giving the contribution again, e.g. from the round's
    journal on disk) nothing of it stays in memory, without one it is kept until its turn.
    A reload that returns None (its copy on disk no longer reads) leaves the device out (``lost``).
    ``finish()`` folds what is parked, in order, skipping devices that sent nothing valid, and
    returns the accumulator's ``(factors, record)``.

    So the result depends on the set of contributions, never on the order they arrived in: the
    fold is the one-shot aggregation over the contributions in ``order``, bit for bit.
    """

    def __init__(self, accumulator, order: Sequence[str]):
        self.acc = accumulator
        self.order = list(order)
        self.pos = 0
        self.parked: dict = {}   # client -> Contribution (kept) or a reload callable
        self.folded: list[str] = []
        self.lost: list[str] = []  # parked, but its reload gave nothing back

    @property
    def count(self) -> int:
        """Contributions offered so far (folded or parked)."""
        return len(self.folded) + len(self.parked)

    @property
    def held(self) -> int:
        """Parked contributions kept in memory (those offered without a reload)."""
        return sum(isinstance(v, Contribution) for v in self.parked.values())

    def offer(self, client: str, contribution: Contribution, reload=None) -> None:
        if client not in self.order[self.pos:] or client in self.parked:
            raise ValueError(f"client {client}: not expected in this round's fold (already offered, or not assigned)")
        if client == self.order[self.pos]:
            self._fold(client, contribution)
            self._advance()
        else:
            self.parked[client] = reload if reload is not None else contribution

    def _fold(self, client: str, contribution: Contribution) -> None:
        self.acc.add(contribution)
        self.folded.append(client)
        self.pos += 1

    def _advance(self) -> None:
        while self.pos < len(self.order) and self.order[self.pos] in self.parked:
            client = self.order[self.pos]
            got = self.parked.pop(client)
            got = got if isinstance(got, Contribution) else got()
            if got is None:  # its reload failed (and said why): nothing of it is folded
                self.lost.append(client)
                self.pos += 1
                continue
            self._fold(client, got)

    def drain(self) -> None:
        """Fold everything parked, in order (the round is over: a device not offered sent nothing valid)."""
        while self.pos < len(self.order):
            if self.order[self.pos] in self.parked:
                self._advance()
            else:
                self.pos += 1

    def finish(self):
        self.drain()
        return self.acc.finish()


def weighted_delta_w(contributions: Sequence[Contribution], module: str) -> torch.Tensor:
    """``Σ_k p_k B_k A_k`` for one module with ``p_k = w_k / Σ w`` (the scale ``s`` left out)."""
    total = sum(c.weight for c in contributions)
    acc = None
    for c in contributions:
        a, b = c.factors[module]
        term = (c.weight / total) * (b @ a)
        acc = term if acc is None else acc + term
    if acc is None:
        raise ValueError("no contribution")
    return acc


def svd_factors(delta_w: torch.Tensor, rank: int, fill_a: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors of ``delta_w`` ordered by singular value: ``B = U Σ``, ``A = Vᵀ``.

    The first ``r`` components are then the best rank-``r`` approximation (Eckart-Young), which
    is what FlexLoRA sends a rank-``r`` client.  Components past ``rank(ΔW)`` have ``B = 0`` and
    an orthonormal ``A`` row, so they still train.  When ``rank`` exceeds ``min(m, n)`` the SVD has
    no more rows to give: those components take ``B = 0`` and their ``A`` row from ``fill_a`` (the
    previous global A), so they too keep receiving gradient.
    """
    u, s, vh = torch.linalg.svd(delta_w, full_matrices=False)
    k = min(rank, s.numel())
    b = torch.zeros((delta_w.shape[0], rank), dtype=delta_w.dtype)
    a = torch.zeros((rank, delta_w.shape[1]), dtype=delta_w.dtype)
    b[:, :k] = u[:, :k] * s[:k]
    a[:k] = vh[:k]
    if k < rank and fill_a is not None:
        a[k:] = fill_a[k:rank]
    return a, b


def stacked_factors(contributions: Sequence[Contribution], module: str,
                    dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_s, A_s)`` with ``B_s A_s = Σ_k p_k B_k A_k`` (``p_k = w_k / Σ w``): the clients' B
    factors side by side, each scaled by its weight, over their A factors stacked.  Their width
    ``Σ r_k`` bounds the rank of the weighted update."""
    total = sum(c.weight for c in contributions)
    if not contributions:
        raise ValueError("no contribution")
    bs = torch.cat([(c.weight / total) * c.factors[module][1].to(dtype or c.factors[module][1].dtype)
                    for c in contributions], dim=1)
    as_ = torch.cat([c.factors[module][0].to(dtype or c.factors[module][0].dtype) for c in contributions], dim=0)
    return bs, as_


def product_svd_factors(b: torch.Tensor, a: torch.Tensor, rank: int, fill_a: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`svd_factors` of ``b @ a`` without forming it where the inner width ``S`` is below
    ``min(m, n)``: with ``b = Q_b R_b`` and ``aᵀ = Q_a R_a`` (reduced QR), ``b a = Q_b (R_b R_aᵀ) Q_aᵀ``,
    so the SVD of the ``S x S`` core gives the exact singular triplets (``U = Q_b U_c``,
    ``V = Q_a V_c``).  Components past ``S`` (where ``rank > S``) take ``B = 0`` and orthonormal ``A``
    rows: ``fill_a``'s rows with the span of the others projected out.  Where ``S >= min(m, n)`` the
    product is formed in one matrix product and its SVD taken.  Singular vectors are defined up
    to sign, so compare products ``B[:, :r] A[:r]``, not factors, with the dense result."""
    m, width = b.shape
    n = a.shape[1]
    if width >= min(m, n):
        return svd_factors(b @ a, rank, fill_a)
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T)
    k = min(rank, width)
    out_b = torch.zeros((m, rank), dtype=b.dtype)
    out_a = torch.zeros((rank, n), dtype=a.dtype)
    out_b[:, :k] = (qb @ uc[:, :k]) * s[:k]
    out_a[:k] = (qa @ vch[:k].T).T
    if k < rank:
        if fill_a is None:
            fill = torch.eye(n, dtype=a.dtype)[: rank - k]
        else:
            fill = fill_a[k:rank].to(a.dtype)
        basis, _ = torch.linalg.qr(torch.cat([out_a[:k].T, fill.T], dim=1))
        out_a[k:] = basis[:, k:rank].T
    return out_a, out_b
