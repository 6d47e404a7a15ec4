"""The ``executorch`` trainer backend, the device's side: local training inside an ExecuTorch
training program.

A device whose profile says ``trainer: executorch`` trains no PyTorch model.  The coordinator
builds a *training program* for the device's plan (its compiler,
:mod:`fedlora_edge.coordinator.et_compile`, which the device never imports): the base model frozen,
the plan's LoRA factors the only trainable tensors, batches of ``batch_size`` sequences of any
length up to ``max_seq_len`` (a dynamic dimension: a batch runs at its own longest sequence, as in
torch), and the loss as the program's first output.  The device keeps the programs it receives
(:class:`ProgramStore`) and runs them with ExecuTorch's training runtime (:func:`train_program`):
SGD, the only optimiser the runtime offers, on ``forward_backward`` gradients, with the same
batches, the same gradient clipping and the same update format as the torch backend.

What both sides share lives here: a program's spec and key (:func:`program_spec`,
:func:`program_key`, :data:`PROGRAM_VERSION`), the shortest batch it takes (:data:`MIN_LEN`) and
:class:`ProgramError`.  The compiler's build cache hashes the compiler's file alone, so an edit
to this runtime rebuilds no program.

Batches are the torch backend's, right-padded to their longest sequence: the same shapes, the
same real tokens, the same loss (mean over response tokens).  The program's JSON sidecar maps
each trainable tensor's runtime name to the wire's peft key.

Python's ExecuTorch bindings exchange tensors as torch tensors, so this Python client imports
torch for I/O; every forward and backward runs in the ExecuTorch runtime, as it would from the
runtime's C++ training API on a device without Python.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fedlora_edge.core.data import Example, collate, encode_examples
from fedlora_edge.core.lora import ClientPlan, from_state_dict, to_state_dict

from .trainer import TrainResult, TrainSettings, batches

PROGRAM_VERSION = 4  # 2: the sequence length is a dynamic dimension (up to seq_len); 3: no weight transposes;
# 4: linear and mm run in XNNPACK
BASES = ("fp32", "int8")
MIN_LEN = 3  # the shortest batch a program takes (the lower bound export allows for its length; the
# compiler reads it, and its cache key holds its value)


class ProgramError(ValueError):
    """A training program is missing, corrupt, or does not fit the assignment; the text says which."""


def unsupported(plan: ClientPlan) -> str | None:
    """Why the executorch backend cannot carry ``plan`` (None when it can): it trains plain LoRA
    factors, so plans that hold frozen components, score importance or route experts are out."""
    steps = plan.steps
    for needed, what in ((steps.hold, "frozen components held beside the trained ones"),
                         (steps.importance, "importance scoring"), (steps.experts, "routed experts")):
        if needed is not None:
            return f"the executorch trainer trains plain LoRA factors; this plan needs {what}"
    return None


def program_spec(model: str, plan: ClientPlan, targets: Sequence[str], batch_size: int, seq_len: int,
                 base: str = "fp32") -> dict:
    """What a training program is built for: the same spec gives the same program."""
    if base not in BASES:
        raise ProgramError(f"trainer_base must be one of {', '.join(BASES)}, got '{base}'")
    return {"version": PROGRAM_VERSION, "model": model, "targets": list(targets), "scale": plan.scale,
            "ranks": {m: p.rank for m, p in sorted(plan.modules.items())},
            "batch_size": int(batch_size), "seq_len": int(seq_len), "base": base}


def program_key(spec: Mapping) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


class ProgramStore:
    """Training programs on disk, by key: ``<dir>/<key>.pte`` and ``<key>.json``.  A device keeps
    the programs it received in one (:meth:`put`) and loads them (:meth:`trainer`); the
    coordinator builds into one (``CompilingStore`` in :mod:`fedlora_edge.coordinator.et_compile`)."""

    def __init__(self, root: str | Path, log=None, threads: int = 0):
        """``threads``: the runtime's threads for the programs it loads (:class:`ProgramTrainer`)."""
        self.root = Path(root)
        self.threads = threads
        self.log = log or (lambda text: None)
        self._loaded: dict[str, ProgramTrainer] = {}

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pte"

    def ready(self, spec: Mapping) -> dict | None:
        """The sidecar of ``spec``'s program when it is in this store; None when it is not."""
        path = self.path(program_key(spec))
        side_file = path.with_suffix(".json")
        if path.is_file() and side_file.is_file():
            return json.loads(side_file.read_text())
        return None

    def trainer(self, key: str) -> ProgramTrainer:
        """The program ``key`` loaded, kept loaded for the next assignment (loading runs one
        throw-away step, as long as a training step)."""
        if key not in self._loaded:
            self._loaded[key] = ProgramTrainer(self.path(key), self.threads)
        return self._loaded[key]

    def put(self, data: bytes, side: dict) -> Path:
        """Keep a received program after checking its key and its sidecar's checksum."""
        if not isinstance(side, dict) or not isinstance(side.get("key"), str) or not side["key"].isalnum():
            raise ProgramError("a training program whose metadata names no key")
        if hashlib.sha256(data).hexdigest() != side.get("sha256"):
            raise ProgramError(f"training program {side.get('key')}: checksum mismatch")
        from fedlora_edge.core.durable import write_bytes, write_json

        path = self.path(side["key"])
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(path.with_suffix(".json"), side)
        write_bytes(path, data)  # a new file renamed into place: never written through a link
        return path


def set_runtime_threads(threads: int) -> None:
    """Reset the ExecuTorch runtime's thread pool (one per process, shared by every program and
    by XNNPACK; it starts with one thread per core, whatever ``OMP_NUM_THREADS`` says) to
    ``threads``.  Only while no method runs: before a program loads."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)


class ProgramTrainer:
    """One loaded training program: set the LoRA factors, run SGD steps, read the factors back."""

    def __init__(self, path: str | Path, threads: int = 0):
        """``threads``: the runtime's threads (:func:`set_runtime_threads`), set before the
        program loads; 0 keeps the pool as it is."""
        from executorch.extension.training import _load_for_executorch_for_training

        if threads:
            set_runtime_threads(threads)
        path = Path(path)
        side_file = path.with_suffix(".json")
        if not path.is_file() or not side_file.is_file():
            raise ProgramError(f"{path}: no training program there (the .pte and its .json are both needed)")
        self.side = json.loads(side_file.read_text())
        self.spec = self.side["spec"]
        b, s = self.spec["batch_size"], self.spec["seq_len"]
        try:
            self.module = _load_for_executorch_for_training(str(path))
            # the runtime's parameters exist after one call
            self.module.forward_backward("forward", (torch.zeros((b, s), dtype=torch.long),
                                                     torch.zeros((b, s), dtype=torch.long)))
        except RuntimeError as exc:
            raise ProgramError(f"{path}: not a loadable ExecuTorch training program: "
                               f"{str(exc).splitlines()[0]}") from None
        self.params = dict(self.module.named_parameters())
        if set(self.params) != set(self.side["parameters"]):
            raise ProgramError(f"{path}: its trainable tensors do not match its sidecar")

    def set_factors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load wire-keyed factors into the program; each one must be there, with its shape."""
        by_key = {v["key"]: n for n, v in self.side["parameters"].items()}
        if set(tensors) != set(by_key):
            missing, extra = sorted(set(by_key) - set(tensors)), sorted(set(tensors) - set(by_key))
            raise ProgramError(f"the start factors do not fit the training program: missing {missing[:3]}, "
                               f"unexpected {extra[:3]}")
        for key, t in tensors.items():
            live = self.params[by_key[key]]
            if tuple(live.shape) != tuple(t.shape):
                raise ProgramError(f"'{key}': the program trains {tuple(live.shape)}, the plan sends {tuple(t.shape)}")
            live.copy_(t)

    def factors(self) -> dict[str, torch.Tensor]:
        return {v["key"]: self.params[n].detach().clone() for n, v in self.side["parameters"].items()}

    def train(self, batch_iter, steps: int, lr: float, weight_decay: float = 0.0, grad_clip: float = 1.0,
              slowdown: float = 1.0) -> list[float]:
        """``steps`` SGD steps (``lr``, ``weight_decay``; gradients clipped to a total norm of
        ``grad_clip`` as ``torch.nn.utils.clip_grad_norm_`` does); returns each step's loss."""
        from executorch.extension.training import get_sgd_optimizer

        opt = get_sgd_optimizer(self.params, lr, 0.0, 0.0, weight_decay, False)
        losses = []
        for _ in range(steps):
            t0 = time.perf_counter()
            ids, labels = next(batch_iter)
            loss = self.module.forward_backward("forward", (ids, labels))[0]
            grads = self.module.named_gradients()
            if grad_clip > 0:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
                coef = grad_clip / (float(norm) + 1e-6)
                if coef < 1.0:
                    for g in grads.values():
                        g.mul_(coef)
            opt.step(grads)
            losses.append(float(loss))
            if slowdown > 1.0:
                time.sleep((slowdown - 1.0) * (time.perf_counter() - t0))
        return losses


def program_batches(tokenizer, examples: Sequence[Example], settings: TrainSettings, seed: int,
                    fixed_len: int | None = None):
    """The torch backend's batches (same order, same seed, right-padded to the batch's longest
    sequence, at least :data:`MIN_LEN`; to ``fixed_len`` for a program of version 1, whose length
    is fixed)."""
    encoded = encode_examples(tokenizer, examples, settings.max_seq_len)
    for b in batches(encoded, settings.batch_size, seed):
        c = collate(b, tokenizer.pad_token_id, width=fixed_len or max(MIN_LEN, max(len(ids) for ids, _ in b)))
        yield c["input_ids"], c["labels"]


def train_program(trainer: ProgramTrainer, tokenizer, examples: Sequence[Example], plan: ClientPlan,
                  start: Mapping[str, torch.Tensor], settings: TrainSettings, seed: int,
                  slowdown: float = 1.0) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Train ``start`` (wire-keyed factors) under ``plan`` in the loaded program ``trainer``."""
    if not examples:
        raise ValueError("no training examples")
    why = unsupported(plan)
    if why:
        raise ProgramError(why)
    spec = trainer.spec
    if (spec["batch_size"], spec["seq_len"]) != (settings.batch_size, settings.max_seq_len):
        raise ProgramError(f"the program takes batches of {spec['batch_size']} sequences of up to {spec['seq_len']} "
                           f"tokens, the assignment {settings.batch_size} of up to {settings.max_seq_len}")
    if settings.optimizer != "sgd":
        raise ProgramError(f"the executorch trainer runs SGD only; the assignment asks for {settings.optimizer}")
    why = schedule_unsupported(settings)
    if why:
        raise ProgramError(why)
    trainer.set_factors(to_state_dict(from_state_dict(start)))
    t0 = time.perf_counter()
    fixed = spec["seq_len"] if spec.get("version", 1) < 2 else None  # version 1 programs: one fixed shape
    losses = trainer.train(program_batches(tokenizer, examples, settings, seed, fixed), settings.steps,
                           settings.lr, settings.weight_decay, settings.grad_clip, slowdown)
    seconds = time.perf_counter() - t0
    res = TrainResult(len(losses), losses[0], losses[-1], sum(losses) / len(losses), seconds, len(examples),
                      tuple(losses))
    return trainer.factors(), res


def schedule_unsupported(settings: TrainSettings) -> str | None:
    """Why the executorch trainer cannot run ``settings``' schedule, accumulation or training
    options (dtype, quantized base, checkpointing, packing: the torch trainer's), or None."""
    if settings.lr_schedule != "constant" or settings.warmup_steps:
        return (f"the executorch trainer runs SGD at a constant rate; train.lr_schedule {settings.lr_schedule} "
                f"with train.warmup_steps {settings.warmup_steps} needs the torch trainer")
    if settings.grad_accum > 1:
        return f"the executorch trainer steps on every batch; train.grad_accum {settings.grad_accum} needs the torch trainer"
    asked = [f"train.{k} {getattr(settings, k)}" for k, off in
             (("dtype", "fp32"), ("base_quant", "none"), ("gradient_checkpointing", False), ("packing", False))
             if getattr(settings, k) != off]
    if asked:
        return (f"the executorch trainer's program fixes its base (the profile's trainer_base) and its batches "
                f"(batch_size x max_seq_len); {', '.join(asked)} needs the torch trainer")
    return None
