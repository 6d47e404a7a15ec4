"""The method registry: one place where every method is registered by name.

A method is a plan policy plus an aggregation rule (see :class:`Method`).  ``get_method(name)``
fails with the list of valid names.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edge_client.lora import ClientPlan, Factors, ModulePlan, slice_factors, to_state_dict, uniform_plan

from ..aggregate import Contribution
from ..config import ClairSettings, FedleaseSettings, FsloraSettings, HaflSettings
from ..planner import NO_FOOTPRINT, Footprint


@dataclass(frozen=True)
class MethodContext:
    """What a method knows of the run: adapted module dims (in, out), scale, ranks."""

    modules: Mapping[str, tuple[int, int]]
    scale: float
    rank: int       # the homogeneous rank (lora.rank)
    max_rank: int   # lora.max_rank
    seed: int = 0   # the run's seed: methods that draw at random (FSLoRA, Fed-PLoRA) draw from it
    hafl: HaflSettings = field(default_factory=HaflSettings)
    fslora: FsloraSettings = field(default_factory=FsloraSettings)
    clair: ClairSettings = field(default_factory=ClairSettings)
    fedlease: FedleaseSettings = field(default_factory=FedleaseSettings)


class Method(Protocol):
    name: str
    personalised: bool  # keeps a per-client adapter that its evaluation uses
    global_model: bool  # its global adapter is a model worth saving (False for local training)
    pooled: bool        # trains on all clients' data pooled (the centralized reference)

    def global_rank(self, ctx: MethodContext) -> int:
        """R: the number of global components per module."""
        ...

    def plan(self, client: str, capacity: int, ctx: MethodContext, round_idx: int,
             state: dict | None = None) -> ClientPlan | None:
        """The client's plan for this round, or None when its capacity cannot hold the method's
        minimum (the caller reports it as skipped, with the capacity).  ``capacity`` is the
        planner's rank for the device; each method's docstring says how it maps to its knob.
        ``state`` is the method's state (None when planning outside a run, as ``fedlora plan``)."""
        ...

    def start_factors(self, client: str, global_factors: Factors, plan: ClientPlan, state: dict) -> Factors:
        """The factors the client starts from (what is sent to it)."""
        ...

    def aggregate(self, global_factors: Factors, contributions: Sequence[Contribution], ctx: MethodContext,
                  state: dict) -> Factors:
        """The new global factors from this round's valid contributions (at least one)."""
        ...


_REGISTRY: dict[str, Callable[[], Method]] = {}


def register(name: str) -> Callable:
    def deco(factory: Callable[[], Method]) -> Callable[[], Method]:
        if name in _REGISTRY:
            raise ValueError(f"method '{name}' is registered twice")
        _REGISTRY[name] = factory
        return factory
    return deco


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'; valid methods: {', '.join(method_names())}")
    return _REGISTRY[name]()


def footprint(method: Method, ctx: MethodContext) -> Footprint:
    """What the method makes a device carry beyond the rank it trains (the planner charges it):
    Fed-PLoRA and HAFL's freezing send all R components; HAFL's freezing keeps them in the forward
    pass; Fed-PLoRA folds them into a copy of the base weights.  Methods say so with an optional
    ``footprint(ctx)``; the default is nothing beyond the trained rank."""
    f = getattr(method, "footprint", None)
    return f(ctx) if f is not None else NO_FOOTPRINT


def start_extras(method: Method, client: str, plan: ClientPlan, state: dict) -> dict:
    """Tensors sent with the start factors beyond the plan's own (FedLEASE's other experts and
    router), from the method's optional ``start_extras(client, plan, state)``; none by default."""
    f = getattr(method, "start_extras", None)
    return f(client, plan, state) if f is not None else {}


def personal_model(method: Method, client: str, ctx: MethodContext, state: dict) -> tuple[ClientPlan, dict, object] | None:
    """``(plan, tensors, key)`` of a personalised method's model of ``client`` (None when it has
    none yet): by default its adapter in ``state["personal"]``; a method with a richer model
    (FedLEASE's experts and router) says so with ``personal_model(client, ctx, state)``.  Clients
    with equal non-None ``key`` share one model (evaluated once)."""
    f = getattr(method, "personal_model", None)
    if f is not None:
        return f(client, ctx, state)
    factors = state.get("personal", {}).get(client)
    if factors is None:
        return None
    rank = next(iter(factors.values()))[0].shape[0]
    return uniform_plan(ctx.modules, rank, ctx.scale), to_state_dict(factors), None


def capacity_plan(capacity: int, ctx: MethodContext) -> ClientPlan | None:
    """The first ``min(capacity, R)`` components of every module (R = ``lora.max_rank``), or None
    when the capacity is 0: the planner-driven rank of HetLoRA, FlexLoRA and local training."""
    r = min(capacity, ctx.max_rank)
    return uniform_plan(ctx.modules, r, ctx.scale) if r >= 1 else None


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


def random_plan(ctx: MethodContext, tag: str, client: str, round_idx: int, k: int, scale: float,
                extra: dict) -> ClientPlan:
    """``k`` of the R global components per adapted matrix, uniformly without replacement, drawn
    independently per matrix and afresh per round from ``(tag, seed, round, client)``."""
    rng = random.Random(f"{tag}|{ctx.seed}|{round_idx}|{client}")
    modules = {m: ModulePlan(tuple(sorted(rng.sample(range(ctx.max_rank), k)))) for m in sorted(ctx.modules)}
    return ClientPlan(modules, scale, k, extra)


class GlobalRankR:
    """Defaults of the methods that keep one global adapter of rank ``R = lora.max_rank``: not
    personalised, not pooled, a client starts from its plan's components of the global adapter."""

    personalised = False
    global_model = True
    pooled = False
    start_factors = staticmethod(global_slice)

    def global_rank(self, ctx: MethodContext) -> int:
        return ctx.max_rank


from . import centralized, clair, fed_plora, fedit, fedlease, flexlora, fslora, hafl, hetlora, local  # noqa: E402,F401  (registers them)
