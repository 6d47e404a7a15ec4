"""The ``executorch`` trainer backend: local training inside an ExecuTorch training program.

A device whose profile says ``trainer: executorch`` trains no PyTorch model.  The coordinator
builds a *training program* (:func:`build_program`) for the device's plan: the base model frozen
(float32, or int8 weights with ``trainer_base: int8``), the plan's LoRA factors the only trainable
tensors, batches of ``batch_size`` sequences of any length up to ``max_seq_len`` (a dynamic
dimension: a batch runs at its own longest sequence, as in torch), and the loss as the program's
first output.  The device runs it with ExecuTorch's training runtime (:func:`train_program`): SGD, the
only optimiser the runtime offers, on ``forward_backward`` gradients, with the same batches, the
same gradient clipping and the same update format as the torch backend.

How the program is made (what this stack needs; the README's "Training in ExecuTorch"):

- eager attention: the SDPA backward has no ExecuTorch kernel;
- ``torch.export`` of a wrapper that returns ``(loss,)``, then ``_export_forward_backward``;
- ``aten.empty_permuted`` (from SiLU's backward) rewritten to ``aten.empty.memory_format``: the
  portable kernels lack it; only the identity permutation it is emitted with is rewritten;
- ``to_edge(..., _check_ir_validity=False, _skip_dim_order=True)`` (the dim-order pass fixes a
  dynamic length at its example value) and ``to_executorch`` with constraint-based shape
  evaluation (memory planned for the longest batch);
- each weight transpose folded into the matmul that reads it (``linear(x, W)``), and each
  ``linear`` and ``mm`` then lowered to XNNPACK on its own, its weight an input at run time (the
  delegate cannot lower the training graph as a whole); the rest runs the runtime's portable
  and optimized kernels;
- an int8 base: torchao ``IntxWeightOnlyConfig`` on the base's Linear layers (not the LoRA factors,
  not ``lm_head``), then ``unwrap_tensor_subclass`` so that export sees plain tensors.

Batches are the torch backend's, right-padded to their longest sequence: the same shapes, the
same real tokens, the same loss (mean over response tokens).  The runtime names a trainable tensor
``m.base_model.model.<module>.lora_A.<adapter>.weight``; the program's JSON sidecar maps each
name to the wire's peft key.

Python's ExecuTorch bindings exchange tensors as torch tensors, so this Python client imports
torch for I/O; every forward and backward runs in the ExecuTorch runtime, as it would from the
runtime's C++ training API on a device without Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from fedlora_edge.core.data import Example, collate, encode_examples
from fedlora_edge.core.lora import ClientPlan, from_state_dict, lora_config, peft_key, to_state_dict

from .trainer import TrainResult, TrainSettings, batches

ADAPTER = "client"
PROGRAM_VERSION = 4  # 2: the sequence length is a dynamic dimension (up to seq_len); 3: no weight transposes;
# 4: linear and mm run in XNNPACK
BASES = ("fp32", "int8")
MIN_LEN = 3  # the shortest batch a program takes (the lower bound export allows for its length)


class ProgramError(ValueError):
    """A training program is missing, corrupt, or does not fit the assignment; the text says which."""


def unsupported(plan: ClientPlan) -> str | None:
    """Why the executorch backend cannot carry ``plan`` (None when it can): it trains plain LoRA
    factors, so plans that hold frozen components, score importance or route experts are out."""
    for key, what in (("hold", "frozen components held beside the trained ones"),
                      ("importance", "importance scoring"), ("experts", "routed experts")):
        if plan.extra.get(key) is not None:
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


def _rewrite_empty_permuted(gm) -> int:
    """``aten.empty_permuted(size, perm)`` -> ``aten.empty.memory_format(size)``; identity perms only."""
    n_done = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.empty_permuted.default:
            size, perm = node.args[0], list(node.args[1])
            if perm != list(range(len(perm))):
                raise ProgramError(f"cannot build the training program: empty_permuted with permutation {perm}")
            node.target, node.args = torch.ops.aten.empty.memory_format, (size,)
            n_done += 1
    gm.recompile()
    return n_done


def _fold_weight_transposes(gm) -> int:
    """``mm(x, permute_copy(W, [1, 0]))`` -> ``linear(x, W)``, and ``mm(x, permute(permute(W)))`` ->
    ``mm(x, W)``, on the edge graph.  Export writes every linear layer as a transpose and a matmul,
    and the runtime's ``permute_copy`` materializes the transpose: every step copied each weight
    matrix (the base's, the head's) once forward and once more back, element by element.  The
    runtime's ``linear`` kernel reads ``W`` as it is.  Returns the matmuls rewritten."""
    from executorch.exir.dialects._ops import ops as exir_ops

    mm, perm, linear = (exir_ops.edge.aten.mm.default, exir_ops.edge.aten.permute_copy.default,
                        exir_ops.edge.aten.linear.default)

    def transposed(node) -> bool:
        return (isinstance(node, torch.fx.Node) and node.target == perm and list(node.args[1]) == [1, 0]
                and node.args[0].meta["val"].dim() == 2)

    n_done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != mm or not transposed(node.args[1]):
            continue
        x, w = node.args[0], node.args[1].args[0]
        if transposed(w):  # (Wᵀ)ᵀ: the backward of x·Wᵀ
            node.args = (x, w.args[0])
        else:
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(linear, (x, w))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        n_done += 1
    for node in reversed(list(gm.graph.nodes)):  # the transposes nothing reads any more
        if node.op == "call_function" and node.target == perm and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return n_done


def _delegate_matmuls(edge):
    """Hand every ``linear`` and ``mm`` of the edge program to the XNNPACK delegate (chained ones,
    such as a LoRA branch's two factors, in one call), each weight an input at run time
    (``force_non_static_weights_for_f32_linear``).  XNNPACK cannot lower the training graph as a
    whole, but its matrix kernels run these ops about twice as fast as the runtime's own (one
    thread each), and a weight read at run time is neither copied into the delegate (the base is
    held once) nor frozen there (the LoRA factors stay trainable).  Returns (the lowered program
    manager, how many ops it delegated, how many it left to the runtime)."""
    import logging

    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig, MMConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    # fp32 only: an int8 base's weights are dequantized by the runtime, then read as fp32 inputs
    partitioner = XnnpackPartitioner(configs=[LinearConfig, MMConfig], config_precisions=ConfigPrecisionType.FP32,
                                     force_non_static_weights_for_f32_linear=True)
    quiet = logging.getLogger("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notice that to_edge_transform_and_lower is preferred: that
    try:                            # API cannot run the transpose fold between edge and lowering
        before = _matmuls(edge.exported_program().graph_module)
        lowered = edge.to_backend(partitioner)
    finally:
        quiet.setLevel(level)
    if _trained(lowered.exported_program()) != _trained(edge.exported_program()):  # a factor taken in as a constant
        raise ProgramError("cannot build the training program: lowering to XNNPACK changed its trainable tensors")
    left = _matmuls(lowered.exported_program().graph_module)
    return lowered, before - left, left


def _trained(ep) -> set[str]:
    """The parameters a training program returns gradients for, as graph inputs."""
    from torch.export.graph_signature import OutputKind

    params = set(ep.graph_signature.inputs_to_parameters.values())
    return {o.target for o in ep.graph_signature.output_specs
            if o.kind == OutputKind.GRADIENT_TO_PARAMETER and o.target in params}


def _matmuls(gm) -> int:
    """How many ``linear`` and ``mm`` ops the graph runs outside a delegate."""
    from executorch.exir.dialects._ops import ops as exir_ops

    kinds = (exir_ops.edge.aten.linear.default, exir_ops.edge.aten.mm.default)
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in kinds)


def build_program(spec: Mapping, path: str | Path, model=None, log=None) -> dict:
    """Write the training program for ``spec`` to ``path`` (``.pte``) and its sidecar
    (``.json``: the spec, the trainable names and their shapes).  ``model``: the base, loaded
    afresh from ``spec['model']`` when not given (it is changed: attention, LoRA, quantization).
    ``log``: a line per stage, with the seconds since the start.  Returns the sidecar."""
    import torch.nn.functional as F
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass
    from peft import get_peft_model
    from torch.export.experimental import _export_forward_backward

    from fedlora_edge.core.lora import ModulePlan
    from fedlora_edge.core.models import load_model

    t0 = time.perf_counter()

    def stage(line: str) -> None:
        if log is not None:
            log(f"training program: {line} ({time.perf_counter() - t0:.0f} s)")

    if model is None:
        stage(f"loading {spec['model']}")
        model, _ = load_model(spec["model"])
    model.config._attn_implementation = "eager"
    plan = ClientPlan({m: ModulePlan(tuple(range(r))) for m, r in spec["ranks"].items()}, spec["scale"])
    pm = get_peft_model(model, lora_config(plan, spec["targets"], 0.0), adapter_name=ADAPTER)
    if spec["base"] == "int8":
        stage("int8 base weights (torchao)")
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerAxis
        from torchao.utils import unwrap_tensor_subclass

        def is_base_linear(mod, fqn):
            return isinstance(mod, torch.nn.Linear) and "lora_" not in fqn and not fqn.endswith("lm_head")

        quantize_(pm, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
                  filter_fn=is_base_linear)
        unwrap_tensor_subclass(pm)
    vocab = model.config.vocab_size

    class TrainNet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, labels):
            logits = self.m(input_ids=input_ids, use_cache=False).logits
            return (F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                    ignore_index=-100),)

    pm.eval()  # no dropout in the program
    b, s = spec["batch_size"], spec["seq_len"]
    ids, labels = torch.zeros((b, s), dtype=torch.long), torch.zeros((b, s), dtype=torch.long)  # distinct: not aliased
    # the length is dynamic (MIN_LEN..seq_len): a batch runs at its own longest sequence, as in torch
    length = torch.export.Dim("seq_len", min=MIN_LEN, max=s)
    stage("exporting the forward and backward pass (torch.export)")
    ep = _export_forward_backward(torch.export.export(TrainNet(pm), (ids, labels), strict=False,
                                                      dynamic_shapes={"input_ids": {1: length}, "labels": {1: length}}))
    _rewrite_empty_permuted(ep.graph_module)
    # dim-order ops would fix the length at its example value; memory is planned for the upper bound
    stage("to the edge dialect")
    edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
    _fold_weight_transposes(edge.exported_program().graph_module)
    stage("delegating every linear and mm to XNNPACK (the longest stage: minutes for SmolLM2)")
    edge, delegated, left = _delegate_matmuls(edge)
    stage("to an ExecuTorch program")
    et = edge.to_executorch(config=ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(et.buffer)
    names = {}
    for name, p in pm.named_parameters():
        if p.requires_grad:
            names["m." + name] = {"key": _wire_key(name), "shape": list(p.shape)}
    side = {"spec": dict(spec), "key": program_key(spec), "sha256": hashlib.sha256(et.buffer).hexdigest(),
            "bytes": len(et.buffer), "xnnpack_matmuls": delegated,
            "matmuls_left": left, "parameters": names}
    path.with_suffix(".json").write_text(json.dumps(side, indent=1))
    tmp.replace(path)
    stage(f"wrote {path} ({len(et.buffer) / 2**20:.1f} MiB)")
    return side


def _link_or_copy(src: Path, dst: Path) -> Path:
    """``dst`` (a new name, never an existing file written through) for ``src``'s bytes: a hard
    link, else a copy; returns ``dst``.  Files reached through such a link are only ever replaced
    by a rename, never written in place."""
    import shutil

    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def _builder_digest() -> str:
    """sha256 of this module's source: a change to how programs are built changes the cache key."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _wire_key(name: str) -> str:
    """peft parameter name (``...lora_A.<adapter>.weight``) -> the wire's key (``...lora_A.weight``)."""
    for which in ("A", "B"):
        mark = f".lora_{which}.{ADAPTER}.weight"
        if name.endswith(mark):
            return peft_key(name[: -len(mark)].removeprefix("base_model.model."), which)
    raise ProgramError(f"unexpected trainable tensor '{name}' in the training program")


class ProgramStore:
    """Training programs on disk, by key: ``<dir>/<key>.pte`` and ``<key>.json``.  The coordinator
    builds into one (:meth:`get`); a device keeps the programs it received in one."""

    def __init__(self, root: str | Path, log=None, cache: str | Path | None = None, identity=None,
                 threads: int = 0):
        """``cache``: a folder shared across runs (the coordinator's: ``FEDLORA_CACHE/et-programs``)
        where a built program is kept under a key of its spec, ``identity()`` (a digest of the
        base's weights, computed on first use) and the versions of what builds it; a later run
        with the same key copies it instead of building it again.  ``threads``: the runtime's
        threads for the programs it loads (:class:`ProgramTrainer`)."""
        self.root = Path(root)
        self.threads = threads
        self.log = log or (lambda text: None)
        self.cache = Path(cache) if cache is not None else None
        self._identity_fn = identity
        self._identity: str | None = None
        self._loaded: dict[str, ProgramTrainer] = {}

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pte"

    def ready(self, spec: Mapping) -> dict | None:
        """The sidecar of ``spec``'s program when it is in this store or the shared cache (copied in
        from there), without building it; None when it would have to be built."""
        key = program_key(spec)
        path = self.path(key)
        side_file = path.with_suffix(".json")
        if path.is_file() and side_file.is_file():
            return json.loads(side_file.read_text())
        return self._from_cache(spec, key)

    def identity(self) -> str | None:
        """The digest of the base's weights that keys the shared cache (computed once; None without one)."""
        if self._identity is None and self._identity_fn is not None:
            self._identity = str(self._identity_fn())
        return self._identity

    def get(self, spec: Mapping) -> tuple[Path, dict]:
        """The program for ``spec`` and its sidecar, built on first use."""
        key = program_key(spec)
        path = self.path(key)
        side = self.ready(spec)
        if side is not None:
            return path, side
        self.log(f"building the executorch training program {key} (ranks "
                 f"{sorted(set(spec['ranks'].values()))}, batch {spec['batch_size']}x{spec['seq_len']}, "
                 f"{spec['base']} base)")
        t0 = time.perf_counter()
        side = build_program(spec, path, log=self.log)
        self.log(f"program {key}: {side['bytes'] / 2**20:.1f} MiB in {time.perf_counter() - t0:.0f} s")
        self._to_cache(spec, path, side)
        return path, side

    def _cache_path(self, spec: Mapping) -> Path | None:
        """Where the shared cache keeps ``spec``'s program (None without a cache)."""
        if self.cache is None or self.identity() is None:
            return None
        import executorch.version
        import peft
        import torchao
        import transformers

        fields = {"spec": dict(spec), "weights": self._identity, "builder": _builder_digest(), "torch": torch.__version__,
                  "executorch": executorch.version.__version__, "torchao": torchao.__version__,
                  "transformers": transformers.__version__, "peft": peft.__version__}
        name = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
        return self.cache / f"{name}.pte"

    def _from_cache(self, spec: Mapping, key: str) -> dict | None:
        """Copy ``spec``'s program from the shared cache into this store when it is there and its
        checksum holds; the sidecar, or None."""
        from fedlora_edge.core.durable import sha256_file, write_json

        try:
            cached = self._cache_path(spec)
            if cached is None or not cached.is_file() or not cached.with_suffix(".json").is_file():
                return None
            side = json.loads(cached.with_suffix(".json").read_text())
            self.root.mkdir(parents=True, exist_ok=True)
            dest = self.path(key)
            tmp = _link_or_copy(cached, dest.with_name(f"{dest.name}.tmp-{os.getpid()}"))
            if side.get("key") != key or sha256_file(tmp) != side.get("sha256"):  # the bytes now held, checked
                tmp.unlink(missing_ok=True)
                self.log(f"the cached training program {cached.name} does not check out: building it again")
                return None
            write_json(dest.with_suffix(".json"), side)
            os.replace(tmp, dest)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot serve is a build, never a failed run
            self.log(f"the cached training program for {key} cannot be read ({exc}): building it again")
            return None
        self.log(f"training program {key}: reused from {self.cache} (built by an earlier run)")
        return side

    def _to_cache(self, spec: Mapping, path: Path, side: dict) -> None:
        """Keep a program just built in the shared cache (a failure there is logged, not raised)."""
        from fedlora_edge.core.durable import write_json

        try:
            cached = self._cache_path(spec)
            if cached is None:
                return
            self.cache.mkdir(parents=True, exist_ok=True)
            # the sidecar first: a reader that finds a program finds the sidecar it was built with, or
            # (two runs filling the same entry) another run's, which the checksum then refuses
            write_json(cached.with_suffix(".json"), side)
            os.replace(_link_or_copy(path, cached.with_name(f"{cached.name}.tmp-{os.getpid()}")), cached)
        except Exception as exc:  # noqa: BLE001 - the run goes on without caching
            self.log(f"training program {side['key']} not kept in the cache {self.cache}: {exc}")

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
