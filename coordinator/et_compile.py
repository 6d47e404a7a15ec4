"""The coordinator's compiler of ExecuTorch training programs (the device runs them: its runtime is
:mod:`fedlora_edge.edge_client.et_train`, which never imports this module).

:func:`build_program` builds the *training program* for a device's plan: the base model frozen
(float32, or int8 weights with ``trainer_base: int8``), the plan's LoRA factors the only trainable
tensors, batches of ``batch_size`` sequences of any length up to ``max_seq_len`` (a dynamic
dimension: a batch runs at its own longest sequence, as in torch), and the loss as the program's
first output.  :class:`CompilingStore` is the device's :class:`ProgramStore` plus :meth:`get`: a
program built on first use, or copied from the shared cache of built programs, whose key hashes
this file alone (:func:`_builder_digest`): an edit to the device's runtime rebuilds nothing.

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

The runtime names a trainable tensor ``m.base_model.model.<module>.lora_A.<adapter>.weight``; the
program's JSON sidecar maps each name to the wire's peft key.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from fedlora_edge.core.lora import ClientPlan, lora_config, peft_key
from fedlora_edge.edge_client.et_train import MIN_LEN, ProgramError, ProgramStore, program_key

ADAPTER = "client"  # the adapter's name inside the program (its trainable tensors' names carry it)
SOURCE = Path(__file__)  # what the build cache's key hashes (:func:`_builder_digest`)

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
        if not (isinstance(node, torch.fx.Node) and node.target == perm):
            return False
        src, dims = node.args[0], node.args[1]
        return (isinstance(dims, (list, tuple)) and list(dims) == [1, 0] and isinstance(src, torch.fx.Node)
                and src.meta["val"].dim() == 2)

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
    """sha256 of the compiler's source (this module, :data:`SOURCE`), not the device's runtime: a
    change to how programs are built changes the cache key, an edit to how they are run does not."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def _wire_key(name: str) -> str:
    """peft parameter name (``...lora_A.<adapter>.weight``) -> the wire's key (``...lora_A.weight``)."""
    for which in ("A", "B"):
        mark = f".lora_{which}.{ADAPTER}.weight"
        if name.endswith(mark):
            return peft_key(name[: -len(mark)].removeprefix("base_model.model."), which)
    raise ProgramError(f"unexpected trainable tensor '{name}' in the training program")


class CompilingStore(ProgramStore):
    """The coordinator's program store: the device's :class:`ProgramStore` (programs on disk, by
    key) plus building them (:meth:`get`) and the shared cache of built programs."""

    def __init__(self, root: str | Path, log=None, cache: str | Path | None = None, identity=None,
                 threads: int = 0):
        """``cache``: a folder shared across runs (the coordinator's: ``FEDLORA_CACHE/et-programs``)
        where a built program is kept under a key of its spec, ``identity()`` (a digest of the
        base's weights, computed on first use) and the versions of what builds it; a later run
        with the same key copies it instead of building it again.  ``threads``: the runtime's
        threads for the programs it loads (:class:`ProgramTrainer`)."""
        super().__init__(root, log=log, threads=threads)
        self.cache = Path(cache) if cache is not None else None
        self._identity_fn = identity
        self._identity: str | None = None

    def ready(self, spec: Mapping) -> dict | None:
        """The sidecar of ``spec``'s program when it is in this store or the shared cache (copied in
        from there), without building it; None when it would have to be built."""
        side = super().ready(spec)
        if side is not None:
            return side
        return self._from_cache(spec, program_key(spec))

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

        # the builder's digest covers this file; MIN_LEN (the runtime's, shared) is read by the build too
        fields = {"spec": dict(spec), "weights": self._identity, "builder": _builder_digest(), "min_len": MIN_LEN,
                  "torch": torch.__version__, "executorch": executorch.version.__version__,
                  "torchao": torchao.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
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
            cached.parent.mkdir(parents=True, exist_ok=True)
            # the sidecar first: a reader that finds a program finds the sidecar it was built with, or
            # (two runs filling the same entry) another run's, which the checksum then refuses
            write_json(cached.with_suffix(".json"), side)
            os.replace(_link_or_copy(path, cached.with_name(f"{cached.name}.tmp-{os.getpid()}")), cached)
        except Exception as exc:  # noqa: BLE001 - the run goes on without caching
            self.log(f"training program {side['key']} not kept in the cache {self.cache}: {exc}")
