"""FSLoRA (Fang et al., "Federated Sketching LoRA", arXiv 2501.19389; official code
wenzhifang/Federated-Sketching-LoRA-Implementation @ ac24177): sketched sub-adapters per device.

The server holds rank ``R = lora.max_rank``.  Every round, client ``i`` draws a sketch ``K_i`` of
``k_i`` components per adapted matrix, uniformly without replacement and afresh (the code's
``randperm(r)[:k_i]`` per tensor), and trains ``B[:, K_i]``, ``A[K_i, :]`` under the scale
``s·R/k_i``: its model is ``W0 + s·B S_i A`` with ``S_i = (R/k_i)·Σ_{j∈K_i} e_j e_jᵀ``, so
``E[S_i] = I`` and the expected sketched product is the full one.  Only the sketched columns and
rows go down and up (``k_i(m+n)`` numbers per matrix each way).  The server averages the deltas
over the sampled clients, zero outside each sketch: ``B ← B + Σ_i p_i ΔB_i`` (and A), with
``p_i`` the data-size weights (``1/|P|`` for equal data, as in the paper).

``fslora.server_optimizer: adamw`` (the official code's FedOpt step) feeds the negative averaged
delta as a pseudo-gradient to a server Adam (``fslora.server_lr``, ``fslora.server_betas``, no
weight decay); its moments are kept in the run state.  The default is the paper's plain update.

Planner mapping: the knob is the sketch size ``k_i = min(capacity_i, R)`` (the sketching ratio is
``k_i / R``); a client trains, sends and receives rank ``k_i``.

Differences from the official code: the code realises the sketch by masking a full-rank B and
multiplying its gradient by ``S²``, equivalent to training the slices with SGD but not with Adam;
here the slices are trained directly (the paper's description).  The code's ``'lora_B' == n``
name test looks like it never selects the sketch branch (full names are longer); this
implementation follows the paper, not that behaviour.

Aggregation streams: each update is folded into running sums as it is validated, then dropped
(:class:`~coordinator.methods.base.Averaging`), so a round holds adapter-sized sums whatever its
number of updates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Averaging, random_plan, register, trained_rank


@dataclass(frozen=True)
class FsloraSettings:
    """``fslora:``: the optional server-side optimiser of the official code."""

    server_optimizer: str = "none"  # none: B ← B + mean ΔB (the paper); adamw: the mean delta as a pseudo-gradient
    server_lr: float = 3e-4
    server_betas: tuple[float, ...] = (0.9, 0.999)

    def __post_init__(self):
        if self.server_optimizer not in ("none", "adamw"):
            raise ConfigError("fslora.server_optimizer: must be 'none' or 'adamw'")
        if not self.server_lr > 0:
            raise ConfigError("fslora.server_lr: must be positive")
        if len(self.server_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.server_betas):
            raise ConfigError("fslora.server_betas: must be two numbers in [0, 1)")


def sketch_product(a: torch.Tensor, b: torch.Tensor, components, total: int) -> torch.Tensor:
    """``B S A`` for the sketch ``components`` of ``total``: ``(R/k)·Σ_{j∈K} B_j A_j``."""
    idx = torch.tensor(list(components), dtype=torch.long)
    return (total / len(idx)) * (b.index_select(1, idx) @ a.index_select(0, idx))


def adam_step(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int,
              lr: float, betas: tuple[float, float], eps: float = 1e-8) -> torch.Tensor:
    """One Adam step (bias-corrected, no weight decay) on ``param``; ``m``, ``v`` updated in place."""
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat, v_hat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    return param - lr * m_hat / (v_hat.sqrt() + eps)


@register
class FSLoRA:
    name = "fslora"
    Settings = FsloraSettings
    knob = "sketch size k"

    def plan(self, client, capacity, ctx, round_idx, state=None):
        big_r = ctx.max_rank
        k = trained_rank(capacity, ctx)
        if k < 1:
            return None
        return random_plan(ctx, "fslora", client, round_idx, k, ctx.scale * big_r / k,
                           {"sketch": k, "sketch_ratio": round(k / big_r, 4)})

    def accumulator(self, global_factors, ctx, state):
        st = ctx.settings
        if st.server_optimizer == "none":
            return Averaging(global_factors, "all")
        return Averaging(global_factors, "all", then=lambda mean: server_step(global_factors, mean, st, state))


def server_step(global_factors, mean, st: FsloraSettings, state: dict):
    """The server optimiser's step: the negative mean delta as a pseudo-gradient to Adam (its
    moments and step count in the method's state)."""
    tensors = state.setdefault("tensors", {})
    step = int(state.get("server_step", 0)) + 1
    state["server_step"] = step
    out = {}
    for module, (ga, gb) in global_factors.items():
        new = []
        for which, g, avg in (("A", ga, mean[module][0]), ("B", gb, mean[module][1])):
            m = tensors.setdefault(f"adam.m.{module}.{which}", torch.zeros_like(g))
            v = tensors.setdefault(f"adam.v.{module}.{which}", torch.zeros_like(g))
            new.append(adam_step(g, g - avg, m, v, step, st.server_lr, tuple(st.server_betas)))
        out[module] = (new[0], new[1])
    return out
