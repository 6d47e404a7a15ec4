"""HAFL (Su, Yan & Deng, ICC 2025, "Federated LLMs Fine-tuned with Adaptive Importance-Aware
LoRA", arXiv 2411.06581 v1): importance-aware rank truncation or freezing, with rank-1 aggregation.

The server holds rank ``R = lora.max_rank``.  Client ``i`` trains its ``r_i = min(capacity_i, R)``
most important components per adapted matrix, ranked by importance scores that clients compute
while they train and send with their update (one float per scored component per matrix):

- ``hafl.variant: freeze`` (default; the paper's preferred scheme): every client holds all R
  components (downlink rank R), trains its top ``r_i`` and keeps the rest frozen in the forward
  pass; it scores all R (their gradients are computed, then zeroed).
- ``hafl.variant: truncate``: the client holds and trains only its top ``r_i`` (downlink ``r_i``)
  and scores those.

Uplink is the ``r_i`` trained components plus the scores.  Aggregation is per rank-1 component:
each component is averaged over the clients that trained it (data-size weights), a component
nobody trained keeps its value; unlike zero-padding, a component trained by few clients is not
diluted.  ``hafl.aggregation: zero_pad`` aggregates as HetLoRA does instead (every component
divided by every client's weight), with the same selection: a comparison of the two isolates the
aggregation rule, which is what the paper claims converges faster.

Planner mapping: the knob is ``r_i = min(capacity_i, R)``; for ``freeze`` the capacity is planned
with a rank-R download (every client receives all R components) and the memory and compute of a
rank-R adapter (the frozen components stay in the forward pass).

Reconstructed (only the abstract is public, and no official code was found):

- the score is AdaLoRA's smoothed sensitivity, per parameter ``s = Ī·Ū`` with
  ``Ī ← β1 Ī + (1−β1)|w·∂L/∂w|``, ``Ū ← β2 Ū + (1−β2)|I − Ī|`` (``hafl.beta1``/``beta2``, 0.85),
  and per component ``S_j = mean_i s(B[i,j]) + mean_i s(A[j,i])``, taken at the end of local
  training (``fedlora_edge.edge_client.partial``);
- whose scores rank a client's components: its own from the last round it reported them,
  falling back to the fleet's scores (the weighted mean of the latest reports per component) for
  components it has never scored;
- **every component is trained before importance ranks it** (``hafl.explore``, on by default):
  a component nobody has trained yet comes before every trained one, each client taking the
  untrained ones from its own starting place (a hash of its id), so that low-rank clients cover
  different components.  AdaLoRA trains every component in a warm-up before it prunes; without
  this, a component nobody trained scores exactly 0 (with ``B = 0`` both ``|w·∂L/∂w|`` of its B
  and ``∂L/∂A[j]`` vanish), so in a fleet without a rank-R client the low-rank clients would
  train round 1's components for ever.  With ``explore: false``, before any report all scores
  are 0 and ties go to the lower index (round 1 trains the first ``r_i`` components, as HetLoRA
  does), and the lock-in stays;
- rank-1 aggregation weights are data sizes.

Under ``privacy.dp`` (docs/privacy.md): the aggregate is DP-FedAvg's noised sum over the same
plans (each component over its expected trainers, or over the expected participants with
``zero_pad``); the devices send their scores scaled to norm 1, the coordinator noises their sum
(:class:`~fedlora_edge.coordinator.privacy.NoisedSum`) and :func:`summed_importance` keeps the
noised fleet scores and no device's own, so every plan ranks by the noised scores alone.

Aggregation streams: each update is folded into running sums as it is validated, then dropped
(:class:`~coordinator.methods.base.Averaging`), so a round holds adapter-sized sums whatever its
number of updates.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from fedlora_edge.core.lora import ClientPlan, DeviceSteps, ModulePlan

from ..aggregate import Contribution
from ..errors import ConfigError
from ..planner import Footprint
from .base import Averaging, MethodContext, global_copy, global_slice, register, trained_rank


@dataclass(frozen=True)
class HaflSettings:
    """``hafl:``: which variant, and the smoothing of the sensitivity scores."""

    variant: str = "freeze"   # freeze: all hold rank R, train the top r_i; truncate: hold and train the top r_i
    beta1: float = 0.85       # AdaLoRA's smoothing of the sensitivity I = |w·grad|
    beta2: float = 0.85       # and of its uncertainty |I − Ī|
    explore: bool = True      # components nobody trained yet come first (every one trained before it is ranked)
    aggregation: str = "rank1"  # rank1: each component over its trainers (the paper) | zero_pad: as HetLoRA

    def __post_init__(self):
        if self.variant not in ("freeze", "truncate"):
            raise ConfigError("hafl.variant: must be 'freeze' or 'truncate'")
        if self.aggregation not in ("rank1", "zero_pad"):
            raise ConfigError("hafl.aggregation: must be 'rank1' or 'zero_pad'")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"hafl.{name}: must be in [0, 1)")


def top_components(scores: list[float], r: int) -> tuple[int, ...]:
    """The ``r`` highest-scoring indices (ties to the lower index), in increasing order."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return tuple(sorted(order[:r]))


def selection(state: dict | None, client: str, module: str, total: int, r: int, explore: bool) -> tuple[int, ...]:
    """``client``'s ``r`` components of ``module``: with ``explore``, the components nobody has
    trained yet first (from a starting place of the client's own, so that clients spread over
    them), then the rest by importance; without it, by importance alone (:func:`top_components`)."""
    scores = ranking_scores(state, client, module, total)
    if not explore:
        return top_components(scores, r)
    trained = set((state or {}).get("importance", {}).get("trained", {}).get(module, []))
    start = int(hashlib.sha256(client.encode()).hexdigest()[:8], 16) % total
    order = sorted(range(total), key=lambda j: (j in trained, -scores[j] if j in trained else (j - start) % total, j))
    return tuple(sorted(order[:r]))


def ranking_scores(state: dict | None, client: str, module: str, total: int) -> list[float]:
    """The scores that rank ``client``'s components of ``module``: its own where it has scored the
    component, the fleet's current score elsewhere."""
    imp = (state or {}).get("importance", {})
    scores = list(imp.get("global", {}).get(module, [0.0] * total))
    for j, v in imp.get("clients", {}).get(client, {}).get(module, {}).items():
        scores[int(j)] = v
    return scores


@register
class HAFL:
    name = "hafl"
    Settings = HaflSettings
    plain_plans = False  # its plans score importance (and with freeze hold frozen components)
    dp_normalise = "trainers"  # under privacy.dp: DP-FedAvg over the same plans (dp_rule: by hafl.aggregation)

    def dp_rule(self, ctx: MethodContext) -> str:
        return "trainers" if ctx.settings.aggregation == "rank1" else "all"

    def fleet_importance(self, state: dict, scores: dict, trained: dict) -> None:
        summed_importance(state, scores, trained)

    def footprint(self, ctx: MethodContext) -> Footprint:
        if ctx.settings.variant == "freeze":
            return Footprint(down_rank=ctx.max_rank, hold_rank=ctx.max_rank)
        return Footprint()

    def plan(self, client, capacity, ctx, round_idx, state=None):
        big_r = ctx.max_rank
        r = trained_rank(capacity, ctx)
        if r < 1:
            return None
        st = ctx.settings
        modules = {m: ModulePlan(selection(state, client, m, big_r, r, st.explore)) for m in sorted(ctx.modules)}
        extra = {**DeviceSteps(importance=(st.beta1, st.beta2)).to_extra(), "variant": st.variant}
        if st.variant == "freeze":
            extra.update(DeviceSteps(hold=big_r, frozen="forward").to_extra())
        return ClientPlan(modules, ctx.scale, r, extra)

    def start_factors(self, client, global_factors, plan, state):
        starter = global_copy if plan.steps.hold is not None else global_slice
        return starter(client, global_factors, plan, state)

    def accumulator(self, global_factors, ctx, state):
        scored: list[Contribution] = []  # each contribution's scores and plan, without its factors

        def then(mean):
            update_importance(state, scored, ctx.max_rank)
            return mean

        return Averaging(global_factors, "trainers" if ctx.settings.aggregation == "rank1" else "all", then=then,
                         keep=lambda c: scored.append(dataclasses.replace(c, factors={})))


def update_importance(state: dict, contributions, total: int) -> None:
    """Record each contribution's scores as its client's own, and set the fleet's score of every
    component scored this round to the weighted mean of this round's scores (others keep theirs);
    record which components have been trained (``trained``: per module, sorted indices)."""
    imp = state.setdefault("importance", {"global": {}, "clients": {}})
    trained = imp.setdefault("trained", {})
    for c in contributions:
        for module, mp in c.plan.modules.items():
            trained[module] = sorted(set(trained.get(module, [])) | set(mp.components))
    sums: dict[str, list[float]] = {}
    weights: dict[str, list[float]] = {}
    for c in contributions:
        own = imp["clients"].setdefault(c.client, {})
        for module, scores in c.importance.items():
            idx = c.plan.scored(module)
            mine = own.setdefault(module, {})  # component index (a string: JSON keys) -> its latest score
            s, w = sums.setdefault(module, [0.0] * total), weights.setdefault(module, [0.0] * total)
            for j, v in zip(idx, scores.tolist()):
                mine[str(j)] = v
                s[j] += c.weight * v
                w[j] += c.weight
    for module, s in sums.items():
        g = imp["global"].setdefault(module, [0.0] * total)
        for j in range(total):
            if weights[module][j] > 0:
                g[j] = s[j] / weights[module][j]


def summed_importance(state: dict, scores: dict, trained: dict) -> None:
    """Where the coordinator sees only sums (``privacy.dp``, ``privacy.secure_aggregation``): set the
    fleet's score of every component scored this round to the round's mean (noised under DP; others
    keep theirs) and record as trained the components ``trained`` marks (> 0: under DP the plans'
    expected trainers, not who came).  No device's own scores are kept, so every plan ranks by the
    fleet's scores alone (:func:`ranking_scores` falls back to them)."""
    imp = state.setdefault("importance", {"global": {}, "clients": {}})
    done = imp.setdefault("trained", {})
    for module, e in trained.items():
        planned = [j for j, v in enumerate(e.tolist()) if v > 0]
        done[module] = sorted(set(done.get(module, [])) | set(planned))
    for module, values in scores.items():
        g = imp["global"].setdefault(module, [0.0] * len(values))
        for j, v in enumerate(values.tolist()):
            if v == v:  # not nan: scored this round
                g[j] = v
