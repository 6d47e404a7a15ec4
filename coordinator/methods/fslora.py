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

The official code's FedOpt step (the negative averaged delta as a pseudo-gradient to a server
AdamW, lr 3e-4) is ``server.optimizer: adamw``, which every method with a global adapter can have
(the code gives its baselines the same step); the default is the paper's plain update.

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

import torch

from .base import Averaging, random_plan, register, trained_rank


def sketch_product(a: torch.Tensor, b: torch.Tensor, components, total: int) -> torch.Tensor:
    """``B S A`` for the sketch ``components`` of ``total``: ``(R/k)·Σ_{j∈K} B_j A_j``."""
    idx = torch.tensor(list(components), dtype=torch.long)
    return (total / len(idx)) * (b.index_select(1, idx) @ a.index_select(0, idx))


@register
class FSLoRA:
    name = "fslora"
    dp_normalise = "all"  # under privacy.dp: DP-FedAvg over the same plans
    knob = "sketch size k"

    def plan(self, client, capacity, ctx, round_idx, state=None):
        big_r = ctx.max_rank
        k = trained_rank(capacity, ctx)
        if k < 1:
            return None
        return random_plan(ctx, "fslora", client, round_idx, k, ctx.scale * big_r / k,
                           {"sketch": k, "sketch_ratio": round(k / big_r, 4)})

    def accumulator(self, global_factors, ctx, state):
        return Averaging(global_factors, "all")
