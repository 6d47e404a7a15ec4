"""LoRA as a sum of rank-1 components, and client plans over that view.

A LoRA adapter on a linear module is ``ΔW = s · B A = s · Σ_j B[:, j] A[j, :]`` with
``A ∈ R^{r×n}``, ``B ∈ R^{m×r}`` and one scale ``s`` for the whole run (peft's ``lora_alpha / r``
is held equal to ``s`` for every rank through ``alpha_pattern``, so a component means the same
thing at every client whatever its rank).

The server holds, per adapted module, ``R`` global components.  A client's :class:`ClientPlan`
says, per module, which global components it trains (``components``, in order: local component
``i`` is global component ``components[i]``).  Everything a method needs to say about a client for
one round is a plan; aggregation then works per component over the clients that trained it.

Factors are plain ``dict[module_path, (A, B)]``; :func:`to_state_dict` / :func:`from_state_dict`
convert to and from peft's state-dict keys (``base_model.model.<module>.lora_A.weight``), which is
what goes on the wire and on disk.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, n], B [m, r])

_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def peft_key(module: str, which: str) -> str:
    return f"{_PREFIX}{module}.lora_{which}.weight"


def to_state_dict(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b) in factors.items():
        out[peft_key(module, "A")] = a
        out[peft_key(module, "B")] = b
    return out


def from_state_dict(sd: Mapping[str, torch.Tensor]) -> Factors:
    """Group peft LoRA keys by module; a key that is not a LoRA factor raises ValueError naming it."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"'{key}' is not a LoRA factor key (expected {_PREFIX}<module>.lora_A|B.weight)")
        parts.setdefault(m["module"], {})[m["which"]] = t
    out: Factors = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"module '{module}' has lora_{'A' if 'A' not in ab else 'B'} missing")
        out[module] = (ab["A"], ab["B"])
    return out


@dataclass(frozen=True)
class ModulePlan:
    """The global components a client trains in one module (local order = this order)."""

    components: tuple[int, ...]

    def __post_init__(self):
        if len(set(self.components)) != len(self.components) or any(c < 0 for c in self.components):
            raise ValueError(f"plan components must be distinct non-negative indices, got {self.components}")

    @property
    def rank(self) -> int:
        return len(self.components)


FROZEN_MODES = ("fold", "forward")


@dataclass(frozen=True)
class DeviceSteps:
    """The device half of a method: what a device does beyond "train these components", declared
    here and read nowhere else (:mod:`fedlora_edge.edge_client.work`, ``partial``, ``experts`` and
    the executorch trainer all read a plan's :attr:`ClientPlan.steps`).  A method sets them with
    :meth:`to_extra` into its plan's ``extra``; on the wire they are these JSON keys of ``extra``:

    ``hold: R`` with ``frozen: "fold" | "forward"``
        the start factors carry all R global components; the plan's components are trained, the
        others are folded into the frozen base (Fed-PLoRA's Select-N-Fold) or kept in the forward
        pass with their gradients zeroed (HAFL's freezing);
    ``importance: {"beta1": b1, "beta2": b2}``
        every held component is scored (AdaLoRA's smoothed sensitivity) and the scores go up with
        the update (HAFL);
    ``experts: {"count": M, "own": c}``
        the start holds M experts and a router; the device trains expert ``c`` and the router with
        the others frozen (FedLEASE).

    Any other key of ``extra`` is the coordinator's own (a method's bookkeeping) and the device
    ignores it.  A plan with none of these is plain LoRA training, which every trainer carries.
    """

    hold: int | None = None
    frozen: str | None = None
    importance: tuple[float, float] | None = None  # (beta1, beta2)
    experts: tuple[int, int] | None = None          # (M, own expert)

    def __post_init__(self):
        if (self.hold is None) != (self.frozen is None) or (self.hold is not None and self.frozen not in FROZEN_MODES):
            raise ValueError(f"plan: 'hold' needs a 'frozen' mode 'fold' or 'forward' (and 'frozen' a 'hold'), "
                             f"got hold {self.hold!r}, frozen {self.frozen!r}")
        if self.hold is not None and self.hold < 1:
            raise ValueError(f"plan: 'hold' must be a positive rank, got {self.hold}")
        if self.experts is not None:
            m, own = self.experts
            if m < 1 or not 0 <= own < m:
                raise ValueError(f"plan: experts count {m} and own expert {own} are inconsistent")

    @classmethod
    def from_extra(cls, extra: Mapping) -> DeviceSteps:
        """Read (and check) the device's steps from a plan's ``extra``; a malformed one raises
        ValueError naming the key."""
        try:
            hold = extra.get("hold")
            imp = extra.get("importance")
            exp = extra.get("experts")
            return cls(hold=int(hold) if hold is not None else None, frozen=extra.get("frozen"),
                       importance=(float(imp["beta1"]), float(imp["beta2"])) if imp else None,
                       experts=(int(exp["count"]), int(exp["own"])) if exp is not None else None)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"plan: malformed device steps in 'extra' ({type(exc).__name__}: {exc})") from None

    def to_extra(self) -> dict:
        """The JSON keys of ``extra`` that say these steps (only those set)."""
        out: dict = {}
        if self.hold is not None:
            out.update(hold=self.hold, frozen=self.frozen)
        if self.importance is not None:
            out["importance"] = {"beta1": self.importance[0], "beta2": self.importance[1]}
        if self.experts is not None:
            out["experts"] = {"count": self.experts[0], "own": self.experts[1]}
        return out

    @property
    def plain(self) -> bool:
        """Nothing beyond training the plan's components (what the executorch trainer carries)."""
        return self.hold is None and self.importance is None and self.experts is None


@dataclass(frozen=True)
class ClientPlan:
    """What one client trains in one round.  ``scale`` is the run's ``s``; ``rank`` is for display.
    ``extra`` is JSON: the device's steps (:class:`DeviceSteps`, read as :attr:`steps`) and any
    bookkeeping of the method's own."""

    modules: dict[str, ModulePlan]
    scale: float
    rank: int = 0
    extra: dict = field(default_factory=dict)  # method-specific, JSON-serialisable

    @property
    def steps(self) -> DeviceSteps:
        """What the device does with this plan beyond training its components."""
        return DeviceSteps.from_extra(self.extra)

    def scored(self, module: str) -> tuple[int, ...]:
        """The global components whose importance a device following this plan scores in ``module``
        (in the order its scores come), where the plan asks for scores (``steps.importance``):
        every held one when the rest are frozen in the forward pass, else the plan's own."""
        steps = self.steps
        if steps.frozen == "forward":
            assert steps.hold is not None, "DeviceSteps: a frozen mode comes with a hold"
            return tuple(range(steps.hold))
        return self.modules[module].components

    def to_json(self) -> dict:
        return {"scale": self.scale, "rank": self.rank, "extra": self.extra,
                "modules": {m: list(p.components) for m, p in self.modules.items()}}

    @classmethod
    def from_json(cls, obj: Mapping) -> ClientPlan:
        return cls({m: ModulePlan(tuple(int(i) for i in c)) for m, c in obj["modules"].items()},
                   float(obj["scale"]), int(obj.get("rank", 0)), dict(obj.get("extra", {})))


def uniform_plan(modules: Mapping[str, tuple[int, int]], rank: int, scale: float, **extra) -> ClientPlan:
    """Train the first ``rank`` components of every module (FedIT, HetLoRA, FlexLoRA)."""
    comps = tuple(range(rank))
    return ClientPlan({m: ModulePlan(comps) for m in modules}, scale, rank, dict(extra))


def slice_factors(global_factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], plan: ClientPlan) -> Factors:
    """The client's starting factors: the plan's components of each global module, copied."""
    out: Factors = {}
    for module, mp in plan.modules.items():
        a, b = global_factors[module]
        idx = torch.tensor(mp.components, dtype=torch.long)
        out[module] = (a.index_select(0, idx).clone(), b.index_select(1, idx).clone())
    return out


def expected_shapes(module_dims: Mapping[str, tuple[int, int]], plan: ClientPlan) -> dict[str, tuple[int, ...]]:
    """peft key -> shape of what a client following ``plan`` sends back.  dims are (in, out)."""
    out: dict[str, tuple[int, ...]] = {}
    for module, mp in plan.modules.items():
        n_in, n_out = module_dims[module]
        out[peft_key(module, "A")] = (mp.rank, n_in)
        out[peft_key(module, "B")] = (n_out, mp.rank)
    return out


# ------------------------------------------------------------------------------------------- peft


def lora_config(plan: ClientPlan, target_modules: list[str], dropout: float = 0.0):
    """A peft LoraConfig realising ``plan``: per-module ranks via ``rank_pattern``, and
    ``alpha_pattern`` set so that ``lora_alpha / r == plan.scale`` for every module."""
    from peft import LoraConfig

    ranks = {m: p.rank for m, p in plan.modules.items()}
    if not ranks or min(ranks.values()) < 1:
        raise ValueError("a plan must train at least one component in every module it names")
    values = list(ranks.values())
    base_r = max(set(values), key=values.count)
    rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != base_r}
    alpha_pattern = {k: plan.scale * r for k, r in rank_pattern.items()}
    # peft annotates lora_alpha as int, but any number works (it only enters lora_alpha / r)
    return LoraConfig(r=base_r, lora_alpha=plan.scale * base_r,  # type: ignore[arg-type]
                      target_modules=list(target_modules),
                      lora_dropout=dropout, bias="none", rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, task_type="CAUSAL_LM")


def set_factors(peft_model, adapter: str, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``factors`` into adapter ``adapter``'s weights in place; shapes must match exactly."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    sd = to_state_dict(factors)
    have = set(get_peft_model_state_dict(peft_model, adapter_name=adapter))
    if set(sd) != have:
        missing, extra = sorted(have - set(sd)), sorted(set(sd) - have)
        raise ValueError(f"adapter '{adapter}': factors do not match its modules "
                         f"(missing {missing[:2]}, unexpected {extra[:2]})")
    set_peft_model_state_dict(peft_model, sd, adapter_name=adapter)


def get_factors(peft_model, adapter: str) -> Factors:
    """The adapter's factors, detached copies (peft returns the live parameters)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    return from_state_dict({k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()})


def install_adapter(peft_model, adapter: str, plan: ClientPlan, factors: Factors,
                    target_modules: list[str], dropout: float = 0.0) -> None:
    """(Re)create adapter ``adapter`` shaped by ``plan``, loaded with ``factors``, and activate it."""
    if adapter in peft_model.peft_config:
        if peft_model.active_adapter == adapter:
            others = [a for a in peft_model.peft_config if a != adapter]
            if others:
                peft_model.set_adapter(others[0])
        peft_model.delete_adapter(adapter)
    peft_model.add_adapter(adapter, lora_config(plan, target_modules, dropout))
    set_factors(peft_model, adapter, factors)
    peft_model.set_adapter(adapter)


def adapted_modules(model, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """Path -> (in_features, out_features) of every Linear that LoRA with ``target_modules`` adapts."""
    out, found = {}, set()
    candidates: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            candidates.add(leaf)
            if leaf in target_modules:
                out[name] = (mod.in_features, mod.out_features)
                found.add(leaf)
    missing = [t for t in target_modules if t not in found]
    if missing or not out:
        raise TargetModulesError(f"lora.target_modules: {type(model).__name__} has no Linear module named "
                                 f"{', '.join(missing or target_modules)}; its Linear modules are "
                                 f"{', '.join(sorted(candidates))}")
    return out


class TargetModulesError(ValueError):
    """A LoRA target module names no Linear module of the model; the message lists the candidates."""


def init_global_factors(module_dims: Mapping[str, tuple[int, int]], rank: int, seed: int) -> Factors:
    """peft's LoRA initialisation at rank R: A Kaiming-uniform(a=√5), B zero, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for module in sorted(module_dims):
        n_in, n_out = module_dims[module]
        bound = 1.0 / n_in ** 0.5  # kaiming_uniform_(a=sqrt(5)) on a [r, n_in] matrix
        a = (torch.rand((rank, n_in), generator=gen) * 2 - 1) * bound
        out[module] = (a, torch.zeros((n_out, rank)))
    return out


def adapter_config_json(module_dims: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], scale: float,
                        target_modules: list[str], base_model: str) -> dict:
    """peft's ``adapter_config.json`` for factors of the given per-module ranks."""
    plan = ClientPlan({m: ModulePlan(tuple(range(ranks[m]))) for m in module_dims}, scale)
    cfg = lora_config(plan, target_modules).to_dict()
    cfg["base_model_name_or_path"] = base_model
    cfg["target_modules"] = sorted(target_modules)
    return json.loads(json.dumps(cfg, default=list))
