"""FedLEASE on the device: M LoRA experts per adapted layer and an adaptive top-M router.

A plan with ``extra["experts"] = {"count": M, "own": c}`` makes every adapted linear layer

``y = W0 x + Σ_{p ∈ TopM(ω)} ω̂_p · s · B_{e(p)} A_{e(p)} x``,  ``ω = softmax(G x)``,

with ``G ∈ R^{(2M−1)×n}`` the client's router on the layer's input (per token, per layer) and
``ω̂`` the top-M weights renormalised to sum to 1.  Slots ``0..M−1`` map to experts ``0..M−1``
and slots ``M..2M−2`` all map to the client's own expert ``c`` (the official code's layout), so
at most ``M−1`` selected slots are other experts' and the own expert is always active; weights of
slots that map to the same expert add.  With ``M = 1`` the layer is plain LoRA.

Only the own expert (the peft adapter installed from the plan) and the router are trained; the
other experts are frozen buffers that still take part in the forward pass.

Tensors (all safetensors, never pickled):

- the own expert: peft LoRA keys, as every plan;
- ``expert.<j>.<module>.lora_A`` / ``lora_B``: the other experts (downlink only);
- ``router.<module>``: ``G`` of that layer (downlink and uplink).

:func:`save_mixture` / :func:`load_mixture` write and read a client's personalised model (its
experts and router) as one safetensors file plus a JSON description.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from fedlora_edge.core.lora import ClientPlan, from_state_dict, install_adapter

EXPERT_PREFIX = "expert."
ROUTER_PREFIX = "router."


def expert_key(j: int, module: str, which: str) -> str:
    return f"{EXPERT_PREFIX}{j}.{module}.lora_{which}"


def router_key(module: str) -> str:
    return ROUTER_PREFIX + module


def mixture_of(plan: ClientPlan) -> tuple[int, int] | None:
    """``(M, own expert)`` for a FedLEASE training plan, else None."""
    return plan.steps.experts


def slot_map(m: int, own: int) -> torch.Tensor:
    """Expert index of each of the router's ``2M−1`` slots."""
    mapping = torch.arange(2 * m - 1)
    mapping[m:] = own
    return mapping


def route(logits: torch.Tensor, mapping: torch.Tensor, m: int) -> torch.Tensor:
    """Per-expert gate ``[..., M]`` from router logits ``[..., 2M−1]``: softmax, top-M slots,
    renormalised, summed per expert."""
    w = torch.softmax(logits.float(), dim=-1)
    top, idx = w.topk(m, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    gate = torch.zeros(*logits.shape[:-1], m, dtype=top.dtype, device=top.device)
    return gate.scatter_add(-1, mapping.to(idx.device)[idx], top)


def init_router(n_in: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``nn.Linear``'s default initialisation of a ``(2M−1) × n_in`` router, U(±1/√n)."""
    bound = 1.0 / n_in ** 0.5
    return (torch.rand((2 * m - 1, n_in), generator=gen) * 2 - 1) * bound


class RoutedLoRA(torch.nn.Module):
    """A peft LoRA layer whose adapter ``adapter`` is the own expert of a routed mixture."""

    mapping: torch.Tensor  # a buffer (register_buffer): the expert of each router slot (slot_map)

    def __init__(self, layer, adapter: str, m: int, own: int, others: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                 router: torch.Tensor, scale: float):
        super().__init__()
        self.layer, self.adapter, self.m, self.own, self.scale = layer, adapter, m, own, scale
        dev = layer.base_layer.weight.device
        self.router = torch.nn.Parameter(router.detach().to(dev, torch.float32).clone())
        self.register_buffer("mapping", slot_map(m, own).to(dev), persistent=False)
        for j, (a, b) in others.items():
            self.register_buffer(f"a{j}", a.detach().to(dev, torch.float32).clone(), persistent=False)
            self.register_buffer(f"b{j}", b.detach().to(dev, torch.float32).clone(), persistent=False)

    def expert(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        if j == self.own:
            return self.layer.lora_A[self.adapter].weight, self.layer.lora_B[self.adapter].weight
        return getattr(self, f"a{j}"), getattr(self, f"b{j}")

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        return route(F.linear(x.float(), self.router), self.mapping, self.m)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer.base_layer(x, *args, **kwargs)
        xd = self.layer.lora_dropout[self.adapter](x)
        gate = self.gate(x)
        for j in range(self.m):
            a, b = self.expert(j)
            delta = F.linear(F.linear(xd.to(a.dtype), a), b)
            out = out + (self.scale * gate[..., j:j + 1] * delta).to(out.dtype)
        return out


def split_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(peft LoRA keys of the own expert, expert/router tensors) of a mixture payload."""
    lora: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        (rest if k.startswith((EXPERT_PREFIX, ROUTER_PREFIX)) else lora)[k] = v
    return lora, rest


class Routed:
    """What :func:`routed` yields: the wrappers, and the routers as tensors to send."""

    def __init__(self, wrappers: dict[str, RoutedLoRA]):
        self.wrappers = wrappers

    def routers(self) -> dict[str, torch.Tensor]:
        return {router_key(m): w.router.detach().to("cpu", torch.float32).clone() for m, w in self.wrappers.items()}


def _parent(root, path: str):
    head, _, name = path.rpartition(".")
    return (root.get_submodule(head) if head else root), name


@contextmanager
def routed(peft_model, adapter: str, plan: ClientPlan, tensors: Mapping[str, torch.Tensor]) -> Iterator[Routed]:
    """Route every module of ``plan`` through a :class:`RoutedLoRA` whose own expert is the
    installed adapter ``adapter``; the peft layers are put back on exit.  ``tensors`` hold the
    other experts and the routers (a missing one raises KeyError naming it)."""
    mixture = mixture_of(plan)
    if mixture is None:
        raise ValueError("routed: the plan has no experts (not a mixture plan)")
    m, own = mixture
    root = peft_model.base_model.model
    swapped: dict[str, tuple] = {}
    try:
        for module in plan.modules:
            others = {j: (tensors[expert_key(j, module, "A")], tensors[expert_key(j, module, "B")])
                      for j in range(m) if j != own}
            layer = root.get_submodule(module)
            wrapper = RoutedLoRA(layer, adapter, m, own, others, tensors[router_key(module)], plan.scale)
            parent, name = _parent(root, module)
            setattr(parent, name, wrapper)
            swapped[module] = (parent, name, layer, wrapper)
        yield Routed({mod: w for mod, (_, _, _, w) in swapped.items()})
    finally:
        for parent, name, layer, _ in swapped.values():
            setattr(parent, name, layer)


@contextmanager
def mixture_model(peft_model, adapter: str, plan: ClientPlan, tensors: Mapping[str, torch.Tensor],
                  targets: list[str], dropout: float = 0.0) -> Iterator[Routed | None]:
    """Install a client's model from a payload (own expert, other experts, routers) and route it;
    a plan without experts installs plain LoRA.  Yields the :class:`Routed` (None for plain)."""
    lora, rest = split_tensors(tensors)
    install_adapter(peft_model, adapter, plan, from_state_dict(lora), targets, dropout)
    if mixture_of(plan) is None:
        yield None
        return
    with routed(peft_model, adapter, plan, rest) as r:
        yield r


def mixture_shapes(module_dims: Mapping[str, tuple[int, int]], plan: ClientPlan) -> dict[str, tuple[int, ...]]:
    """The router keys and shapes an update under a mixture plan carries (none for other plans)."""
    mix = mixture_of(plan)
    if mix is None:
        return {}
    return {router_key(module): (2 * mix[0] - 1, module_dims[module][0]) for module in plan.modules}


MIXTURE_FILE, MIXTURE_META = "mixture.safetensors", "mixture.json"


def save_mixture(folder: str | Path, plan: ClientPlan, tensors: Mapping[str, torch.Tensor], base_model: str,
                 targets: list[str]) -> Path:
    """Write a client's personalised model: its tensors (safetensors) and plan (JSON)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / MIXTURE_FILE))
    (folder / MIXTURE_META).write_text(json.dumps({"plan": plan.to_json(), "base_model": base_model,
                                                   "targets": list(targets)}, indent=1))
    return folder


def load_mixture(folder: str | Path) -> tuple[ClientPlan, dict[str, torch.Tensor], dict]:
    """``(plan, tensors, meta)`` of a model written by :func:`save_mixture`; use them with
    :func:`mixture_model`.  A missing or unreadable file raises ValueError naming it."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (MIXTURE_FILE, MIXTURE_META):
        if not (folder / name).is_file():
            raise ValueError(f"{folder}: no {name} (not a model written by save_mixture)")
    try:
        meta = json.loads((folder / MIXTURE_META).read_text())
        plan = ClientPlan.from_json(meta["plan"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{folder / MIXTURE_META}: not a mixture description ({exc})") from None
    return plan, dict(load_file(str(folder / MIXTURE_FILE))), meta
