"""What a method is: the one interface every method implements, its defaults, the registry, and the
helpers methods share.

A method is a class in its own module under ``coordinator/methods/`` (or anywhere: a plugin module
loaded with ``--plugin`` or an installed entry point, :mod:`fedlora_edge.coordinator.plugins`) with a ``name``, a ``plan`` policy and an aggregation rule, and
whichever optional hooks of :class:`Method` it needs; what it leaves out takes the default written
there.  ``@register`` adds it to the registry under its ``name``.  Its settings, if any, are a frozen
dataclass ``Settings`` (validated in its ``__post_init__``, errors naming ``<section>.<field>``) that
the config loader reads from the YAML section ``section`` (default: the name with ``-`` as ``_``),
and ``--set <section>.<field>=...`` overrides; the method finds them as ``ctx.settings``.  Nothing
outside its module names the method.

The engine never calls a method's class directly: :func:`get_method` returns a :class:`Bound`,
which has every hook, the method's own or the default, so the defaults live in one place.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from fedlora_edge.core.lora import ClientPlan, Factors, ModulePlan, slice_factors, to_state_dict, uniform_plan

from ..aggregate import ComponentAverager, Contribution
from ..planner import NO_FOOTPRINT, Footprint

# the registry's names, imported from here by methods and plugins
from .registry import _REGISTRY, method_names, register, section_of, settings_classes, unregister  # noqa: F401


@dataclass(frozen=True)
class MethodContext:
    """What a method knows of the run: adapted module dims (in, out), scale, ranks, seed, and its
    own settings (an instance of its ``Settings``, or None when it has none)."""

    modules: Mapping[str, tuple[int, int]]
    scale: float
    rank: int       # the homogeneous rank (lora.rank)
    max_rank: int   # lora.max_rank
    seed: int = 0   # the run's seed: methods that draw at random (FSLoRA, Fed-PLoRA) draw from it
    settings: Any = None


class Method(Protocol):
    """Every hook a method may have.  ``name``, ``plan`` and ``aggregate`` are required; each other
    hook says its default, which is what :class:`Bound` uses when the method leaves it out."""

    name: ClassVar[str]
    Settings: ClassVar[type | None]   # default None: no settings (a frozen dataclass otherwise)
    section: ClassVar[str]            # default: name with "-" as "_"; the config section of Settings
    personalised: ClassVar[bool]      # default False: keeps a per-client model that evaluation uses
    global_model: ClassVar[bool]      # default True: its global adapter is a model worth saving
    plain_plans: ClassVar[bool]       # default True: plans are plain LoRA factors (an executorch device
    # can train them); False for plans that hold frozen components, score importance or route experts
    pools_data: ClassVar[bool]        # default False: True trains on all clients' data pooled on the
    # server (the centralized reference): no device takes part, so only `simulate` runs it
    knob: ClassVar[str]               # default "rank": what `fedlora plan` calls the method's knob
    personal_fallback: ClassVar[str]  # default "base": what a client without a model of its own is
    # scored on: "base" (the base model) or "global" (the global adapter)
    dp_normalise: ClassVar[str | None]  # default None: no device-level DP variant (privacy.dp refuses
    # the method before the run).  "trainers" | "all": under privacy.dp the round's aggregate is
    # DP-FedAvg's noised sum of the clipped changes, over each component's expected trainers
    # ("trainers", FedIT's mean) or over the expected participants ("all", HetLoRA's zero-padding)
    equal_in_same_out: ClassVar[bool]  # default True: when every client sends the same adapter, the
    # new global adapter is that adapter (every averaging rule; tests/test_aggregate.py checks it for
    # every registered method).  False for a rule whose result also depends on the previous global
    # adapter (a server step, server momentum): the test then skips it, saying so

    def plan(self, client: str, capacity: int, ctx: MethodContext, round_idx: int,
             state: dict | None = None) -> ClientPlan | None:
        """The client's plan for this round, or None when its capacity cannot hold the method's
        minimum (the caller reports it as skipped, with the capacity).  ``capacity`` is the
        planner's rank for the device; each method's docstring says how it maps to its knob.
        ``state`` is the method's state (None when planning outside a run, as ``fedlora plan``)."""
        ...

    def aggregate(self, global_factors: Factors, contributions: Sequence[Contribution], ctx: MethodContext,
                  state: dict) -> tuple[Factors, dict]:
        """(the new global factors, this round's record) from the round's valid contributions (at
        least one).  The record's keys go into the round's entry of the report (e.g. CLAIR's
        ``detection``, FedLEASE's ``allocation``); ``{}`` when there is nothing to say.  A method
        whose rule needs every update at once (an SVD of their sum, a clustering) has this hook;
        a method whose rule is a running sum has :meth:`accumulator` instead (one of the two is
        required)."""
        ...

    def accumulator(self, global_factors: Factors, ctx: MethodContext, state: dict) -> Accumulator:
        """A streaming aggregation: an :class:`Accumulator` that folds each update as it arrives
        (then the update is dropped) and gives ``(factors, record)`` at the end, so the round's
        memory does not grow with its number of updates.  Default: one that keeps the updates and
        calls :meth:`aggregate` at the end (:class:`Collected`)."""
        ...

    def global_rank(self, ctx: MethodContext) -> int:
        """R, the number of global components per module.  Default: ``lora.max_rank``."""
        ...

    def start_factors(self, client: str, global_factors: Factors, plan: ClientPlan, state: dict) -> Factors:
        """The factors the client starts from (what is sent to it).  Default: the plan's components
        of the global adapter (:func:`global_slice`)."""
        ...

    def start_extras(self, client: str, plan: ClientPlan, state: dict) -> dict:
        """Tensors sent with the start factors beyond the plan's own.  Default: none."""
        ...

    def footprint(self, ctx: MethodContext) -> Footprint:
        """What a device carries beyond the rank it trains (the planner charges it).  Default:
        nothing."""
        ...

    def personal_model(self, client: str, ctx: MethodContext, state: dict) -> tuple[ClientPlan, dict, object] | None:
        """``(plan, tensors, key)`` of a personalised method's model of ``client`` (None when it has
        none yet); clients with equal non-None ``key`` share one model (evaluated once).  Default:
        its adapter in ``state["personal"]`` (:func:`own_adapter`)."""
        ...

    def summary(self, state: dict) -> dict | None:
        """What the report says of the method at the end of the run.  Default: None."""
        ...

    def check_config(self, cfg) -> None:
        """Checks across config sections, for a run of this method (ConfigError naming the field).
        Default: none."""
        ...

    def dp_rule(self, ctx: MethodContext) -> str | None:
        """Under ``privacy.dp``, what the noised sum divides by, where it depends on the method's
        settings ("trainers" or "all", as ``dp_normalise``).  Default: ``dp_normalise``."""
        ...

    def fleet_importance(self, state: dict, scores: dict, trained: dict) -> None:
        """For a method whose devices send importance scores, where the coordinator sees only their
        sum (``privacy.dp``: noised; ``privacy.secure_aggregation``: summed securely): the round's
        fleet scores (module -> one per global component, ``nan`` where nobody scored) and the
        components trained (module -> one value per component, > 0 where trained), to keep in
        ``state`` for the next plans, which must rank by nothing else.  Default: none (the method's
        devices send no scores)."""
        ...


class Accumulator(Protocol):
    """One round's aggregation as it is fed: ``add`` each valid contribution (in the round's order),
    then ``finish`` once for ``(the new global factors, the round's record)``.  ``add`` must not
    change the method's state (a round below ``min_updates`` is dropped unfinished); ``finish`` may."""

    def add(self, contribution: Contribution) -> None: ...

    def finish(self) -> tuple[Factors, dict]: ...


class Collected:
    """The accumulator of a method that needs every update at once: it keeps them (one decoded
    adapter each, the factors its maths works on) and calls ``rule(contributions)`` at the end."""

    def __init__(self, rule):
        self.rule = rule
        self.contributions: list[Contribution] = []

    def add(self, contribution: Contribution) -> None:
        self.contributions.append(contribution)

    def finish(self) -> tuple[Factors, dict]:
        return self.rule(self.contributions)


class Averaging:
    """The streaming accumulator of the averaging methods (:class:`~coordinator.aggregate.ComponentAverager`
    under ``normalise``); ``then(factors)`` post-processes the mean at the end (FSLoRA's server
    optimiser), ``keep(contribution)`` sees each contribution as it is folded (HAFL's scores)."""

    def __init__(self, global_factors: Factors, normalise: str, then=None, keep=None):
        self.avg = ComponentAverager(global_factors, normalise)
        self.then = then
        self.keep = keep

    def add(self, contribution: Contribution) -> None:
        self.avg.add(contribution)
        if self.keep is not None:
            self.keep(contribution)

    def finish(self) -> tuple[Factors, dict]:
        mean = self.avg.result()
        return (self.then(mean) if self.then else mean), {}


# --------------------------------------------------------------------------------- helpers

def global_slice(client: str, global_factors: Factors, plan: ClientPlan, state: dict) -> Factors:
    """The default start: the plan's components of the global adapter."""
    return slice_factors(global_factors, plan)


def own_or_global(client: str, global_factors: Factors, plan: ClientPlan, state: dict) -> Factors:
    """The client's own adapter (``state["personal"]``) when it has one of the plan's rank, else the
    plan's components of the global adapter: the start of the personalised methods."""
    own = state.get("personal", {}).get(client)
    if own is not None and next(iter(own.values()))[0].shape[0] == plan.rank:
        return {m: (a.clone(), b.clone()) for m, (a, b) in own.items()}
    return slice_factors(global_factors, plan)


def global_copy(client: str, global_factors: Factors, plan: ClientPlan, state: dict) -> Factors:
    """All R components of the global adapter (for plans that hold more than they train)."""
    return {m: (a.clone(), b.clone()) for m, (a, b) in global_factors.items()}


def own_adapter(client: str, ctx: MethodContext, state: dict) -> tuple[ClientPlan, dict, None] | None:
    """The default personal model: the client's adapter in ``state["personal"]``, if any."""
    factors = state.get("personal", {}).get(client)
    if factors is None:
        return None
    rank = next(iter(factors.values()))[0].shape[0]
    return uniform_plan(ctx.modules, rank, ctx.scale), to_state_dict(factors), None


def trained_rank(capacity: int, ctx: MethodContext) -> int:
    """``min(capacity, R)`` with R = ``lora.max_rank``: the rank (or modules, or sketch size) a
    device of this capacity trains; 0 when it cannot train one."""
    return max(0, min(capacity, ctx.max_rank))


def capacity_plan(capacity: int, ctx: MethodContext) -> ClientPlan | None:
    """The first ``min(capacity, R)`` components of every module, or None when the capacity is 0:
    the planner-driven rank of HetLoRA, FlexLoRA and local training."""
    r = trained_rank(capacity, ctx)
    return uniform_plan(ctx.modules, r, ctx.scale) if r >= 1 else None


def random_plan(ctx: MethodContext, tag: str, client: str, round_idx: int, k: int, scale: float,
                extra: dict) -> ClientPlan:
    """``k`` of the R global components per adapted matrix, uniformly without replacement, drawn
    independently per matrix and afresh per round from ``(tag, seed, round, client)``."""
    rng = random.Random(f"{tag}|{ctx.seed}|{round_idx}|{client}")
    modules = {m: ModulePlan(tuple(sorted(rng.sample(range(ctx.max_rank), k)))) for m in sorted(ctx.modules)}
    return ClientPlan(modules, scale, k, extra)


# ------------------------------------------------------------------------------- the binding

class Bound:
    """A method with every hook of :class:`Method`: its own, or the default."""

    def __init__(self, impl):
        self.impl = impl
        self.name: str = impl.name
        # the flags of :class:`Method`, each with its default
        self.Settings: type | None = getattr(impl, "Settings", None)
        self.personalised: bool = getattr(impl, "personalised", False)
        self.global_model: bool = getattr(impl, "global_model", True)
        self.plain_plans: bool = getattr(impl, "plain_plans", True)
        self.pools_data: bool = getattr(impl, "pools_data", False)
        self.knob: str = getattr(impl, "knob", "rank")
        self.personal_fallback: str = getattr(impl, "personal_fallback", "base")
        self.equal_in_same_out: bool = getattr(impl, "equal_in_same_out", True)
        self.dp_normalise: str | None = getattr(impl, "dp_normalise", None)
        self.section: str = getattr(impl, "section", None) or section_of(impl)

    def _own(self, hook: str):
        return getattr(self.impl, hook, None)

    def _ctx(self, ctx: MethodContext) -> MethodContext:
        """``ctx`` with the method's default settings when it carries none (a context made by hand)."""
        if ctx.settings is None and self.Settings is not None:
            return dataclasses.replace(ctx, settings=self.Settings())
        return ctx

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return self.impl.plan(client, capacity, self._ctx(ctx), round_idx, state)

    @property
    def streams(self) -> bool:
        """True when the method aggregates as a running sum (its own ``accumulator``)."""
        return self._own("accumulator") is not None

    def accumulator(self, global_factors, ctx, state) -> Accumulator:
        own = self._own("accumulator")
        if own:
            return own(global_factors, self._ctx(ctx), state)
        ctx = self._ctx(ctx)
        return Collected(lambda contributions: self.impl.aggregate(global_factors, contributions, ctx, state))

    def aggregate(self, global_factors, contributions, ctx, state) -> tuple[Factors, dict]:
        """The round's aggregation in one call: every contribution through :meth:`accumulator`."""
        acc = self.accumulator(global_factors, ctx, state)
        for c in contributions:
            acc.add(c)
        factors, record = acc.finish()
        return factors, dict(record or {})

    def dp_rule(self, ctx) -> str | None:
        """Under ``privacy.dp``: what the noised sum divides by ("trainers" or "all", see
        ``dp_normalise``), which a method may make depend on its settings (its own ``dp_rule``)."""
        f = self._own("dp_rule")
        return f(self._ctx(ctx)) if f else self.dp_normalise

    @property
    def sends_scores(self) -> bool:
        """True when the method's devices send importance scores that, where the coordinator sees
        only sums, reach its ``fleet_importance(state, scores, trained)`` hook (HAFL)."""
        return self._own("fleet_importance") is not None

    def fleet_importance(self, state, scores, trained) -> None:
        f = self._own("fleet_importance")
        if f:
            f(state, scores, trained)

    def global_rank(self, ctx) -> int:
        f = self._own("global_rank")
        return f(self._ctx(ctx)) if f else ctx.max_rank

    def start_factors(self, client, global_factors, plan, state) -> Factors:
        return (self._own("start_factors") or global_slice)(client, global_factors, plan, state)

    def start_extras(self, client, plan, state) -> dict:
        f = self._own("start_extras")
        return f(client, plan, state) if f else {}

    def footprint(self, ctx) -> Footprint:
        f = self._own("footprint")
        return f(self._ctx(ctx)) if f else NO_FOOTPRINT

    def personal_model(self, client, ctx, state):
        return (self._own("personal_model") or own_adapter)(client, self._ctx(ctx), state)

    def summary(self, state):
        f = self._own("summary")
        return f(state) if f else None

    def check_config(self, cfg) -> None:
        f = self._own("check_config")
        if f:
            f(cfg)


# --------------------------------------------------------------------------------- registry
# the registry itself is coordinator/methods/registry.py (plugins load into it without this module)


def is_registered(name: str) -> bool:
    """True when ``name`` is registered, after importing the installed plugin of that name if there
    is one (an entry point in ``fedlora_edge.methods``: :mod:`fedlora_edge.coordinator.plugins`)."""
    if name not in _REGISTRY:
        from ..plugins import load_installed

        load_installed(name)
    return name in _REGISTRY


def get_method(name: str) -> Bound:
    """The method ``name`` (an installed plugin's is imported on first use); ValueError saying it is
    not registered, listing the registered ones and how to load a plugin."""
    if not is_registered(name):
        from ..plugins import not_registered

        raise ValueError(not_registered(name, method_names()))
    return Bound(_REGISTRY[name]())
