"""Training part of an adapter: the device steps that HAFL and Fed-PLoRA use.

A plan normally says "here are ``r`` components, train them all".  Three of its device steps
(:class:`fedlora_edge.core.lora.DeviceSteps`, read as ``plan.steps``; JSON keys of ``plan.extra``
on the wire) change that:

``hold: R``
    The start factors carry all ``R`` global components of every module (global order); the
    plan's ``components`` are the ones to train.  What happens to the others is ``frozen``:

    ``"fold"`` (Fed-PLoRA's Select-N-Fold)
        ``W ← W0 + s·Σ_{j∉K} B_j A_j`` is written into the frozen base weights for the duration
        of the assignment and an adapter of the selected components alone is trained, so the
        starting function equals the global model's and compute is that of rank ``r``.  The base
        weights are restored (copied back, not subtracted) afterwards.
    ``"forward"`` (HAFL's importance-based freezing)
        A rank-``R`` adapter is installed; the non-selected components stay in the forward pass,
        their gradients are computed (so their importance can be scored) and then zeroed, and
        their values are copied back after every optimiser step (so weight decay cannot move
        them either).

``importance: {"beta1": b1, "beta2": b2}``
    Score every held component with AdaLoRA's smoothed sensitivity (Zhang et al., ICLR 2023):
    per parameter ``I = |w·∂L/∂w|``, ``Ī ← b1·Ī + (1−b1)·I``, ``Ū ← b2·Ū + (1−b2)·|I − Ī|``,
    ``s = Ī·Ū``; component ``j``'s score is ``mean_i s(B[i, j]) + mean_i s(A[j, i])``.  The scores
    go up with the update as ``importance.<module>`` tensors (one float per held component).

Only the trained components go up, in plan order, whatever was held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from contextlib import contextmanager

import torch

from fedlora_edge.core.lora import ClientPlan, ModulePlan

IMPORTANCE_PREFIX = "importance."


def importance_key(module: str) -> str:
    return IMPORTANCE_PREFIX + module


def held_count(plan: ClientPlan) -> int | None:
    """R when the plan holds all R global components, else None (it holds what it trains)."""
    return plan.steps.hold


def held_plan(plan: ClientPlan) -> ClientPlan:
    """The plan of what the client holds in its forward pass (all R components for ``hold``)."""
    hold = held_count(plan)
    if hold is None:
        return plan
    return dataclasses.replace(plan, modules={m: ModulePlan(tuple(range(hold))) for m in plan.modules}, rank=hold)


def _lora_layer(peft_model, module: str):
    return peft_model.base_model.model.get_submodule(module)


@contextmanager
def folded(peft_model, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], plan: ClientPlan):
    """Fold the components the plan does not train into the frozen base weights; restore on exit.

    ``factors`` hold all R components (global order).  Inside the block the base of each adapted
    module is ``W0 + s·B[:, F] A[F]`` with ``F`` the non-selected components.
    """
    from fedlora_edge.core.precision import is_quantized

    for module in plan.modules:
        if is_quantized(_lora_layer(peft_model, module).base_layer.weight):
            raise ValueError(f"plan: folding components into the base needs a float base, and {module}'s weight "
                             "is quantized (train.base_quant)")
    saved = {}
    try:
        with torch.no_grad():
            for module, mp in plan.modules.items():
                a, b = factors[module]
                keep = sorted(set(range(a.shape[0])) - set(mp.components))
                if not keep:
                    continue
                w = _lora_layer(peft_model, module).base_layer.weight
                saved[module] = w.detach().clone()
                idx = torch.tensor(keep, dtype=torch.long)
                fold = plan.scale * (b.index_select(1, idx) @ a.index_select(0, idx))
                w.add_(fold.to(w.device, w.dtype))
        yield
    finally:
        with torch.no_grad():
            for module, w0 in saved.items():
                _lora_layer(peft_model, module).base_layer.weight.copy_(w0)


class PartialTraining:
    """Gradient-time work on the active adapter's LoRA parameters: importance scores, and for
    ``frozen="forward"`` the masking and restoring of non-selected components.

    ``train_steps`` calls :meth:`after_backward` after every backward pass (before clipping) and
    :meth:`after_step` after every optimiser step.
    """

    def __init__(self, peft_model, adapter: str, plan: ClientPlan, freeze: bool, importance: tuple[float, float] | None):
        self.entries = []  # (module, "A" or "B", parameter, component mask or None when nothing is frozen)
        self.importance = importance
        for module, mp in plan.modules.items():
            layer = _lora_layer(peft_model, module)
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            mask = None
            if freeze:
                mask = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
                mask[list(mp.components)] = 1.0
            self.entries.append((module, "A", a, mask))
            self.entries.append((module, "B", b, mask))
        self.saved = {id(p): p.detach().clone() for _, _, p, m in self.entries if m is not None}
        self.ibar = {id(p): torch.zeros_like(p) for _, _, p, _ in self.entries} if importance else {}
        self.ubar = {id(p): torch.zeros_like(p) for _, _, p, _ in self.entries} if importance else {}

    @staticmethod
    def _shaped(mask: torch.Tensor, which: str) -> torch.Tensor:
        return mask[:, None] if which == "A" else mask[None, :]

    def after_backward(self) -> None:
        with torch.no_grad():
            for _, which, p, mask in self.entries:
                if p.grad is None:
                    continue
                if self.importance:
                    b1, b2 = self.importance
                    i_now = (p * p.grad).abs()
                    ibar, ubar = self.ibar[id(p)], self.ubar[id(p)]
                    ibar.mul_(b1).add_(i_now, alpha=1 - b1)
                    ubar.mul_(b2).add_((i_now - ibar).abs(), alpha=1 - b2)
                if mask is not None:
                    p.grad.mul_(self._shaped(mask, which))

    def after_step(self) -> None:
        with torch.no_grad():
            for _, which, p, mask in self.entries:
                if mask is not None:
                    keep = self._shaped(mask, which)
                    p.copy_(p * keep + self.saved[id(p)] * (1 - keep))

    def scores(self) -> dict[str, torch.Tensor]:
        """``importance.<module>`` -> one score per held component (float32, on the CPU)."""
        if not self.importance:
            return {}
        per_param = {(module, which): self.ibar[id(p)] * self.ubar[id(p)] for module, which, p, _ in self.entries}
        return {importance_key(m): component_scores(per_param[(m, "A")], per_param[(m, "B")]).to("cpu", torch.float32)
                for m, which in per_param if which == "A"}


def component_scores(s_a: torch.Tensor, s_b: torch.Tensor) -> torch.Tensor:
    """The per-component score from per-parameter scores of ``A [r, n]`` and ``B [m, r]``."""
    return s_a.mean(dim=1) + s_b.mean(dim=0)


def update_shapes(module_dims: Mapping[str, tuple[int, int]], plan: ClientPlan) -> dict[str, tuple[int, ...]]:
    """Key -> shape of everything a client following ``plan`` sends back: the trained factors,
    with ``importance`` one score per held component of every module, and with ``experts``
    (FedLEASE, :mod:`fedlora_edge.edge_client.experts`) the router of every module."""
    from fedlora_edge.core.lora import expected_shapes

    from .experts import mixture_shapes

    out = expected_shapes(module_dims, plan)
    steps = plan.steps
    if steps.importance:
        for module in plan.modules:
            out[importance_key(module)] = (len(plan.scored(module)),)
    out.update(mixture_shapes(module_dims, plan))
    return out


def split_update(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                               dict[str, torch.Tensor]]:
    """(LoRA factor tensors, module -> importance scores, expert/router tensors) of a received update."""
    from .experts import split_tensors

    factors, mixture = split_tensors(tensors)
    scores = {k[len(IMPORTANCE_PREFIX):]: factors.pop(k) for k in list(factors) if k.startswith(IMPORTANCE_PREFIX)}
    return factors, scores, mixture


def update_reference(start: Mapping[str, torch.Tensor], plan: ClientPlan) -> dict[str, torch.Tensor]:
    """What a compressed update's change is measured from (:mod:`fedlora_edge.core.compress`): the
    plan's start, each module's factors cut to the plan's components where the start holds more
    than it trains (``hold`` and ``fold`` plans send only those).  The device applies it to the start
    as it decoded it, the coordinator to the exact start it encoded, so a change is added back to
    what the run holds, not to its quantized copy."""
    from fedlora_edge.core.lora import peft_key

    out = dict(start)
    for module, mp in plan.modules.items():
        ka, kb = peft_key(module, "A"), peft_key(module, "B")
        a, b = start.get(ka), start.get(kb)
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] == mp.rank:
            continue
        idx = torch.tensor(mp.components, dtype=torch.long)
        out[ka], out[kb] = a.index_select(0, idx), b.index_select(1, idx)
    return out


def feedback_tag(plan: ClientPlan) -> str:
    """Error feedback is carried from one round to the next only between plans of the same
    components (a residual belongs to the components it was rounded on)."""
    return ";".join(f"{m}:{','.join(map(str, mp.components))}" for m, mp in sorted(plan.modules.items()))
