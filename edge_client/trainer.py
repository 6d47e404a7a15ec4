"""Local training: AdamW (or SGD) on the active LoRA adapter, loss on the response tokens only.

The loop is deliberately plain (one forward, one backward, one step) so that its cost is the
model's: ``bench/client_overhead.py`` compares it with a bare peft loop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .data import Example, collate, encode_examples


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 10
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_seq_len: int = 64
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # or "sgd"; the executorch trainer runs SGD whatever this says
    sgd_lr: float = 0.05      # the learning rate of devices that run SGD (the executorch trainer)


OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    first_loss: float
    last_loss: float
    mean_loss: float
    seconds: float
    num_examples: int


def batches(encoded: Sequence, batch_size: int, seed: int) -> Iterator[list]:
    """Endless shuffled batches: a fresh permutation per pass over the data, from ``seed``."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            batch.append(encoded[order.pop()])
        yield batch


def train_steps(model, params: list[torch.nn.Parameter], batch_iter: Iterator[dict], steps: int,
                lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0, slowdown: float = 1.0,
                hooks=None, optimizer: str = "adamw") -> list[float]:
    """Run ``steps`` AdamW (or plain SGD) steps of ``model`` on ``params``; returns each step's loss.

    ``slowdown > 1`` stretches every step to that multiple of its time (emulating a slower device).
    ``hooks`` (e.g. :class:`edge_client.partial.PartialTraining`) has ``after_backward()``, called
    before gradient clipping, and ``after_step()``, called after each optimiser step.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr, weight_decay=weight_decay))
    losses = []
    model.train()
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(batch_iter)
            loss = model(**batch).loss
            loss.backward()
            if hooks is not None:
                hooks.after_backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if hooks is not None:
                hooks.after_step()
            losses.append(float(loss.detach()))
            if slowdown > 1.0:
                time.sleep((slowdown - 1.0) * (time.perf_counter() - t0))
    finally:
        model.eval()
    return losses


def train_local(peft_model, tokenizer, examples: Sequence[Example], settings: TrainSettings,
                seed: int, device: str | torch.device = "cpu", slowdown: float = 1.0, hooks=None) -> TrainResult:
    """Train the active adapter of ``peft_model`` on ``examples`` for ``settings.steps`` steps.

    Deterministic in ``seed`` on a CPU.  Raises ValueError with no examples or no trainable
    parameter (a plan that trains nothing is a planning bug, not a silent no-op).
    """
    if not examples:
        raise ValueError("no training examples")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the active adapter has no trainable parameter")
    encoded = encode_examples(tokenizer, examples, settings.max_seq_len)
    pad = tokenizer.pad_token_id

    def to_device() -> Iterator[dict]:
        for b in batches(encoded, settings.batch_size, seed):
            yield {k: v.to(device) for k, v in collate(b, pad).items()}

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    losses = train_steps(peft_model, params, to_device(), settings.steps, settings.lr,
                         settings.weight_decay, settings.grad_clip, slowdown, hooks, settings.optimizer)
    seconds = time.perf_counter() - t0
    return TrainResult(len(losses), losses[0], losses[-1], sum(losses) / len(losses), seconds, len(examples))
