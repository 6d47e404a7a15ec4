"""The federated run, transport aside: set-up, planning, assignments, validation, aggregation,
evaluation, reports.

``fedlora simulate`` drives an :class:`Engine` with an in-process trainer; the MQTT coordinator
drives the same engine over a broker.  A round is

1. :meth:`Engine.open_round`: sample devices, plan each, and make its :class:`Assignment` (the
   JSON meta and the safetensors bytes of the factors to start from, exactly as sent);
2. the transport carries the assignments out and brings back, per device, the update's bytes and
   its JSON report, or a failure;
3. :meth:`Engine.close_round`: decode and validate each update against *that device's* plan,
   aggregate the valid ones (below ``min_updates`` the global adapter is kept and the round is
   marked failed), evaluate, record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge_client.data import Example, domain_counts, generate_task, load_jsonl, prompt_ids
from edge_client.et_train import ProgramStore, program_spec, unsupported
from edge_client.experts import mixture_model, mixture_of, save_mixture
from edge_client.lora import (
    ClientPlan,
    Factors,
    adapted_modules,
    from_state_dict,
    install_adapter,
    to_state_dict,
    uniform_plan,
)
from edge_client.models import default_target_modules, load_model, resolve_model
from edge_client.partial import split_update, update_shapes
from edge_client.wire import PayloadError, decode_tensors, encode_tensors
from edge_client.work import assignment_meta, trainer_of

from .aggregate import Contribution
from .config import ConfigError, RunConfig
from .evaluate import evaluate, mix_accuracy
from .faults import crash_point
from .fleet import Device, load_fleet
from .methods import MethodContext, get_method
from .partition import builtin_client_data, domain_mix, split_pool
from .planner import NO_FOOTPRINT, Capacity, Footprint, ModelShape, plan_capacity
from .runstate import RoundJournal, SnapshotStore, StateError, state_files
from .validate import UpdateRejected, capped_weight, check_report, validate_update

GLOBAL, CLIENT = "global", "personal"
MAX_UPDATE_BYTES = 512 * 2**20


@dataclass
class ClientData:
    """A device of the run: its profile, its data (in simulation; a real device keeps its own)."""

    id: str
    device: Device | None
    train: list[Example]
    mix: dict[str, float]
    capacity: Capacity | None = None
    declared_examples: int | None = None  # what a real device said in its hello (shown, never trusted)
    max_examples: int | None = None  # the weight cap the coordinator grants it (its enrolment); None: its data

    @property
    def examples(self) -> int:
        """Its example count as shown: what a real device declared, else its simulated data."""
        return self.declared_examples if self.declared_examples is not None else len(self.train)


@dataclass(frozen=True)
class Assignment:
    """One device's work for one round, as it goes on the wire: ``meta`` (JSON) and ``start``
    (safetensors bytes of the factors it starts from)."""

    client: str
    round: int
    plan: ClientPlan
    meta: dict
    start: bytes
    start_tensor_bytes: int = 0  # the float32 payload of ``start`` (the closed form of what was sent)


@dataclass(frozen=True)
class Returned:
    """What came back for an assignment: the update and its report, or a failure reason.
    ``contribution`` is the update already validated (over MQTT it is checked before the ack)."""

    assignment: Assignment
    update: bytes | None = None
    report: dict | None = None
    failure: str | None = None
    contribution: Contribution | None = None


@dataclass
class RunState:
    """Everything a run carries from round to round."""

    global_factors: Factors
    # JSON-able values, plus "personal" (client -> factors) and "tensors" (name -> tensor), saved as safetensors
    method_state: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)


def method_context(cfg: RunConfig, dims) -> MethodContext:
    method = get_method(cfg.method)
    return MethodContext(dims, cfg.lora.scale, cfg.lora.rank, cfg.lora.max_rank, cfg.seed,
                         cfg.method_settings.get(method.section))


def capacity_for(cfg: RunConfig, shape: ModelShape, profile, fp: Footprint = NO_FOOTPRINT) -> Capacity:
    """The planner's capacity for ``profile`` under this run's LoRA, training and planner settings,
    with what the method adds beyond the trained rank (``fp``)."""
    t, p = cfg.train, cfg.planner
    return plan_capacity(profile, shape, max_rank=cfg.lora.max_rank, steps=t.steps, batch=t.batch_size,
                         seq=t.max_seq_len, deadline_s=p.round_deadline_s, overhead_gb=p.runtime_overhead_gb,
                         transfer_budget_s=p.transfer_budget_s, footprint=fp)


def pick_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def build_data(cfg: RunConfig, n_clients: int) -> tuple[list[list[Example]], list[dict], list[Example]]:
    """(per-client training examples, per-client domain mix, held-out eval examples)."""
    d = cfg.data
    if d.train_file:
        pool = load_jsonl(d.train_file)
        evals = load_jsonl(str(d.eval_file))
        domains = sorted(domain_counts(pool))
        mixes = domain_mix(n_clients, domains, d.partition, skew=d.skew, alpha=d.alpha, seed=cfg.seed)
        return split_pool(pool, mixes, d.samples_per_client, cfg.seed), mixes, evals
    domains = list(d.tasks)
    mixes = domain_mix(n_clients, domains, d.partition, skew=d.skew, alpha=d.alpha, seed=cfg.seed)
    train = builtin_client_data(mixes, d.samples_per_client, cfg.seed)
    evals = [ex for t in domains for ex in generate_task(t, d.eval_per_domain, seed=cfg.seed, split="eval")]
    return train, mixes, evals


class Engine:
    """A run's state and every step of it but the transport.  ``__init__`` validates and loads
    everything (model, fleet, data, plans) so that a bad run fails before any round starts."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, reporter=None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.method = get_method(cfg.method)
        self.source = resolve_model(cfg.model)
        self.fleet = load_fleet(cfg.fleet)
        self.device = pick_device(cfg.device)
        self.reporter = reporter or _Silent()
        self.t_start = time.perf_counter()

        self.reporter.status(f"loading model {cfg.model}")
        self.model, self.tok = load_model(self.source, self.device)
        targets = list(cfg.lora.target_modules) or default_target_modules(self.model)
        self.targets = targets
        self.dims = adapted_modules(self.model, targets)
        self.ctx = method_context(cfg, self.dims)
        self.shape = ModelShape.from_model(self.model, self.dims)
        self.R = self.method.global_rank(self.ctx)

        train, mixes, self.eval_examples = build_data(cfg, len(self.fleet))
        self.clients = [ClientData(dev.id, dev, tr, mix) for dev, tr, mix in zip(self.fleet, train, mixes)]
        self.by_id = {c.id: c for c in self.clients}
        for c in self.clients:
            c.capacity = self._capacity(c.device.profile)
        # devices the method can give a plan; the others are reported (fleet table, report) and
        # never sampled, so every round gets clients_per_round devices that can train
        able = self._eligible()
        # training programs for devices with the executorch trainer, built when first planned
        self.programs = ProgramStore(self.out / "programs", log=self.reporter.status)
        on_et = [c.id for c in able if c.device.profile.trainer == "executorch"]
        if on_et and not self.method.plain_plans:
            raise ConfigError(f"method {cfg.method}: its plans hold frozen components, score importance or route "
                              f"experts, which the executorch trainer cannot carry; devices {on_et} run it "
                              "(their profiles say trainer: executorch)")
        # a method that pools every client's data (the centralized reference, `pools_data`) is a run
        # of one pooled client per round, with the step budget of the round's federated clients,
        # and nothing crosses a wire; the rest of the engine only sees its participants
        self.pooled = self.method.pools_data
        if self.pooled and cfg.contamination.attack not in ("none", "random_labels"):
            raise ConfigError(f"contamination.attack: {cfg.contamination.attack} corrupts a device's update, and "
                              f"method {cfg.method} sends none (its data is pooled); use random_labels")
        self.contaminated = contaminated_clients(cfg, [c.id for c in able])
        for c in self.clients:
            if c.id in self.contaminated and cfg.contamination.attack == "random_labels":
                c.train = poison(c.train, cfg.seed, c.id)
        self.per_round = min(cfg.clients_per_round, len(able))  # devices that can train in a round
        self.round_steps = cfg.train.steps * (self.per_round if self.pooled else 1)
        self.participants = ([ClientData("pooled", None, [ex for c in self.clients for ex in c.train], {})]
                             if self.pooled else able)
        self.by_id.update({c.id: c for c in self.participants})
        reachable = min(cfg.clients_per_round, len(self.participants))
        if reachable < cfg.min_updates:
            raise ConfigError(
                f"min_updates: {cfg.min_updates} valid updates per round cannot be reached: "
                f"{reachable} client(s) per round can train with method {cfg.method} on fleet {cfg.fleet} "
                f"({len(able)} of {len(self.clients)} devices have the capacity)")
        cut = sum(len(prompt_ids(self.tok, e.prompt)) >= cfg.train.max_seq_len for e in self.eval_examples)
        if cut:
            self.reporter.status(f"note: {cut} of {len(self.eval_examples)} chat-formatted eval prompts are longer "
                                 f"than train.max_seq_len ({cfg.train.max_seq_len}) and are cut from the left, "
                                 "in training and in evaluation alike")

        from peft import get_peft_model

        from edge_client.lora import init_global_factors, lora_config

        gplan = uniform_plan(self.dims, self.R, cfg.lora.scale)
        self.model = get_peft_model(self.model, lora_config(gplan, targets, cfg.lora.dropout), adapter_name=GLOBAL)
        self.state = RunState(init_global_factors(self.dims, self.R, cfg.seed))
        self.nonce = secrets.token_hex(16)  # this run's identity on the wire (kept by a resume)
        self.store = SnapshotStore(self.out / "state", log=self.reporter.status)
        self.journal = RoundJournal(self.out / "state", log=self.reporter.status)

    def _capacity(self, profile) -> Capacity:
        return capacity_for(self.cfg, self.shape, profile, self.method.footprint(self.ctx))

    # ----------------------------------------------------------------------------- state on disk

    def save_state(self) -> None:
        """Snapshot the run after its last completed round (global adapter, per-client adapters,
        round records, base accuracy, method state, nonce), crash-safely (:mod:`.runstate`)."""
        ms = self.state.method_state
        run = {"method": self.cfg.method, "model": self.cfg.model, "seed": self.cfg.seed, "nonce": self.nonce,
               "completed_round": len(self.state.rounds), "rounds": self.state.rounds,
               "base_accuracy": getattr(self, "base_accuracy", None),
               "method_state": {k: v for k, v in ms.items() if k not in ("personal", "tensors")}}
        files = state_files(run, to_state_dict(self.state.global_factors),
                            {cid: to_state_dict(f) for cid, f in ms.get("personal", {}).items()}, ms.get("tensors"))
        done = len(self.state.rounds)
        self.store.write(done, files)
        self.journal.prune(done)

    def load_state(self) -> int:
        """Restore the newest usable snapshot; returns the last completed round."""
        try:
            loaded = self.store.load()
        except StateError as exc:
            raise ConfigError(f"--resume: {exc}") from None
        if loaded is None:
            raise ConfigError(f"--resume: no saved run state in {self.store.folder}")
        _, files = loaded
        try:
            saved = json.loads(files["run.json"])
            for key in ("method", "model", "seed"):
                if saved[key] != getattr(self.cfg, key):
                    raise ConfigError(f"--resume: the saved run has {key}={saved[key]!r}, the config says "
                                      f"{getattr(self.cfg, key)!r}")
            self.state.global_factors = from_state_dict(decode_tensors(files["global.safetensors"]))
            personal = {name[len("personal/"):-len(".safetensors")]: from_state_dict(decode_tensors(data))
                        for name, data in files.items() if name.startswith("personal/")}
            self.state.method_state = dict(saved["method_state"])
            if personal:
                self.state.method_state["personal"] = personal
            if "method.safetensors" in files:
                self.state.method_state["tensors"] = dict(decode_tensors(files["method.safetensors"]))
            self.state.rounds = saved["rounds"]
            self.nonce = str(saved["nonce"])
            if saved.get("base_accuracy"):
                self.base_accuracy = saved["base_accuracy"]
            return int(saved["completed_round"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"--resume: the saved state in {self.store.folder} is not one this version "
                              f"reads ({type(exc).__name__}: {exc})") from None

    # ------------------------------------------------------------------------------------ rounds

    def sample(self, round_idx: int, available: set[str] | None = None) -> list[ClientData]:
        """This round's devices: ``clients_per_round`` of the eligible (and available) ones, from
        the seed; with every device available, the same choice in simulation and over MQTT."""
        pool = [c for c in self.participants if available is None or c.id in available]
        rng = random.Random(f"sample|{self.cfg.seed}|{round_idx}")
        return sorted(rng.sample(pool, min(self.cfg.clients_per_round, len(pool))), key=lambda c: c.id)

    def set_profile(self, client: str, profile, examples: int | None = None) -> None:
        """A device said hello with its (measured) profile and example count: plan it from that."""
        c = self.by_id[client]
        c.declared_examples = examples
        c.device = Device(client, profile)
        c.capacity = self._capacity(profile)
        self.participants = self._eligible()

    def add_client(self, client: str, profile, examples: int, domains: dict[str, int]) -> ClientData:
        """A device not in the fleet joins (open enrolment): planned from its hello; its domain mix
        is the one it declared (used only to report accuracy on its own mix)."""
        total = sum(domains.values())
        mix = {d: n / total for d, n in domains.items()} if total else {}
        c = ClientData(client, Device(client, profile), [], mix)
        self.clients.append(c)
        self.by_id[client] = c
        self.set_profile(client, profile, examples)
        return c

    def _eligible(self) -> list[ClientData]:
        """Devices the method can give a plan; the others are reported and never sampled."""
        return [c for c in self.clients if self.method.plan(c.id, c.capacity.rank, self.ctx, 1, None) is not None]

    def open_round(self, round_idx: int, available: set[str] | None = None) -> tuple[list[Assignment], list[dict]]:
        """(assignments, skipped) for the sampled devices of round ``round_idx``."""
        t = self.cfg.train
        settings = dataclasses.replace(t, steps=self.round_steps)
        out, skipped = [], []
        for c in self.sample(round_idx, available):
            capacity = c.capacity.rank if c.capacity else self.R
            plan = self.method.plan(c.id, capacity, self.ctx, round_idx, self.state.method_state)
            if plan is None:
                why = c.capacity.reason if c.capacity and c.capacity.reason else "below the method's rank"
                skipped.append({"client": c.id, "capacity": capacity, "reason": why})
                continue
            trainer, device_settings = None, settings
            profile = c.device.profile if c.device else None
            if profile is not None and profile.trainer == "executorch":
                why = unsupported(plan)
                if why:
                    skipped.append({"client": c.id, "capacity": capacity, "reason": why})
                    continue
                device_settings = dataclasses.replace(settings, optimizer="sgd", lr=t.sgd_lr)
                _, side = self.programs.get(program_spec(self.cfg.model, plan, self.targets, t.batch_size,
                                                         t.max_seq_len, profile.trainer_base))
                trainer = {"backend": "executorch", "program": side["key"], "sha256": side["sha256"],
                           "bytes": side["bytes"]}
            start = self.method.start_factors(c.id, self.state.global_factors, plan, self.state.method_state)
            meta = assignment_meta(round_idx=round_idx, plan=plan, seed=hash_seed(self.cfg.seed, round_idx, c.id),
                                   settings=device_settings, targets=self.targets, dropout=self.cfg.lora.dropout,
                                   model=self.cfg.model)
            if trainer:
                meta["trainer"] = trainer
            tensors = {**to_state_dict(start), **self.method.start_extras(c.id, plan, self.state.method_state)}
            out.append(Assignment(c.id, round_idx, plan, meta, encode_tensors(tensors),
                                  4 * sum(t.numel() for t in tensors.values())))
        return out, skipped

    def accept(self, a: Assignment, update: bytes, report) -> Contribution:
        """Decode and validate one update against its assignment's plan, and its report; the
        weight is the coordinator's (:meth:`weight`).  UpdateRejected, naming the client, if bad."""
        rep = check_report(a.client, report, a.round, int(a.meta["train"]["steps"]))
        try:
            tensors = decode_tensors(update, MAX_UPDATE_BYTES)
        except PayloadError as exc:
            raise UpdateRejected(f"client {a.client}: {exc}") from None
        validate_update(a.client, tensors, update_shapes(self.dims, a.plan))
        tensors, importance, extras = split_update(tensors)
        for module, scores in importance.items():
            if bool((scores < 0).any()):
                raise UpdateRejected(f"client {a.client}: importance scores of '{module}' are negative")
        return Contribution(a.client, a.plan, from_state_dict(tensors), self.weight(a.client, rep["num_examples"]),
                            importance, extras)

    def weight(self, client: str, claimed: int) -> float:
        """A client's aggregation weight: 1 under ``weights.policy: equal``; else its claimed example
        count capped by what the coordinator grants it (its enrolment's ``max_examples``, or in
        simulation its data), never more."""
        if self.cfg.weights.policy == "equal":
            return 1.0
        c = self.by_id[client]
        cap = c.max_examples if c.max_examples is not None else (len(c.train) or self.cfg.weights.max_examples)
        return float(capped_weight(claimed, cap))

    def close_round(self, round_idx: int, returned: list[Returned], skipped: list[dict], t0: float,
                    rejected: list[dict] | None = None) -> dict:
        """Validate, aggregate, evaluate and record round ``round_idx``; returns its record.
        ``rejected``: updates the transport already refused (over MQTT, at arrival)."""
        cfg = self.cfg
        rows, failed, contribs = [], [], []
        rejected = list(rejected or [])
        for ret in returned:
            a, c = ret.assignment, self.by_id[ret.assignment.client]
            if ret.failure is not None:
                failed.append({"client": a.client, "reason": ret.failure})
                continue
            rep = _report_of(ret)
            rows.append({"client": a.client, "device": c.device.profile.name if c.device else "server",
                         "rank": a.plan.rank, "capacity": c.capacity.rank if c.capacity else self.R,
                         "trainer": trainer_of(a.meta),
                         "uplink_bytes": 0 if self.pooled else len(ret.update or b""),
                         "downlink_bytes": 0 if self.pooled else len(a.start),
                         "local_seconds": rep.get("seconds"), "steps": rep.get("steps"),
                         "loss_first": rep.get("first_loss"), "loss_last": rep.get("last_loss"),
                         "num_examples": rep.get("num_examples"),
                         "tensor_bytes": 4 * sum(math.prod(s) for s in update_shapes(self.dims, a.plan).values()),
                         "downlink_tensor_bytes": a.start_tensor_bytes,
                         "predicted_round_seconds": round(c.capacity.round_s, 1) if c.capacity else None})
            try:
                contribs.append(ret.contribution or self.accept(a, ret.update or b"", ret.report))
            except (UpdateRejected, ValueError) as exc:
                rejected.append({"client": a.client, "reason": str(exc)})
        ok = len(contribs) >= cfg.min_updates
        said = {}
        if ok:
            self.state.global_factors, said = self.method.aggregate(self.state.global_factors, contribs, self.ctx,
                                                                    self.state.method_state)
        crash_point("aggregate")
        record = {"round": round_idx, "status": "ok" if ok else "failed", "clients": rows,
                  "skipped": skipped, "failed": failed, "rejected": rejected, "valid_updates": len(contribs)}
        record.update(said)  # what the method says of this round (CLAIR's detection, FedLEASE's allocation)
        # a method without a global model (local, fedlease) has nothing to score per round
        if self.method.global_model and (round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds):
            record["accuracy"] = self.evaluate_global()
        record["seconds"] = round(time.perf_counter() - t0, 2)
        self.state.rounds.append(record)
        self.reporter.round_end(record)
        return record

    # -------------------------------------------------------------------------------- evaluation

    def _install_global(self) -> None:
        ranks = {m: a.shape[0] for m, (a, _) in self.state.global_factors.items()}
        plan = uniform_plan(self.dims, max(ranks.values()), self.cfg.lora.scale)
        install_adapter(self.model, GLOBAL, plan, self.state.global_factors, self.targets, 0.0)

    def _evaluate(self) -> dict:
        return evaluate(self.model, self.tok, self.eval_examples, self.cfg.max_new_tokens, self.device,
                        self.cfg.train.max_seq_len)

    def evaluate_global(self) -> dict:
        self._install_global()
        return self._evaluate()

    def evaluate_base(self) -> dict:
        with self.model.disable_adapter():
            return self._evaluate()

    def evaluate_personal(self, base: dict, fallback: dict | None = None) -> dict:
        """Each client's own model on the held-out set, and on its own domain mix.  A client with no
        model of its own is scored on ``fallback`` (the global adapter's accuracy, for methods
        whose such clients use it), else on the base model (its starting adapter has B = 0)."""
        per_client, shared = {}, {}
        for c in self.clients:
            own = self.method.personal_model(c.id, self.ctx, self.state.method_state)
            if own is None:
                acc = fallback or base
            elif own[2] is not None and own[2] in shared:
                acc = shared[own[2]]
            else:
                plan, tensors, key = own
                with mixture_model(self.model, CLIENT, plan, tensors, self.targets):
                    acc = self._evaluate()
                if key is not None:
                    shared[key] = acc
            per_client[c.id] = {"overall": acc["overall"], "per_domain": acc["per_domain"],
                                "own_mix": mix_accuracy(acc["per_domain"], c.mix), "trained": own is not None}
        n = len(per_client)
        domains = next(iter(per_client.values()))["per_domain"]
        return {"clients": per_client, "clients_trained": sum(v["trained"] for v in per_client.values()),
                "overall": sum(v["overall"] for v in per_client.values()) / n,
                "own_mix": sum(v["own_mix"] for v in per_client.values()) / n,
                "per_domain": {d: sum(v["per_domain"][d] for v in per_client.values()) / n for d in domains}}

    # --------------------------------------------------------------------------------------- run

    def begin(self) -> None:
        """Evaluate the base model and show the fleet; call once before the first round."""
        self.reporter.status("evaluating the base model")
        self.base_accuracy = self.evaluate_base()
        self.reporter.base(self.base_accuracy, self.clients, self.R)

    def finish(self) -> dict:
        """Final evaluation, report, adapters and plots on disk; returns the report."""
        base = self.base_accuracy
        final = self.state.rounds[-1].get("accuracy") or self.evaluate_global()
        fallback = final if self.method.personal_fallback == "global" else None
        personal = self.evaluate_personal(base, fallback) if self.method.personalised else {}
        own_mix = (personal.get("own_mix") if personal else
                   sum(mix_accuracy(final["per_domain"], c.mix) for c in self.clients) / len(self.clients))
        report = self._report(base, final, personal, own_mix)
        self.save(report)
        self.reporter.final(report)
        return report

    def _report(self, base: dict, final: dict, personal: dict, own_mix: float) -> dict:
        from edge_client import __version__

        rounds = self.state.rounds
        headline = personal if personal else final
        return {
            "fedlora_edge_version": __version__,
            "method": self.cfg.method, "model": self.cfg.model, "device": self.device,
            "config": self.cfg.to_dict(), "global_rank": self.R, "target_modules": self.targets,
            "fleet": [{"client": c.id, "profile": c.device.profile.name, "capacity": c.capacity.rank,
                       "predicted_memory_gb": round(c.capacity.memory_gb, 3),
                       "usable_memory_gb": c.capacity.usable_gb,
                       "predicted_round_seconds": round(c.capacity.round_s, 1),
                       "reason": c.capacity.reason, "eligible": self.pooled or c in self.participants,
                       "train_examples": c.examples,
                       "domain_mix": {k: round(v, 3) for k, v in c.mix.items()}} for c in self.clients],
            "base_accuracy": base,
            "rounds": rounds,
            "final_accuracy": {"overall": headline["overall"], "per_domain": headline["per_domain"],
                               "own_mix": own_mix,
                               "evaluated": "each client's own adapter" if personal else "the global adapter"},
            "global_adapter_accuracy": final,
            "personalised": personal,
            "totals": {"uplink_bytes": sum(r["uplink_bytes"] for x in rounds for r in x["clients"]),
                       "downlink_bytes": sum(r["downlink_bytes"] for x in rounds for r in x["clients"]),
                       "failed_rounds": sum(x["status"] == "failed" for x in rounds),
                       "rejected_updates": sum(len(x["rejected"]) for x in rounds)},
            "contamination": self._contamination_report(final, personal),
            "method_summary": self.method.summary(self.state.method_state),
            "wall_seconds": round(time.perf_counter() - self.t_start, 1),
        }

    def _contamination_report(self, final: dict, personal: dict) -> dict:
        """Who was contaminated, how, the benign clients' accuracy, and detection precision/recall
        over every (round, client) the method judged."""
        co = self.cfg.contamination
        benign = [c for c in self.clients if c.id not in self.contaminated]
        acc = [personal["clients"][c.id] if personal else
               {"overall": final["overall"], "own_mix": mix_accuracy(final["per_domain"], c.mix)} for c in benign]
        out = {"attack": co.attack, "fraction": co.fraction, "clients": sorted(self.contaminated),
               "benign_accuracy": sum(a["overall"] for a in acc) / len(acc) if acc else None,
               "benign_own_mix": sum(a["own_mix"] for a in acc) / len(acc) if acc else None}
        judged = [(x["round"], cid, cid in x["detection"]["flagged"]) for x in self.state.rounds
                  if "detection" in x for cid in x["detection"]["scores"]]
        if judged:
            tp = sum(f and cid in self.contaminated for _, cid, f in judged)
            fp = sum(f and cid not in self.contaminated for _, cid, f in judged)
            fn = sum(not f and cid in self.contaminated for _, cid, f in judged)
            out["detection"] = {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
                                "precision": tp / (tp + fp) if tp + fp else None,
                                "recall": tp / (tp + fn) if tp + fn else None}
        return out

    def write_report(self, report: dict) -> None:
        (self.out / "report.json").write_text(json.dumps(report, indent=1))

    def save(self, report: dict) -> None:
        from .report import save_adapter, save_plots

        self.out.mkdir(parents=True, exist_ok=True)
        if self.method.global_model:
            save_adapter(self.out / "adapter", self.state.global_factors, self.cfg.lora.scale, self.targets,
                         self.cfg.model)
        for c in self.clients:
            own = self.method.personal_model(c.id, self.ctx, self.state.method_state)
            if own is None:
                continue
            plan, tensors, _ = own
            folder = self.out / "clients" / c.id
            if mixture_of(plan) is not None:
                save_mixture(folder / "model", plan, tensors, self.cfg.model, self.targets)
            else:
                save_adapter(folder / "adapter", from_state_dict(tensors), self.cfg.lora.scale, self.targets,
                             self.cfg.model)
        self.write_report(report)
        save_plots(report, self.out)


def _report_of(ret: Returned) -> dict:
    """The device's JSON report, or {} when it sent none or not a mapping (its update is then
    rejected for want of an example count)."""
    return ret.report if isinstance(ret.report, dict) else {}


def contaminated_clients(cfg: RunConfig, ids: list[str]) -> set[str]:
    """``round(fraction × len(ids))`` of ``ids`` (the devices that can train), chosen from the seed."""
    n = round(cfg.contamination.fraction * len(ids)) if cfg.contamination.attack != "none" else 0
    return set(random.Random(f"contaminate|{cfg.seed}").sample(sorted(ids), n))


def poison(examples: list[Example], seed: int, client: str) -> list[Example]:
    """Data poisoning: every response replaced by another example's response, at random."""
    rng = random.Random(f"poison|{seed}|{client}")
    responses = [e.response for e in examples]
    return [dataclasses.replace(e, response=rng.choice(responses)) for e in examples]


def hash_seed(seed: int, round_idx: int, client: str) -> int:
    """The training seed of one client in one round (sent in its assignment)."""
    return int(hashlib.sha256(f"{seed}|{round_idx}|{client}".encode()).hexdigest()[:8], 16)


class _Silent:
    def __getattr__(self, name):
        return lambda *a, **k: None
