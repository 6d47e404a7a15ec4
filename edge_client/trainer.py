"""Local training: AdamW (or SGD) on the active LoRA adapter, loss on the response tokens only.

The loop is deliberately plain (forward, backward, step) so that its cost is the model's:
``bench/client_overhead.py`` compares it with a bare peft loop.  A step may accumulate the
gradients of ``grad_accum`` batches; the learning rate follows ``lr_schedule`` (transformers'
schedulers) with ``warmup_steps`` of linear warm-up, over the round's local steps (each round's
local training starts its schedule again, as a fresh trainer per round does).

The training options: ``gradient_checkpointing`` (transformers' switch, on while a round trains),
``packing`` (:func:`packed_batches`: rows of whole examples, their bounds in ``position_ids``) and
``dtype: fp16`` (loss scaling) are here; ``dtype`` and ``base_quant`` are the base as it is loaded
(:mod:`fedlora_edge.core.precision`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from fedlora_edge.core.data import Block, Example, collate, collate_packed, encode_examples, pack_examples
from fedlora_edge.core.dtypes import check_device

# torch is imported where a step runs, not here: the coordinator's config reads TrainSettings, and
# commands that train nothing (`fedlora --help`, `devices`, `methods`) start without torch
if TYPE_CHECKING:
    import torch

T = TypeVar("T")  # what a batch is made of


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
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 over the round's steps)
    warmup_steps: int = 0     # linear warm-up from 0 over the first steps of each round's training
    grad_accum: int = 1       # batches whose gradients make one step (the effective batch is batch_size x this)
    # the frozen base as peft/transformers users train it (core/precision.py; the torch trainer's):
    dtype: str = "fp32"       # fp32 | bf16 | fp16: the base's weights and the compute through them (LoRA stays fp32)
    base_quant: str = "none"  # none | nf4 | int8: the base's Linear weights quantized by torchao (QLoRA-style)
    gradient_checkpointing: bool = False  # recompute each decoder layer in the backward pass (transformers')
    packing: bool = False     # whole examples packed into rows of max_seq_len tokens, attention kept within each


OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")


def lr_scheduler(opt, schedule: str, warmup_steps: int, steps: int):
    """transformers' scheduler for ``schedule`` with warm-up (``constant`` with warm-up 0 keeps
    the rate as it is)."""
    from transformers import get_scheduler

    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got '{schedule}'")
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=steps)


@dataclass(frozen=True)
class TrainResult:
    steps: int
    first_loss: float
    last_loss: float
    mean_loss: float
    seconds: float
    num_examples: int
    losses: tuple[float, ...] = ()  # every step's loss


def batches(encoded: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless shuffled batches: a fresh permutation per pass over the data, from ``seed``."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        batch: list[T] = []
        while len(batch) < batch_size:
            if not order:
                order = list(range(len(encoded)))
                rng.shuffle(order)
            batch.append(encoded[order.pop()])
        yield batch


def packed_batches(encoded: Sequence, batch_size: int, max_len: int, seed: int) -> Iterator[list[Block]]:
    """Endless batches of packed rows (``train.packing``): per pass over the data a fresh
    permutation of the examples from ``seed``, packed into rows of ``max_len`` tokens
    (:func:`fedlora_edge.core.data.pack_examples`), the rows shuffled; ``batch_size`` rows a batch, so a
    step sees every example its rows hold (TRL's packing: the batch counts packed sequences)."""
    rng = random.Random(seed)
    rows: list[Block] = []
    while True:
        batch: list[Block] = []
        while len(batch) < batch_size:
            if not rows:
                order = list(range(len(encoded)))
                rng.shuffle(order)
                rows = pack_examples([encoded[i] for i in order], max_len)
                rng.shuffle(rows)
            batch.append(rows.pop())
        yield batch


def train_steps(model, params: list[torch.nn.Parameter], batch_iter: Iterator[dict], steps: int,
                lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0, slowdown: float = 1.0,
                hooks=None, optimizer: str = "adamw", schedule: str = "constant", warmup_steps: int = 0,
                grad_accum: int = 1, scaler=None) -> list[float]:
    """Run ``steps`` AdamW (or plain SGD) steps of ``model`` on ``params``, each on ``grad_accum``
    batches; returns each step's loss (the mean over its batches).

    ``slowdown > 1`` stretches every step to that multiple of its time (emulating a slower device).
    ``hooks`` (e.g. :class:`fedlora_edge.edge_client.partial.PartialTraining`) has ``after_backward()``, called
    before gradient clipping, and ``after_step()``, called after each optimiser step.  ``scaler``
    (a ``torch.amp.GradScaler``, for a float16 base) scales the loss and unscales the gradients
    before the hooks see them; a step whose gradients overflowed is skipped, as the scaler does.
    """
    import torch

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got '{optimizer}'")
    opt = (torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=lr, weight_decay=weight_decay))
    sched = None if schedule == "constant" and warmup_steps == 0 else lr_scheduler(opt, schedule, warmup_steps, steps)
    losses = []
    model.train()
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            total = 0.0
            for _ in range(grad_accum):
                loss = model(**next(batch_iter)).loss
                part = loss / grad_accum if grad_accum > 1 else loss
                (scaler.scale(part) if scaler is not None else part).backward()
                total += float(loss.detach())
            loss = total / grad_accum
            if scaler is not None:
                scaler.unscale_(opt)
            if hooks is not None:
                hooks.after_backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            if hooks is not None:
                hooks.after_step()
            losses.append(loss)
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
    import torch

    if not examples:
        raise ValueError("no training examples")
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the active adapter has no trainable parameter")
    encoded = encode_examples(tokenizer, examples, settings.max_seq_len)
    pad = tokenizer.pad_token_id

    def to_device() -> Iterator[dict]:
        if settings.packing:
            for b in packed_batches(encoded, settings.batch_size, settings.max_seq_len, seed):
                yield {k: v.to(device) for k, v in collate_packed(b, pad).items()}
        else:
            for batch in batches(encoded, settings.batch_size, seed):
                yield {k: v.to(device) for k, v in collate(batch, pad).items()}

    scaler = None
    if settings.dtype == "fp16":  # a float16 base trains with loss scaling, as TrainingArguments(fp16=True) does
        check_device(settings.dtype, device)
        scaler = torch.amp.GradScaler(torch.device(device).type)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with checkpointing(peft_model, settings.gradient_checkpointing):
        losses = train_steps(peft_model, params, to_device(), settings.steps, settings.lr,
                             settings.weight_decay, settings.grad_clip, slowdown, hooks, settings.optimizer,
                             settings.lr_schedule, settings.warmup_steps, settings.grad_accum, scaler)
    seconds = time.perf_counter() - t0
    return TrainResult(len(losses), losses[0], losses[-1], sum(losses) / len(losses), seconds, len(examples),
                       tuple(losses))


@contextmanager
def checkpointing(peft_model, on: bool):
    """Gradient (activation) checkpointing of the base's decoder layers while training, as
    ``TrainingArguments(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant":
    False})`` sets it: transformers' own switch, which also makes the embedding output require grad
    (what peft needs where only adapters train); both undone on exit."""
    if not on:
        yield
        return
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    try:
        yield
    finally:
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()
        base.disable_input_require_grads()
