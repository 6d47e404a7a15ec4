"""``--engine ray``: ``simulate``'s clients and ``compare``'s runs on a Ray cluster.

``simulate --engine ray``: the coordinator's side stays in this process (plans, validation, the
ordered fold, evaluation, the report); each client's training runs in a Ray actor, a *training
worker*.  The frozen base is put once in Ray's object store (its tensors as raw bytes, one array
each): a worker on the same node maps them without a copy, builds the model around them once
(architecture from a weightless copy of the base, the global adapter wrapped on as this process
does) and keeps it for the whole run; per client-round only the plan, the start factors and the
update cross.  Where the method folds components into the base weights (Fed-PLoRA), a worker holds
a private copy of the adapted modules' weights only.

Workers are grouped by device class (the fleet's profile names): a class's workers reserve, in
Ray's scheduler, the memory the planner predicts its devices' training needs beyond the shared
base (``memory``), and ``cpus_per_worker`` CPUs; with fewer workers than classes, classes share
workers reserving the largest of their figures.  A client-round goes to an idle worker of its
class.  A worker that dies (killed, out of memory, its node lost) costs that client's update for
the round (recorded as the client's failure, with the reason) and a new worker takes its place;
the run goes on (it stops after ``RayPool.MAX_DEATHS_IN_A_ROW`` deaths with no training finished
between them).  Training that raises in a worker raises here, as on the local engine.

The same seed gives the same adapter, bit for bit, as the local engine: a worker runs the same
:func:`~fedlora_edge.edge_client.work.run_assignment` on the same base with the same seed, and
the engine folds updates in assignment order whichever worker finishes first.

``compare --engine ray`` (:func:`fedlora_edge.coordinator.compare.run_on_ray`): every (method,
seed) run is a Ray task that runs ``simulate`` on the node it lands on and sends its run folder
back (the files, as bytes), so no shared filesystem is needed; a finished run is reused as ever.

A Ray cluster is one trust domain: Ray passes task arguments and results between its processes
with pickle, which this project never applies to what crosses its own wire or disk.  Run the
cluster on a private network (docs/deploy.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .config import ConfigError

WORKER_DIED = "its training worker died"


def ray_module():
    """``ray``, or ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install 'fedlora-edge[ray]' (or pip install 'ray>=2.40')") from None
    return ray


def connect(address: str | None = None, cpus: int | None = None):
    """Connect to a Ray cluster (``address``, else ``$RAY_ADDRESS``), or start one on this machine
    with ``cpus`` CPUs (default: all).  Returns ``ray``; a second call reuses the connection."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": True}
    # the workers import this package: where it is not installed on the nodes (a source checkout), Ray
    # ships nothing by itself, so the run needs it installed on every node (docs/deploy.md)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"--address {address}: cannot reach a Ray cluster there ({exc}); start one with "
                              "`ray start --head` or leave --address out to start one on this machine") from None
    else:
        ray.init(num_cpus=cpus, **kwargs)
    return ray


def cluster_cpus(ray) -> int:
    return int(ray.cluster_resources().get("CPU", 1))


# ---- the shared base --------------------------------------------------------------------------------


def _skeleton(model):
    """A copy of ``model`` whose every parameter and buffer is a weightless ``meta`` tensor (tied
    weights stay tied): what a worker builds its model from."""
    import copy

    import torch

    memo: dict[int, Any] = {}
    for p in model.parameters(recurse=True):
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers(recurse=True):
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _tensors(model) -> tuple[dict[str, Any], dict[str, str]]:
    """``(arrays, names)``: each distinct parameter or buffer of ``model`` as a flat ``uint8`` numpy
    view of its bytes (keyed by its first name), and every name -> the key it shares (tied weights)."""
    import torch

    arrays: dict[str, Any] = {}
    names: dict[str, str] = {}
    seen: dict[int, str] = {}
    items = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in items:
        key = seen.setdefault(id(t), name)
        names[name] = key
        if key == name:
            arrays[key] = t.detach().contiguous().view(-1).view(dtype=torch.uint8).numpy()
    return arrays, names


def _install(model, arrays: dict[str, Any], names: dict[str, str], specs: dict[str, tuple[str, tuple[int, ...]]],
             private: set[str]) -> None:
    """Set every parameter and buffer of the weightless ``model`` to a view of ``arrays`` (shared,
    read-only memory; a private copy for the names in ``private``)."""
    import warnings

    import torch

    made: dict[str, torch.Tensor] = {}
    for name, key in names.items():
        if key not in made:
            dtype, shape = specs[key]
            with warnings.catch_warnings():  # the object store's arrays are read-only: never written here
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arrays[key]).view(getattr(torch, dtype)).view(shape)
            made[key] = t.clone() if key in private else t
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(made[key], requires_grad=False)
        else:
            owner._buffers[leaf] = made[key]
    # tied weights: one Parameter object per key, as in the original
    shared: dict[str, torch.nn.Parameter] = {}
    for name, key in names.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if leaf in owner._parameters:
            owner._parameters[leaf] = shared.setdefault(key, owner._parameters[leaf])


@dataclass
class SharedBase:
    """What a worker builds its model from: object-store references to the weightless skeleton,
    the tensors' bytes and how to read them, and the global adapter's config."""

    skeleton: Any
    arrays: Any
    names: dict[str, str]
    specs: dict[str, tuple[str, tuple[int, ...]]]
    gplan: dict
    targets: list[str]
    dropout: float
    private: set[str] = field(default_factory=set)
    nbytes: int = 0

    @classmethod
    def put(cls, ray, engine) -> SharedBase:
        """Put ``engine``'s frozen base in the object store, once."""
        from fedlora_edge.core.lora import uniform_plan

        base = engine.model.get_base_model()
        # the base as it was loaded: the peft layers' own base_layer weights are the base's; the
        # adapters (global, client) are built again by each worker
        clean = _unwrapped(base)
        arrays, names = _tensors(clean)
        specs = {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape))
                 for k, t in _named(clean).items() if k in arrays}
        private: set[str] = set()
        if engine.method.footprint(engine.ctx).fold:  # folding writes into the adapted modules' weights
            targets = set(engine.targets)
            # every name of an adapted module's weight, through the key it shares (a tied weight's too)
            private = {key for name, key in names.items() if name.endswith(".weight")
                       and name.rsplit(".", 2)[-2] in targets}
        gplan = uniform_plan(engine.dims, engine.R, engine.cfg.lora.scale)
        return cls(ray.put(_skeleton(clean)), ray.put(arrays), names, specs, gplan.to_json(), list(engine.targets),
                   engine.cfg.lora.dropout, private, sum(a.nbytes for a in arrays.values()))


def _named(model) -> dict:
    return dict(list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)))


def _unwrapped(peft_base):
    """The base model without peft's layers: a shallow rebuild where each LoRA layer is replaced by
    its ``base_layer`` (the same weight tensors, nothing copied)."""
    import copy

    from peft.tuners.lora import LoraLayer

    memo: dict[int, Any] = {id(t): t for t in list(peft_base.parameters()) + list(peft_base.buffers())}
    clean = copy.deepcopy(peft_base, memo)
    for name, module in list(clean.named_modules()):
        if isinstance(module, LoraLayer):
            owner_name, _, leaf = name.rpartition(".")
            owner = clean.get_submodule(owner_name) if owner_name else clean
            setattr(owner, leaf, module.base_layer)
    if hasattr(clean, "peft_config"):
        del clean.peft_config
    return clean


class TrainingWorker:
    """The actor: one model around the shared base, kept across rounds; trains any client's plan."""

    def __init__(self, base: SharedBase, examples, threads: int, kill_on: set[str] | None = None):
        import ray
        import torch
        from peft import get_peft_model

        from fedlora_edge.core.lora import ClientPlan, lora_config
        from fedlora_edge.core.quiet import quiet_third_party

        from .engine import GLOBAL

        quiet_third_party()
        torch.set_num_threads(threads)
        skeleton = ray.get(base.skeleton) if isinstance(base.skeleton, ray.ObjectRef) else base.skeleton
        arrays = ray.get(base.arrays) if isinstance(base.arrays, ray.ObjectRef) else base.arrays
        _install(skeleton, arrays, base.names, base.specs, base.private)
        self.model = get_peft_model(skeleton.eval(), lora_config(ClientPlan.from_json(base.gplan), base.targets,
                                                                 base.dropout), adapter_name=GLOBAL)
        self.examples = ray.get(examples) if isinstance(examples, ray.ObjectRef) else examples
        self.tok = self.examples.pop("__tokenizer__")
        self.kill_on = set(kill_on or ())

    def train(self, client: str, meta: dict, start: bytes, feedback: dict) -> tuple[bytes, dict, dict]:
        from fedlora_edge.edge_client.work import run_assignment

        if client in self.kill_on:  # tests: a worker that dies mid-round
            os._exit(1)
        update, report = run_assignment(self.model, self.tok, self.examples[client], meta, start, "cpu",
                                        feedback=feedback)
        return update, report, feedback

    def memory(self) -> dict:
        """This worker's memory in bytes: rss, its peak, and uss (the pages it alone holds: the
        shared base is not among them)."""
        import resource

        import psutil

        m = psutil.Process().memory_full_info()
        return {"rss": m.rss, "uss": m.uss, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "pid": os.getpid()}


@dataclass
class _Call:
    client: str
    args: tuple
    group: int
    ref: Any = None
    actor: Any = None
    result: Any = None
    done: bool = False


class RayPool:
    """Training workers for one simulation: ``submit`` an assignment, ``take`` its result (the
    update, report and the device's error feedback, or a :class:`WorkerLost`)."""

    def __init__(self, engine, workers: int | None = None, cpus_per_worker: int = 1, address: str | None = None,
                 kill_on: set[str] | None = None, reporter=None, private_base: bool = False):
        """``private_base``: each worker copies the whole base out of the object store (what sharing
        saves, for bench/ray_engine.py)."""
        self.ray = ray = connect(address)
        if engine.device != "cpu":
            raise ConfigError(f"--engine ray trains on CPU workers; device {engine.device} is not supported with it "
                              "(use --device cpu, or the local engine on a GPU)")
        if engine.cfg.train.base_quant != "none":
            raise ConfigError("--engine ray shares a float base between workers; train.base_quant "
                              f"{engine.cfg.train.base_quant} is not supported with it (use the local engine)")
        self.cpus = max(1, int(cpus_per_worker))
        workers = workers or max(1, cluster_cpus(ray) // self.cpus)
        self.base = SharedBase.put(ray, engine)
        if private_base:
            self.base.private = set(self.base.specs)
        examples = {c.id: list(c.train) for c in engine.participants}
        examples["__tokenizer__"] = engine.tok
        self.examples = ray.put(examples)
        self.groups = device_groups(engine, workers, self.base.nbytes)
        self.remote = ray.remote(TrainingWorker)
        self.kill_on = kill_on
        self.actors: list[list[Any]] = [[self._worker(g) for _ in range(g.workers)] for g in self.groups]
        self._ready(reporter)
        self.group_of = {cid: i for i, g in enumerate(self.groups) for cid in g.clients}
        self.idle: list[list[Any]] = [list(a) for a in self.actors]
        self.queue: list[list[_Call]] = [[] for _ in self.groups]
        self.running: dict[Any, _Call] = {}
        self.deaths = 0
        self.deaths_in_a_row = 0
        if reporter is not None:
            reporter.status(f"ray: {sum(g.workers for g in self.groups)} training worker(s) of {self.cpus} CPU(s) "
                            f"on {cluster_cpus(ray)} CPU(s); base {self.base.nbytes / 2**20:.0f} MB in the object "
                            "store; classes " + "; ".join(g.describe() for g in self.groups))

    READY_S = 300.0  # a worker not built by then cannot be placed (its reservation) or fails to start

    def _ready(self, reporter=None) -> None:
        """Every worker built, or an error that says why not (a reservation no node can give is never
        scheduled, and a run would wait for it for ever)."""
        refs = {a.__ray_ready__.remote(): (i, a) for i, g in enumerate(self.actors) for a in g}
        ready, pending = self.ray.wait(list(refs), num_returns=len(refs), timeout=self.READY_S)
        try:
            self.ray.get(ready)
        except self.ray.exceptions.RayError as exc:
            self.close()
            raise ConfigError(f"--engine ray: a training worker failed to start: {exc}") from None
        if pending:
            g = self.groups[refs[pending[0]][0]]
            have = self.ray.cluster_resources()
            self.close()
            raise ConfigError(f"--engine ray: {len(pending)} training worker(s) not started within {self.READY_S:.0f} s: "
                              f"each of class {'+'.join(g.classes)} reserves {self.cpus} CPU(s) and "
                              f"{g.memory / 2**30:.1f} GiB; the cluster has {have.get('CPU', 0):.0f} CPU(s) and "
                              f"{have.get('memory', 0) / 2**30:.1f} GiB for tasks. Ask for fewer --workers (or "
                              "--cpus-per-worker), or add nodes")

    def _worker(self, g: Group, replacing: bool = False):
        """A new training worker reserving ``g``'s resources (``replacing``: one that died; tests'
        ``kill_on`` kills the first workers only)."""
        opts: dict[str, Any] = {"num_cpus": self.cpus, "max_restarts": 0}
        if g.memory:
            opts["memory"] = g.memory
        return self.remote.options(**opts).remote(self.base, self.examples, self.cpus,
                                                  None if replacing else self.kill_on)

    def submit(self, client: str, meta: dict, start: bytes, feedback: dict) -> _Call:
        call = _Call(client, (client, meta, start, feedback), self.group_of.get(client, 0))
        self.queue[call.group].append(call)
        self._start()
        return call

    def _start(self) -> None:
        for g, q in enumerate(self.queue):
            while q and self.idle[g]:
                call = q.pop(0)
                call.actor = self.idle[g].pop(0)
                call.ref = call.actor.train.remote(*call.args)
                self.running[call.ref] = call

    def take(self, call: _Call) -> tuple[bytes, dict, dict]:
        """The call's result (waiting for it); raises WorkerLost where its worker died."""
        while not call.done:
            ready, _ = self.ray.wait(list(self.running), num_returns=1)
            for ref in ready:
                c = self.running.pop(ref)
                actor = c.actor
                try:
                    c.result = self.ray.get(ref)
                    self.deaths_in_a_row = 0
                except self.ray.exceptions.RayTaskError as exc:  # training raised: as it would here
                    self.close()
                    raise exc.as_instanceof_cause() from None
                except self.ray.exceptions.RayError as exc:  # the worker died: killed, out of memory, its node lost
                    self.deaths += 1
                    self.deaths_in_a_row += 1
                    if self.deaths_in_a_row > self.MAX_DEATHS_IN_A_ROW:
                        self.close()
                        raise RuntimeError(f"--engine ray: {self.deaths_in_a_row} training workers died one after "
                                           f"another, the last with {type(exc).__name__}: {exc}") from None
                    c.result = WorkerLost(f"{WORKER_DIED} ({type(exc).__name__}); a new worker takes its place")
                    members = self.actors[c.group]
                    self.ray.kill(c.actor)  # whatever is left of it gives its reservation back
                    actor = members[members.index(c.actor)] = self._worker(self.groups[c.group], replacing=True)
                c.done = True
                self.idle[c.group].append(actor)
                c.args = ()
            self._start()
        if isinstance(call.result, WorkerLost):
            raise call.result
        return call.result

    MAX_DEATHS_IN_A_ROW = 8  # more, with no training finished between them: the workers cannot run (stop)

    def discard(self, call: _Call) -> None:
        """Drop a call whose result is no longer wanted: taken out of the queue when it has not
        started (one that runs finishes, and its result is dropped)."""
        q = self.queue[call.group]
        if call in q:
            q.remove(call)
            call.done, call.args = True, ()

    def memory(self) -> list[dict]:
        """Each worker's memory (rss, uss)."""
        return self.ray.get([a.memory.remote() for g in self.actors for a in g])

    def close(self) -> None:
        for g in self.actors:
            for a in g:
                try:
                    self.ray.kill(a)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.actors = []


class WorkerLost(Exception):
    """A client-round's training worker died or its training raised."""


@dataclass
class Group:
    """Device classes served by the same workers, and what each of those workers reserves."""

    classes: list[str]
    clients: list[str]
    memory: int
    workers: int = 1

    def describe(self) -> str:
        return f"{'+'.join(self.classes)}: {self.workers} worker(s), {self.memory / 2**20:.0f} MB reserved each"


def device_groups(engine, workers: int, base_bytes: int) -> list[Group]:
    """The fleet's device classes (profile names) and their workers: each class's reservation is
    the planner's predicted training memory of its devices beyond the shared base (the largest);
    ``workers`` are shared out in proportion to the classes' devices, at least one each; with
    fewer workers than classes, classes of near reservations share workers (the largest kept)."""
    by_class: dict[str, list] = {}
    for c in engine.participants:
        name = c.device.profile.name if c.device else "pooled"
        by_class.setdefault(name, []).append(c)
    need = {}
    for name, cs in by_class.items():
        gb = max((c.capacity.memory_gb if c.capacity else 0.0) for c in cs)
        need[name] = max(int(gb * 2**30) - base_bytes, 0)
    names = sorted(by_class, key=lambda n: (need[n], n))
    k = max(1, min(workers, len(names)))
    # split the classes (ordered by reservation) into k runs of near-equal device counts
    groups: list[Group] = []
    total = sum(len(by_class[n]) for n in names)
    acc, bucket = 0, []
    for i, n in enumerate(names):
        bucket.append(n)
        acc += len(by_class[n])
        left_classes, left_groups = len(names) - i - 1, k - len(groups) - 1
        if left_groups == 0 and left_classes:
            continue
        if acc * k >= total * (len(groups) + 1) or left_classes == left_groups:
            groups.append(Group(list(bucket), sorted(c.id for b in bucket for c in by_class[b]),
                                max(need[b] for b in bucket)))
            bucket = []
    if bucket:
        groups.append(Group(list(bucket), sorted(c.id for b in bucket for c in by_class[b]), max(need[b] for b in bucket)))
    spare = max(0, workers - len(groups))
    for g in groups:
        g.workers = 1
    for _ in range(spare):  # each spare worker to the group with the most devices per worker
        max(groups, key=lambda g: (len(g.clients) / g.workers, -g.workers)).workers += 1
    return groups
