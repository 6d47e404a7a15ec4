"""FedLEASE (Wang, Bian, Zhang & Xu, NeurIPS 2025, "Adaptive LoRA Experts Allocation and
Selection for Federated Fine-Tuning", arXiv 2509.15087): clustered LoRA experts with an adaptive
top-M router.

1. **Warm-up** (``fedlease.warmup_rounds``): every sampled client trains one rank-``r`` LoRA
   (``r = lora.rank``) on its own data, continuing its own from round to round; nothing is
   averaged.
2. **Allocation**, once, when the last warm-up round is aggregated: the distance between clients
   ``i, j`` is ``(1/|L|) Σ_l (1 − cos(vec B_i^l, vec B_j^l))`` over the adapted layers (Eq. 2; a
   zero B has cosine 0); average-linkage agglomerative clustering on those distances for every
   ``k = 2..min(M_max, n−1)`` (``fedlease.max_experts``), and ``M`` is the ``k`` with the best
   silhouette (ties to the smaller ``k``).  Expert ``j`` starts as the mean of its cluster's
   warm-up LoRAs, A and B separately (Eq. 3); each cluster's router starts from ``nn.Linear``'s
   initialisation, drawn from the seed.
3. **Training**: a client of cluster ``j`` receives all M experts and its cluster's router, and
   trains expert ``j`` and the router with the other experts frozen in the forward pass (the
   routed layer is :mod:`fedlora_edge.edge_client.experts`: ``2M−1`` router slots, top-M, renormalised, the
   own expert always active).  It sends expert ``j`` and the router back.
4. **Aggregation**: each expert is the uniform mean of what this round's members of its cluster
   sent (the paper's mean; the official code's ``Server.aggregation`` is also uniform), the
   cluster's router likewise; an expert with no member this round keeps its value.

A client's personalised model (what its evaluation uses, saved under ``clients/<id>/model``) is
all M experts with its cluster's router.

Where this differs from the official code (``lei-wang-link/FedLEASE``), the paper is followed:
experts start as the cluster means (the code copies each client's warm-up LoRA into its own slot
and leaves the other slots freshly initialised), and the rank is ``lora.rank`` (the code hard-codes
4).  Added for a deployment, not in the paper: with ``clients_per_round`` below the fleet some
clients have not trained a warm-up LoRA when the clustering runs; the clustering uses those that
have, and a client first seen later trains a warm-up LoRA its first time and joins the expert
whose B is nearest by the same distance.  Fewer than 3 warm-up clients give one expert (the
silhouette needs ``2 ≤ k ≤ n−1``).

Planner mapping: the knob is fixed (every expert has rank ``r``, so that experts can be averaged);
a device must hold ``M_max`` experts in its forward pass and download them with a router
(``(2M−1)·n_in`` floats per layer, counted as rank-1 components' worth by :func:`router_rank`), and
the planner charges that worst case; a device whose capacity is below ``r`` is skipped.

Aggregation needs every update at once (the clustering compares them): a round keeps each
update's decoded factors.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedlora_edge.core.lora import DeviceSteps, Factors, to_state_dict, uniform_plan
from fedlora_edge.edge_client.experts import expert_key, init_router, mixture_of, router_key

from ..errors import ConfigError
from ..planner import Footprint
from .base import MethodContext, own_or_global, register


@dataclass(frozen=True)
class FedleaseSettings:
    """``fedlease:``: the warm-up, and the most experts the clustering may choose."""

    warmup_rounds: int = 2   # rounds of purely local single-LoRA training before the clients are clustered
    max_experts: int = 4     # M_max: the clustering tries k = 2..M_max experts and keeps the best silhouette

    def __post_init__(self):
        if self.warmup_rounds < 1:
            raise ConfigError("fedlease.warmup_rounds: must be at least 1")
        if self.max_experts < 2:
            raise ConfigError("fedlease.max_experts: must be at least 2 (the clustering tries k = 2..max_experts)")

CLUSTER_ROUTER = "cluster_router."


def b_distance(b_i: Mapping[str, torch.Tensor], b_j: Mapping[str, torch.Tensor]) -> float:
    """Eq. 2: the mean over adapted layers of ``1 − cos(vec B_i, vec B_j)`` (cosine 0 for a zero B)."""
    vals = []
    for m in sorted(b_i):
        x, y = b_i[m].flatten().double(), b_j[m].flatten().double()
        nx, ny = x.norm(), y.norm()
        vals.append(1.0 - (float(x @ y / (nx * ny)) if nx > 0 and ny > 0 else 0.0))
    return sum(vals) / len(vals)


def distance_matrix(bs: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    n = len(bs)
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = b_distance(bs[i], bs[j])
    return d


def average_linkage(dist: np.ndarray, k: int) -> list[int]:
    """Agglomerative clustering with average linkage on a precomputed distance matrix, merged
    down to ``k`` clusters; labels numbered by each cluster's first member."""
    clusters = [[i] for i in range(len(dist))]
    while len(clusters) > k:
        best: float | None = None
        pair: tuple[int, int] | None = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(dist[np.ix_(clusters[a], clusters[b])].mean())
                if best is None or link < best:
                    best, pair = link, (a, b)
        assert pair is not None, f"k must be at least 1, got {k}"
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    labels = [0] * len(dist)
    for j, members in enumerate(sorted(clusters)):
        for i in members:
            labels[i] = j
    return labels


def silhouette(dist: np.ndarray, labels: Sequence[int]) -> float:
    """The mean silhouette coefficient for precomputed distances (a singleton scores 0)."""
    lab = np.asarray(labels)
    scores = []
    for i in range(len(lab)):
        same = (lab == lab[i]) & (np.arange(len(lab)) != i)
        if not same.any():
            scores.append(0.0)
            continue
        a = dist[i, same].mean()
        b = min(dist[i, lab == other].mean() for other in set(lab.tolist()) if other != lab[i])
        scores.append(0.0 if max(a, b) == 0 else (b - a) / max(a, b))
    return float(np.mean(scores))


def choose_experts(dist: np.ndarray, max_experts: int) -> tuple[list[int], int, dict[int, float]]:
    """``(labels, M, silhouette per k)``: the clustering with the best silhouette over
    ``k = 2..min(max_experts, n−1)``; one cluster when ``n < 3``."""
    n = len(dist)
    if n < 3:
        return [0] * n, 1, {}
    scores, labels = {}, {}
    for k in range(2, min(max_experts, n - 1) + 1):
        labels[k] = average_linkage(dist, k)
        scores[k] = silhouette(dist, labels[k])
    best = max(scores, key=lambda k: (scores[k], -k))
    return labels[best], best, scores


def adjusted_rand_index(a: Sequence, b: Sequence) -> float:
    """How well two labelings of the same items agree, 1 for identical partitions, about 0 by chance."""
    from math import comb

    ua, ub = sorted(set(a)), sorted(set(b))
    table = np.array([[sum(1 for x, y in zip(a, b) if x == p and y == q) for q in ub] for p in ua])
    index = sum(comb(int(v), 2) for v in table.flatten())
    rows, cols = sum(comb(int(v), 2) for v in table.sum(1)), sum(comb(int(v), 2) for v in table.sum(0))
    total = comb(len(a), 2)
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))


def router_rank(ctx: MethodContext, m: int) -> int:
    """The routers' size in rank-1 components' worth: ``(2M−1)·n_in`` floats per module against
    ``n_in + n_out`` per component, over all adapted modules, rounded up."""
    router = sum((2 * m - 1) * n for n, _ in ctx.modules.values())
    return math.ceil(router / sum(n + o for n, o in ctx.modules.values()))


@register
class FedLEASE:
    name = "fedlease"
    Settings = FedleaseSettings
    plain_plans = False  # its plans route experts
    personalised = True
    global_model = False  # the experts, not one adapter, are the model
    knob = "expert rank (lora.rank)"

    def check_config(self, cfg) -> None:
        if run_settings(cfg).warmup_rounds >= cfg.rounds:
            raise ConfigError(f"fedlease.warmup_rounds: ({run_settings(cfg).warmup_rounds}) must be below rounds "
                              f"({cfg.rounds}), or no round trains the experts")

    def global_rank(self, ctx: MethodContext) -> int:
        return ctx.rank  # the warm-up's common initialisation

    def footprint(self, ctx: MethodContext) -> Footprint:
        m = ctx.settings.max_experts
        return Footprint(down_rank=m * ctx.rank + router_rank(ctx, m), hold_rank=m * ctx.rank)

    def plan(self, client, capacity, ctx, round_idx, state=None):
        r = ctx.rank
        if capacity < r:
            return None
        st = (state or {}).get("fedlease", {})
        clusters = st.get("clusters")
        if clusters and client in clusters:
            return uniform_plan(ctx.modules, r, ctx.scale, **DeviceSteps(experts=(st["experts"], clusters[client])).to_extra())
        extra: dict[str, object] = {"phase": "warmup"}
        if not clusters and round_idx >= ctx.settings.warmup_rounds:
            extra["cluster_after"] = True
        return uniform_plan(ctx.modules, r, ctx.scale, **extra)

    def start_factors(self, client, global_factors, plan, state):
        mix = mixture_of(plan)
        if mix is None:
            return own_or_global(client, global_factors, plan, state)
        t = state["tensors"]
        return {m: (t[expert_key(mix[1], m, "A")].clone(), t[expert_key(mix[1], m, "B")].clone())
                for m in plan.modules}

    def start_extras(self, client, plan, state):
        mix = mixture_of(plan)
        if mix is None:
            return {}
        m_count, own = mix
        t = state["tensors"]
        out = {}
        for m in plan.modules:
            for j in range(m_count):
                if j != own:
                    out[expert_key(j, m, "A")] = t[expert_key(j, m, "A")]
                    out[expert_key(j, m, "B")] = t[expert_key(j, m, "B")]
            out[router_key(m)] = t[f"{CLUSTER_ROUTER}{own}.{m}"]
        return out

    def personal_model(self, client, ctx, state):
        st = state.get("fedlease", {})
        clusters = st.get("clusters") or {}
        if client in clusters:
            plan = uniform_plan(ctx.modules, ctx.rank, ctx.scale,
                                **DeviceSteps(experts=(st["experts"], clusters[client])).to_extra())
            tensors = {**to_state_dict(self.start_factors(client, None, plan, state)),
                       **self.start_extras(client, plan, state)}
            return plan, tensors, ("cluster", clusters[client])
        own = state.get("personal", {}).get(client)
        if own is None:
            return None
        return uniform_plan(ctx.modules, ctx.rank, ctx.scale), to_state_dict(own), None

    def summary(self, state):
        """For the report: the experts chosen, each client's expert, the silhouette per k."""
        st = state.get("fedlease", {})
        return {"experts": st.get("experts"), "clusters": st.get("clusters"), "silhouette": st.get("silhouette")}

    def aggregate(self, global_factors, contributions, ctx, state):
        personal = state.setdefault("personal", {})
        st = state.setdefault("fedlease", {})
        tensors = state.setdefault("tensors", {})
        warm = [c for c in contributions if mixture_of(c.plan) is None]
        for c in warm:
            personal[c.client] = c.factors
        by_expert: dict[int, list] = {}
        for c in contributions:
            mix = mixture_of(c.plan)
            if mix is not None:
                by_expert.setdefault(mix[1], []).append(c)
        for j, members in by_expert.items():
            for m in ctx.modules:
                set_expert(tensors, j, m, [c.factors[m] for c in members])
                tensors[f"{CLUSTER_ROUTER}{j}.{m}"] = torch.stack([c.extras[router_key(m)] for c in members]).mean(0)
        record: dict = {}
        if not st.get("clusters") and any(c.plan.extra.get("cluster_after") for c in warm):
            record["allocation"] = allocate(state, ctx)
        elif st.get("clusters"):
            for c in warm:
                if c.client not in st["clusters"]:
                    record.setdefault("joined", {})[c.client] = join_nearest(state, ctx, c.client, c.factors)
        return global_factors, record


def set_expert(tensors: dict, j: int, module: str, factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Expert ``j`` of ``module`` := the uniform mean of the given (A, B), A and B separately."""
    tensors[expert_key(j, module, "A")] = torch.stack([a for a, _ in factors]).mean(0)
    tensors[expert_key(j, module, "B")] = torch.stack([b for _, b in factors]).mean(0)


def allocate(state: dict, ctx: MethodContext) -> dict:
    """Cluster the clients with a warm-up LoRA, and start each cluster's expert and router; returns
    the allocation (for the round's record)."""
    personal, st, tensors = state["personal"], state["fedlease"], state["tensors"]
    ids = sorted(personal)
    dist = distance_matrix([{m: personal[cid][m][1] for m in ctx.modules} for cid in ids])
    labels, m_count, scores = choose_experts(dist, ctx.settings.max_experts)
    st.update({"clusters": {cid: int(j) for cid, j in zip(ids, labels)}, "experts": m_count,
               "silhouette": {str(k): round(v, 4) for k, v in scores.items()}})
    # its own stream: seeded with the run's seed alone it would replay the warm-up's initial A
    gen = torch.Generator().manual_seed(int(hashlib.sha256(f"fedlease-router|{ctx.seed}".encode()).hexdigest()[:8], 16))
    for j in range(m_count):
        members = [cid for cid, lab in zip(ids, labels) if lab == j]
        for m in sorted(ctx.modules):
            set_expert(tensors, j, m, [personal[cid][m] for cid in members])
            tensors[f"{CLUSTER_ROUTER}{j}.{m}"] = init_router(ctx.modules[m][0], m_count, gen)
    for cid in ids:  # the warm-up LoRAs live on in the experts
        del personal[cid]
    return {"experts": m_count, "clusters": dict(st["clusters"]), "silhouette": dict(st["silhouette"])}


def join_nearest(state: dict, ctx: MethodContext, client: str, factors: Factors) -> int:
    """A client first seen after the allocation joins the expert whose B is nearest to its warm-up B;
    returns that expert."""
    st, tensors = state["fedlease"], state["tensors"]
    mine = {m: factors[m][1] for m in ctx.modules}
    dists = [b_distance(mine, {m: tensors[expert_key(j, m, "B")] for m in ctx.modules}) for j in range(st["experts"])]
    st["clusters"][client] = int(np.argmin(dists))
    state["personal"].pop(client, None)
    return st["clusters"][client]


def run_settings(cfg) -> FedleaseSettings:
    return cfg.method_settings["fedlease"]
