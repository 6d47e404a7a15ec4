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

Aggregation streams: the round's :class:`~coordinator.aggregate.OrderedFold` (``engine.fold``,
opened with the round) takes each update as soon as it is validated (:meth:`Engine.offer`) and
folds it into the method's accumulator in the round's assignment order, so the result never
depends on arrival order; an update that arrives early is parked on disk (its journal copy) and
reloaded in its turn.  A method whose rule is a running sum then holds adapter-sized sums only.

Around it: the data each client gets is :mod:`.partition`'s, made-up contamination
:mod:`.contamination`'s, the run's state on disk :mod:`.runstate`'s, the report and the saved
adapters :mod:`.report`'s.  What a method does is its own module's (:mod:`.methods`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedlora_edge.core.clip import update_norm
from fedlora_edge.core.compress import decode as decode_payload
from fedlora_edge.core.compress import encode as encode_payload
from fedlora_edge.core.data import Example, example_lengths
from fedlora_edge.core.dtypes import PrecisionError, check_device
from fedlora_edge.core.lora import (
    ClientPlan,
    Factors,
    adapted_modules,
    from_state_dict,
    install_adapter,
    slice_factors,
    to_state_dict,
    uniform_plan,
)
from fedlora_edge.core.models import (
    cache_root,
    default_target_modules,
    load_model,
    resolve_model,
    weights_digest,
)
from fedlora_edge.core.secagg import Params
from fedlora_edge.core.wire import PayloadError
from fedlora_edge.edge_client.et_train import program_spec, schedule_unsupported, unsupported
from fedlora_edge.edge_client.experts import mixture_model
from fedlora_edge.edge_client.partial import split_update, update_reference, update_shapes
from fedlora_edge.edge_client.work import assignment_meta, trainer_of

from .aggregate import Contribution, OrderedFold, server_step
from .config import ConfigError, RunConfig
from .contamination import (
    DATA_ATTACKS,
    ROUND_ATTACKS,
    UPDATE_ATTACKS,
    contaminated_clients,
    corrupt_data,
    triggered,
)
from .errors import StorageError
from .et_compile import CompilingStore
from .evaluate import answer_rate, evaluate, lead_metric, mix_accuracy
from .faults import crash_point
from .fleet import Device, load_fleet
from .fleetplan import capacity_for, method_context, planned_by
from .methods import get_method
from .methods.base import Accumulator
from .partition import build_data, cut_note
from .planner import Capacity, ModelShape
from .privacy import (
    Accountant,
    DPSettings,
    NoisedSum,
    adaptive_clip,
    epsilon_for,
    no_amplification_epsilon,
    noise_generator,
    poisson_sample,
    update_noise_multiplier,
)
from .report import build_report, save_outputs, write_report
from .runstate import RoundJournal, RunState, SnapshotStore, restore, snapshot_files
from .secure import SecureSum
from .summary import RunSummary
from .validate import UpdateRejected, capped_weight, check_report, validate_update

if TYPE_CHECKING:
    from .programs import BackgroundBuilds

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

    @property
    def fleet_device(self) -> Device:
        """Its device: every client of the fleet has one (only the centralized reference's pooled
        data has none, and it is never planned)."""
        if self.device is None:
            raise ValueError(f"client {self.id} has no device")
        return self.device

    @property
    def planned(self) -> Capacity:
        """What the planner gave it (set as soon as its device is known)."""
        if self.capacity is None:
            raise ValueError(f"client {self.id} has not been planned")
        return self.capacity


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
    start_len: int | None = None  # ``len(start)`` once ``start`` is released (simulate, after training)

    @property
    def downlink_bytes(self) -> int:
        return len(self.start) if self.start_len is None else self.start_len

    def released(self) -> Assignment:
        """This assignment without its start blob (what a round keeps once the device trained)."""
        return dataclasses.replace(self, start=b"", start_len=self.downlink_bytes)


@dataclass(frozen=True)
class Returned:
    """What came back for an assignment: the update and its report, or a failure reason.
    ``contribution`` is the update already validated (over MQTT it is checked before the ack)."""

    assignment: Assignment
    update: bytes | None = None
    report: dict | None = None
    failure: str | None = None
    contribution: Contribution | None = None
    update_len: int | None = None  # ``len(update)`` where the bytes were released once validated
    folded: bool = False  # validated and offered to the round's fold already (:meth:`Engine.offer`)

    @property
    def uplink_bytes(self) -> int:
        return len(self.update or b"") if self.update_len is None else self.update_len


def pick_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


class Engine:
    """A run's state and every step of it but the transport.  ``__init__`` validates and loads
    everything (model, fleet, data, plans) so that a bad run fails before any round starts."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, reporter=None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self._resolve()
        self.reporter = reporter or _Silent()
        self.t_start = time.perf_counter()
        self._load_model()
        self._build_data()
        # devices the method can give a plan; the others are reported (fleet table, report) and
        # never sampled, so every round gets clients_per_round devices that can train
        self._able: dict[str, bool] = {}  # device -> the method can plan it (kept per device: a hello re-plans one)
        able = self._eligible()
        self._check_trainers(able)
        # a method that pools every client's data (the centralized reference, `pools_data`) is a run
        # of one pooled client per round, with the step budget of the round's federated clients,
        # and nothing crosses a wire; the rest of the engine only sees its participants
        self.pooled = self.method.pools_data
        self._apply_contamination(able)
        self._choose_participants(able)
        self._note_cut_examples()
        self._add_global_adapter()
        self._open_stores()
        self._setup_privacy()

    def _resolve(self) -> None:
        """The run's method, model source, fleet and torch device; the device's own precision rule
        (fp16 only on CUDA) is checked before anything loads."""
        cfg = self.cfg
        self.method = get_method(cfg.method)
        self.source = resolve_model(cfg.model)
        self.fleet = load_fleet(cfg.fleet)
        self.device = pick_device(cfg.device)
        try:
            check_device(cfg.train.dtype, self.device)
        except PrecisionError as exc:
            raise ConfigError(f"{exc} (device: {cfg.device})") from None

    def _load_model(self) -> None:
        """The base model and what follows from its shape: the adapted modules, the method's
        context, the planner's model shape and the global rank R."""
        cfg = self.cfg
        self._check_targets()
        self.reporter.status(f"loading model {cfg.model}")
        self.model, self.tok = load_model(self.source, self.device, cfg.train.dtype, cfg.train.base_quant)
        self.targets = list(cfg.lora.target_modules) or default_target_modules(self.model)
        self.dims = adapted_modules(self.model, self.targets)
        self.ctx = method_context(cfg, self.dims)
        if cfg.train.base_quant != "none" and self.method.footprint(self.ctx).fold:
            raise ConfigError(f"train.base_quant: method {cfg.method} folds components into the base weights, which a "
                              f"quantized ({cfg.train.base_quant}) base cannot hold; use train.base_quant none")
        self.shape = ModelShape.from_model(self.model, self.dims)
        self.R = self.method.global_rank(self.ctx)

    def _check_targets(self) -> None:
        """lora.target_modules, where given, checked on the model's shape alone, before its weights load."""
        if not self.cfg.lora.target_modules:
            return
        from fedlora_edge.core.lora import TargetModulesError

        from .planner import meta_shape

        try:
            meta_shape(self.cfg.model, list(self.cfg.lora.target_modules))
        except TargetModulesError as exc:
            raise ConfigError(str(exc)) from None

    def _build_data(self) -> None:
        """Each device's training data and the held-out set, the run's prompt format and leading
        metric, and the clients with their planned capacity."""
        cfg = self.cfg
        self.data_notes: list[str] = []
        train, mixes, self.eval_examples = build_data(cfg, [d.id for d in self.fleet], self.data_notes)
        for note in self.data_notes:
            self.reporter.status(f"note: {note}")
        # the run's prompt format, recorded beside its adapters for `fedlora export` and `generate`: the system
        # prompt its held-out examples carry (the built-in tasks' own), else data.system_prompt
        systems = {ex.system for ex in self.eval_examples}
        self.system_prompt = systems.pop() if len(systems) == 1 else cfg.data.system_prompt
        self.lead, self.lead_reason = lead_metric(cfg.eval.metric, self.tok, self.eval_examples, cfg.max_new_tokens,
                                                  builtin=not cfg.data.user_data)
        self.clients = [ClientData(dev.id, dev, tr, mix) for dev, tr, mix in zip(self.fleet, train, mixes)]
        self.by_id = {c.id: c for c in self.clients}
        for c in self.clients:
            c.capacity = self._capacity(c.fleet_device.profile, c.id)

    def _check_trainers(self, able: list[ClientData]) -> None:
        """The store of the executorch devices' training programs and the trainers a hello may name;
        ConfigError where devices of ``able`` train with executorch and the run asks for what that
        trainer cannot carry."""
        cfg = self.cfg
        # training programs for devices with the executorch trainer, built when first planned
        # (kept across runs in FEDLORA_CACHE/et-programs, keyed on the spec, the base's weights and versions)
        self.programs = CompilingStore(self.out / "programs", log=self.reporter.status,
                                       cache=cache_root() / "et-programs",
                                       identity=lambda: weights_digest(self.model, self.tok))
        self.builds: BackgroundBuilds | None = None  # over MQTT: BackgroundBuilds (programs needed mid-run are built off the thread)
        # a device's hello may name only these trainers (torch, the fleet's own, transport.trainers)
        self.trainers_allowed = {"torch", *cfg.transport.trainers, *(d.profile.trainer for d in self.fleet)}
        on_et = [c.id for c in able if c.fleet_device.profile.trainer == "executorch"]
        why = schedule_unsupported(cfg.train)
        if on_et and why:
            raise ConfigError(f"devices {on_et} train with executorch (their profiles say trainer: executorch): {why}")
        if on_et and not self.method.plain_plans:
            raise ConfigError(f"method {cfg.method}: its plans hold frozen components, score importance or route "
                              f"experts, which the executorch trainer cannot carry; devices {on_et} run it "
                              "(their profiles say trainer: executorch)")

    def _apply_contamination(self, able: list[ClientData]) -> None:
        """Made-up contamination (contamination.*) of the devices that can train: their data corrupted
        now for a data attack, the backdoor's probes for the held-out set; a pooled run refuses an
        attack on updates (it sends none)."""
        cfg = self.cfg
        if self.pooled and cfg.contamination.attack not in ("none", *DATA_ATTACKS):
            raise ConfigError(f"contamination.attack: {cfg.contamination.attack} corrupts a device's update, and "
                              f"method {cfg.method} sends none (its data is pooled); use one of {', '.join(DATA_ATTACKS)}")
        self.contaminated = contaminated_clients(cfg, [c.id for c in able])
        for c in self.clients:
            if c.id in self.contaminated:
                c.train = corrupt_data(cfg, c.id, c.train)
        # the backdoor's probes: every held-out prompt with the trigger, the target as its answer
        self.backdoor_probes = ([triggered(e, cfg.contamination) for e in self.eval_examples]
                                if cfg.contamination.attack == "backdoor" else [])

    def _choose_participants(self, able: list[ClientData]) -> None:
        """The clients that take part (``able``, or the one pooled client), the step budget of a round;
        ConfigError where ``min_updates`` cannot be reached."""
        cfg = self.cfg
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

    def _note_cut_examples(self) -> None:
        """Every example longer than train.max_seq_len is cut (training, the held-out loss and greedy
        answers alike): said once, training and held-out apart, with the length that would keep them all."""
        cut = cut_note(example_lengths(self.tok, [ex for c in self.clients for ex in c.train]),
                       example_lengths(self.tok, self.eval_examples), self.cfg.train.max_seq_len)
        if cut:
            self.data_notes.append(cut)
            self.reporter.status(f"note: {cut}")

    def _add_global_adapter(self) -> None:
        """The model wrapped by peft with the global adapter, and the run's state from its first factors."""
        from peft import get_peft_model

        from fedlora_edge.core.lora import init_global_factors, lora_config

        gplan = uniform_plan(self.dims, self.R, self.cfg.lora.scale)
        self.model = get_peft_model(self.model, lora_config(gplan, self.targets, self.cfg.lora.dropout),
                                    adapter_name=GLOBAL)
        self.state = RunState(init_global_factors(self.dims, self.R, self.cfg.seed))

    def _open_stores(self) -> None:
        """The run's identity on the wire (kept by a resume) and its state on disk: snapshots and the
        round journal (:mod:`.runstate`)."""
        self.nonce = secrets.token_hex(16)
        self.store = SnapshotStore(self.out / "state", log=self.reporter.status)
        self.journal = RoundJournal(self.out / "state", log=self.reporter.status)

    def _setup_privacy(self) -> None:
        """Device-level DP (``privacy.dp``): the sampling rate, delta, the clip and the accountant;
        secure aggregation (``privacy.secure_aggregation``)."""
        sa = self.cfg.privacy.secure_aggregation
        self.secagg = sa if sa.enabled else None
        if self.secagg is not None:
            if self.cfg.privacy.dp.enabled and self.cfg.privacy.dp.adaptive_clipping:
                raise ConfigError("privacy.secure_aggregation: adaptive clipping counts which devices' updates were "
                                  "clipped, one bit per device the coordinator would see; use a fixed clip_norm")
            if self.cfg.contamination.attack in (*UPDATE_ATTACKS, *ROUND_ATTACKS):
                raise ConfigError(f"privacy.secure_aggregation: contamination.attack {self.cfg.contamination.attack} "
                                  "corrupts an update, which secure aggregation hides; use a data attack "
                                  f"({', '.join(DATA_ATTACKS)})")
        dp = self.cfg.privacy.dp
        self.dp: DPSettings | None = dp if dp.enabled else None
        self.privacy_stopped: str | None = None
        if self.dp is None:
            return
        n = len(self.participants)
        self.dp_rate = min(1.0, self.cfg.clients_per_round / max(1, n))
        self.dp_delta = dp.target_delta if dp.target_delta is not None else 1.0 / max(2, n)
        self.dp_clip = dp.clip_norm
        # each noised sum's multiplier: the updates', and HAFL's importance scores' as a second sum
        self.dp_update_z = update_noise_multiplier(dp, n * self.dp_rate, 2 if self.method.sends_scores else 1)
        self.accountant = Accountant(dp.accountant)
        planned = epsilon_for(dp.noise_multiplier, self.dp_rate, self.cfg.rounds, self.dp_delta, dp.accountant)
        self.reporter.status(f"privacy: device-level DP, z {dp.noise_multiplier:g}, clip {dp.clip_norm:g}, "
                             f"each of {n} devices sampled with probability {self.dp_rate:.3g}; epsilon after "
                             f"{self.cfg.rounds} rounds {planned:.2f} at delta {self.dp_delta:.2g} ({dp.accountant})")
        if n * self.dp_rate < 100 or planned > 10:
            self.reporter.status(f"privacy: warning: {n} devices, {n * self.dp_rate:.0f} a round on average: "
                                 f"epsilon {planned:.1f} after {self.cfg.rounds} rounds; a useful guarantee "
                                 "(epsilon of a few units) needs hundreds of devices a round")

    def _dp_expected(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Per module, the expected number of devices that train each global component this round:
        the sampling rate times the eligible devices whose plan has it ("trainers"), or times the
        eligible devices with a plan ("all"): fixed before the round, whoever comes.  Second, for
        a method whose devices score importance, the expected number that score each component
        (None otherwise)."""
        round_idx = len(self.state.rounds) + 1
        plans = [p for c in self.participants
                 if (p := self.method.plan(c.id, c.planned.rank, self.ctx, round_idx, self.state.method_state))]
        zeros = {m: torch.zeros(ga.shape[0], dtype=ga.dtype) for m, (ga, _) in self.state.global_factors.items()}
        trainers = {m: e.clone() for m, e in zeros.items()}
        scorers = {m: e.clone() for m, e in zeros.items()} if self.method.sends_scores else None
        for plan in plans:
            for module, mp in plan.modules.items():
                trainers[module][list(mp.components)] += self.dp_rate
                if scorers is not None:
                    scorers[module][list(plan.scored(module))] += self.dp_rate
        if self.method.dp_rule(self.ctx) == "all":
            trainers = {m: e.fill_(self.dp_rate * len(plans)) for m, e in zeros.items()}
        return trainers, scorers

    def device_clip(self) -> float | None:
        """The norm a device clips its change to: DP's clip, or under secure aggregation norm-bound's
        ``max_norm`` (the coordinator cannot bound updates it never sees); None for no clip."""
        if self.dp is not None:
            return self.dp_clip
        if self.secagg is not None and self.method.name == "norm-bound":
            return float(self.cfg.method_settings["norm_bound"].max_norm)
        return None

    def secagg_round(self, round_idx: int, chosen: list[ClientData]) -> dict | None:
        """Under secure aggregation: the round's protocol parameters, the layout of the vector each
        device sums (``{"params", "dims", "rank", "context"}``) and each chosen device's weight
        (``secagg_weights``: the coordinator's own, scaled by the round's largest); else None."""
        self.secagg_weights: dict[str, float] = {}
        if self.secagg is None:
            return None
        sa = self.secagg
        self.secagg_params = Params.for_round(max(3, len(chosen)), sa.clip_range, sa.degree, sa.threshold, sa.dropout)
        raw = {c.id: self.weight(c.id, len(c.train) or c.declared_examples or 1) for c in chosen}
        top = max(raw.values(), default=1.0)
        self.secagg_weights = {k: v / top for k, v in raw.items()}
        self.secagg_context = f"{self.nonce}|{round_idx}".encode()
        return {"params": self.secagg_params.to_json(), "rank": self.R, "context": self.secagg_context.decode(),
                "dims": {m: [int(d[0]), int(d[1])] for m, d in sorted(self.dims.items())}}

    def _check_clip(self, a: Assignment, factors: Factors) -> None:
        """Refuse an update whose change from the global adapter is over the round's clip."""
        start = slice_factors(self.state.global_factors, a.plan)  # what the device started from
        norm = update_norm(to_state_dict({m: (fa - start[m][0], fb - start[m][1]) for m, (fa, fb) in factors.items()}))
        if norm > self.dp_clip * (1 + 1e-4) + 1e-7:
            raise UpdateRejected(f"client {a.client}: its update's norm {norm:.4g} is over privacy.dp's clip "
                                 f"{self.dp_clip:.4g}")

    def privacy_stop(self) -> str | None:
        """Why the next round must not run (it would take epsilon past ``privacy.dp.max_epsilon``), or None."""
        if self.dp is None or math.isinf(self.dp.max_epsilon):
            return None
        ahead = self.accountant.epsilon_after_next(self.dp.noise_multiplier, self.dp_rate, self.dp_delta)
        if ahead > self.dp.max_epsilon:
            return (f"privacy budget: round {len(self.state.rounds) + 1} would take epsilon to {ahead:.3f}, past "
                    f"privacy.dp.max_epsilon {self.dp.max_epsilon:g}")
        return None

    def stop_for_privacy(self) -> bool:
        """True (and the reason reported and kept for the report) when the next round would exceed
        the privacy budget: the run stops there and writes its outputs."""
        why = self.privacy_stop()
        if why:
            self.privacy_stopped = why
            self.reporter.status(f"privacy: stopping: {why}")
        return why is not None

    def _privacy_round(self, record: dict, returned: list[Returned]) -> None:
        """Account for a round that ran under DP; adapt the clip (its count noised)."""
        dp = self.dp
        assert dp is not None
        self.accountant.step(dp.noise_multiplier, self.dp_rate)
        eps = self.accountant.epsilon(self.dp_delta)
        record["privacy"] = {"epsilon": eps, "delta": self.dp_delta, "noise_multiplier": dp.noise_multiplier,
                             "clip_norm": self.dp_clip, "sample_rate": self.dp_rate, "accountant": dp.accountant}
        if dp.adaptive_clipping:
            unclipped = sum(1 for r in returned if (r.report or {}).get("dp_unclipped"))
            expected = self.dp_rate * len(self.participants)
            self.dp_clip = adaptive_clip(self.dp_clip, unclipped, expected, dp, noise_generator())
            record["privacy"]["next_clip_norm"] = self.dp_clip
        self.reporter.status(f"privacy: epsilon {eps:.3f} at delta {self.dp_delta:.2g} after round {record['round']}")

    def _capacity(self, profile, client: str) -> Capacity:
        return capacity_for(self.cfg, self.shape, profile, self.method.footprint(self.ctx),
                            planned_by(self.method, client, self.ctx))

    # ----------------------------------------------------------------------------- state on disk

    def save_state(self) -> None:
        """Snapshot the run after its last completed round, crash-safely (:mod:`.runstate`)."""
        done = len(self.state.rounds)
        self.store.write(done, snapshot_files(self.cfg, self.nonce, self.state, getattr(self, "base_accuracy", None)))
        self.journal.prune(done)

    def load_state(self) -> int:
        """Restore the newest usable snapshot; returns the last completed round."""
        self.state, self.nonce, base, done = restore(self.store, self.cfg)
        if base:
            self.base_accuracy = base
        if self.dp is not None:  # the privacy already spent, from the rounds on record
            for r in self.state.rounds:
                p = r.get("privacy")
                if p:
                    self.accountant.step(p["noise_multiplier"], p["sample_rate"])
                    self.dp_clip = p.get("next_clip_norm", p["clip_norm"])
        return done

    # ------------------------------------------------------------------------------------ rounds

    def sample(self, round_idx: int, available: set[str] | None = None) -> list[ClientData]:
        """This round's devices: ``clients_per_round`` of the eligible (and available) ones, from
        the seed; with every device available, the same choice in simulation and over MQTT."""
        if self.dp is not None:  # device-level DP: each eligible device takes part with probability q
            chosen = set(poisson_sample([c.id for c in self.participants], self.dp_rate))
            return [c for c in self.participants if c.id in chosen and (available is None or c.id in available)]
        pool = [c for c in self.participants if available is None or c.id in available]
        rng = random.Random(f"sample|{self.cfg.seed}|{round_idx}")
        return sorted(rng.sample(pool, min(self.cfg.clients_per_round, len(pool))), key=lambda c: c.id)

    def set_profile(self, client: str, profile, examples: int | None = None) -> None:
        """A device said hello with its (measured) profile and example count: plan it from that."""
        c = self.by_id[client]
        c.declared_examples = examples
        c.device = Device(client, profile)
        c.capacity = self._capacity(profile, client)
        self.participants = self._eligible(changed=c)

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

    def _eligible(self, changed: ClientData | None = None) -> list[ClientData]:
        """Devices the method can give a plan; the others are reported and never sampled.  With
        ``changed`` only that device is planned again (a hello: no scan of the fleet's plans)."""
        for c in ([changed] if changed is not None and self._able else self.clients):
            self._able[c.id] = c.examples > 0 and self.method.plan(c.id, c.planned.rank, self.ctx, 1, None) is not None
        return [c for c in self.clients if self._able.get(c.id)]

    def open_round(self, round_idx: int, available: set[str] | None = None) -> tuple[list[Assignment], list[dict]]:
        """(assignments, skipped) for the sampled devices of round ``round_idx``."""
        out, skipped = [], []
        blobs: dict[bytes, bytes] = {}  # equal start blobs (every FedIT device's) held once, not once per device
        chosen = self.sample(round_idx, available)
        secagg = self.secagg_round(round_idx, chosen)
        for c in chosen:
            a, skip = self.assign(c, round_idx, blobs, secagg)
            if a is not None:
                out.append(a)
            else:
                skipped.append(skip)
        self.start_fold([a.client for a in out])
        return out, skipped

    def assign(self, c: ClientData, round_idx: int, blobs: dict[bytes, bytes] | None = None,
               secagg: dict | None = None) -> tuple[Assignment | None, dict]:
        """``(assignment, {})`` of device ``c`` for round ``round_idx`` against the run's state as it
        is, or ``(None, skipped)`` with the reason the method cannot plan it.  ``blobs``: start
        blobs already made this round (an equal one is shared)."""
        t = self.cfg.train
        settings = dataclasses.replace(t, steps=self.round_steps)
        capacity = c.capacity.rank if c.capacity else self.R
        plan = self.method.plan(c.id, capacity, self.ctx, round_idx, self.state.method_state)
        if plan is None:
            why = c.capacity.reason if c.capacity and c.capacity.reason else "below the method's rank"
            return None, {"client": c.id, "capacity": capacity, "reason": why}
        trainer, device_settings = None, settings
        profile = c.device.profile if c.device else None
        if profile is not None and profile.trainer == "executorch":
            cannot = unsupported(plan)
            if cannot:
                return None, {"client": c.id, "capacity": capacity, "reason": cannot}
            device_settings = dataclasses.replace(settings, optimizer="sgd", lr=t.sgd_lr)
            spec = program_spec(self.cfg.model, plan, self.targets, t.batch_size, t.max_seq_len,
                                profile.trainer_base)
            side: dict | None
            if self.builds is None:  # simulate: built here, the run waits for it
                _, side = self.programs.get(spec)
            else:  # over MQTT: never in the coordinator's thread; the device waits for the build
                side = self.builds.ready(spec)
                if side is None:
                    self.builds.want(spec)
                    return None, {"client": c.id, "capacity": capacity, "reason": self.builds.reason(spec)}
            trainer = {"backend": "executorch", "program": side["key"], "sha256": side["sha256"],
                       "bytes": side["bytes"]}
        meta = assignment_meta(round_idx=round_idx, plan=plan, seed=hash_seed(self.cfg.seed, round_idx, c.id),
                               settings=device_settings, targets=self.targets, dropout=self.cfg.lora.dropout,
                               model=self.cfg.model, system_prompt=self.cfg.data.system_prompt,
                               clip_norm=self.device_clip(),
                               secagg={**secagg, "weight": self.secagg_weights[c.id]} if secagg else None)
        if trainer:
            meta["trainer"] = trainer
        tensors = self.start_tensors(c.id, plan)
        codec = c.capacity.compression if c.capacity else "none"
        if codec != "none":  # both ways: the start goes so, the update comes back so (core/compress.py)
            tr = self.cfg.transport
            meta["compression"] = {"codec": codec, "block": tr.compression_block,
                                   "stochastic": tr.stochastic_rounding,
                                   "error_feedback": tr.error_feedback and codec == "int4"}
        blob = encode_payload(tensors, codec, block=self.cfg.transport.compression_block)
        blob = blob if blobs is None else blobs.setdefault(blob, blob)
        return Assignment(c.id, round_idx, plan, meta, blob, 4 * sum(t.numel() for t in tensors.values())), {}

    def start_tensors(self, client: str, plan: ClientPlan) -> dict[str, torch.Tensor]:
        """What ``client`` starts from under ``plan`` (its plan's data, before any encoding): the
        method's start factors and extras from the run's state as it is (the round's start: the
        state changes only when the round closes)."""
        start = self.method.start_factors(client, self.state.global_factors, plan, self.state.method_state)
        return {**to_state_dict(start), **self.method.start_extras(client, plan, self.state.method_state)}

    def prepare_programs(self) -> None:
        """Build (or find in the cache) the training programs the fleet's executorch devices need
        for their declared profiles, before any round: a deployment calls it before it serves
        anyone, so that no build falls in a round (:mod:`.programs`)."""
        t = self.cfg.train
        for c in self.participants:
            profile = c.device.profile if c.device else None
            if profile is None or profile.trainer != "executorch":
                continue
            plan = self.method.plan(c.id, c.capacity.rank if c.capacity else self.R, self.ctx, 1,
                                    self.state.method_state)
            if plan is not None and not unsupported(plan):
                self.programs.get(program_spec(self.cfg.model, plan, self.targets, t.batch_size, t.max_seq_len,
                                               profile.trainer_base))

    def start_fold(self, order: list[str]) -> OrderedFold:
        """The round's fold over ``order`` (its devices in assignment order), from the global adapter
        as it is now; :meth:`open_round` calls it, a transport re-opening a round calls it itself."""
        acc: Accumulator
        state = self.state.method_state

        def then(scores, trained):
            self.method.fleet_importance(state, scores, trained)

        noised = None
        if self.dp is not None:  # DP-FedAvg over the method's plans (coordinator/privacy.py)
            trainers, scorers = self._dp_expected()
            noised = NoisedSum(self.state.global_factors, trainers, self.dp_update_z * self.dp_clip, noise_generator(),
                               scorers=scorers, score_std=self.dp_update_z,  # the scores' bound is 1 (unit_norm)
                               then=then)
        if self.secagg is not None:  # the sum only (coordinator/secure.py); DP's noise on it
            rule = self.method.dp_rule(self.ctx)
            assert rule is not None, "the config refuses secure aggregation for a method without a sum"
            acc = SecureSum(self.state.global_factors, rule, self.dims, self.R,
                            self.method.sends_scores, self.secagg_params, noised=noised, then=then)
        elif noised is not None:
            acc = noised
        else:
            acc = self.method.accumulator(self.state.global_factors, self.ctx, self.state.method_state)
        self.fold = OrderedFold(acc, order)
        return self.fold

    def offer(self, client: str, contribution: Contribution, reload=None) -> None:
        """Hand a validated update to the round's fold (see :class:`OrderedFold`: ``reload`` gives it
        back from disk, so an early one is not held in memory meanwhile)."""
        self.fold.offer(client, contribution, reload)

    def accept(self, a: Assignment, update: bytes, report, start: dict[str, torch.Tensor] | None = None) -> Contribution:
        """Decode and validate one update against its assignment's plan, and its report; the
        weight is the coordinator's (:meth:`weight`).  UpdateRejected, naming the client, if bad.
        ``start``: the assignment's exact start (:meth:`start_tensors` when it was made), where the
        run's state has moved on since (a buffered round's stale update); default: the state's now."""
        rep = check_report(a.client, report, a.round, int(a.meta["train"]["steps"]))
        shapes = update_shapes(self.dims, a.plan)
        comp = a.meta.get("compression") or {}
        try:
            # a compressed update is the change from its start: added back to the exact start (not the
            # quantized copy the device was sent), so no round's progress is lost to the plan's rounding
            if comp:
                reference = update_reference(start if start is not None else self.start_tensors(a.client, a.plan),
                                             a.plan)
            else:
                reference = None
            tensors = decode_payload(update, MAX_UPDATE_BYTES, reference, codec=comp.get("codec", "none"),
                                     block=comp.get("block"), shapes=shapes)
        except PayloadError as exc:
            raise UpdateRejected(f"client {a.client}: {exc}") from None
        validate_update(a.client, tensors, shapes)
        tensors, importance, extras = split_update(tensors)
        for module, scores in importance.items():
            if bool((scores < 0).any()):
                raise UpdateRejected(f"client {a.client}: importance scores of '{module}' are negative")
        if self.dp is not None:
            self._check_clip(a, from_state_dict(tensors))
            if importance and update_norm(importance) > 1 + 1e-4:
                raise UpdateRejected(f"client {a.client}: its importance scores' norm {update_norm(importance):.4g} is "
                                     "over 1 (under privacy.dp a device sends them scaled to norm 1)")
        return Contribution(a.client, a.plan, from_state_dict(tensors), self.weight(a.client, rep["num_examples"]),
                            importance, extras)

    def weight(self, client: str, claimed: int) -> float:
        """A client's aggregation weight: 1 under ``weights.policy: equal``; else its claimed example
        count capped by what the coordinator grants it (its enrolment's ``max_examples``, or in
        simulation its data), never more."""
        if self.cfg.weights.policy == "equal" or self.dp is not None:  # DP: every update weighs 1
            return 1.0
        c = self.by_id[client]
        cap = c.max_examples if c.max_examples is not None else (len(c.train) or self.cfg.weights.max_examples)
        return float(capped_weight(claimed, cap))

    def close_round(self, round_idx: int, returned: list[Returned], skipped: list[dict], t0: float,
                    rejected: list[dict] | None = None, annotate=None) -> dict:
        """Validate, aggregate, evaluate and record round ``round_idx``; returns its record.
        ``rejected``: updates the transport already refused (over MQTT, at arrival).  ``annotate``:
        called with the record before it is kept and shown (simulate's clock).  Every
        ``save_every`` rounds the global adapter is also written as a peft checkpoint,
        ``OUT/checkpoints/round-NNNN/`` (StorageError where it cannot be written)."""
        cfg = self.cfg
        rows, failed = [], []
        rejected = list(rejected or [])
        fold = self.fold
        for ret in returned:
            a, c = ret.assignment, self.by_id[ret.assignment.client]
            if ret.failure is not None:
                failed.append({"client": a.client, "reason": ret.failure})
                continue
            rep = _report_of(ret)
            rows.append({"client": a.client, "device": c.device.profile.name if c.device else "server",
                         "rank": a.plan.rank, "capacity": c.capacity.rank if c.capacity else self.R,
                         "trainer": trainer_of(a.meta),
                         "uplink_bytes": 0 if self.pooled else ret.uplink_bytes,
                         "downlink_bytes": 0 if self.pooled else a.downlink_bytes,
                         "local_seconds": rep.get("seconds"), "steps": rep.get("steps"),
                         "loss_first": rep.get("first_loss"), "loss_last": rep.get("last_loss"),
                         "losses": rep.get("losses"),
                         "num_examples": rep.get("num_examples"),
                         "tensor_bytes": 4 * sum(math.prod(s) for s in update_shapes(self.dims, a.plan).values()),
                         "downlink_tensor_bytes": a.start_tensor_bytes,
                         "compression": (a.meta.get("compression") or {}).get("codec", "none"),
                         "predicted_round_seconds": round(c.capacity.round_s, 1) if c.capacity else None})
            if ret.folded:
                continue
            try:
                fold.offer(a.client, ret.contribution or self.accept(a, ret.update or b"", ret.report))
            except (UpdateRejected, ValueError) as exc:
                rejected.append({"client": a.client, "reason": str(exc)})
        fold.drain()
        for client in fold.lost:
            rejected.append({"client": client, "reason": "its accepted update no longer reads back from the round's "
                                                         "journal (see the warning above)"})
        valid = len(fold.folded)
        ok = valid >= cfg.min_updates
        said = {}
        if ok:
            old = self.state.global_factors
            new, said = fold.finish()
            # the server step (server.optimizer), the same for every method with a global adapter
            self.state.global_factors = (server_step(old, new, cfg.server, self.state.method_state)
                                         if self.method.global_model else new)
            said = dict(said or {})
        crash_point("aggregate")
        record: dict = {"round": round_idx, "status": "ok" if ok else "failed", "clients": rows,
                  "skipped": skipped, "failed": failed, "rejected": rejected, "valid_updates": valid}
        record.update(said)  # what the method says of this round (CLAIR's detection, FedLEASE's allocation)
        if self.dp is not None:
            self._privacy_round(record, returned)
        # a method without a global model (local, fedlease) has nothing to score per round
        if self.method.global_model and (round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds):
            record["accuracy"] = self.evaluate_global()
            if round_idx != cfg.rounds:  # each prompt's scores: kept for the final evaluation only
                record["accuracy"].pop("per_example", None)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        if annotate is not None:
            annotate(record)
        self.state.rounds.append(record)
        self.reporter.round_end(record)
        if cfg.save_every and round_idx % cfg.save_every == 0:
            if self.method.global_model:
                from .report import save_checkpoint

                try:  # written whole and swapped in, as every adapter; a full disk stops the run (exit 6)
                    folder = save_checkpoint(self.run_summary(), round_idx)
                except OSError as exc:
                    raise StorageError(f"cannot write round {round_idx}'s checkpoint in {self.out / 'checkpoints'}: "
                                       f"{exc.strerror or exc}; free the space, then run again (coordinator: "
                                       "--resume, which re-opens this round)") from None
                self.reporter.status(f"checkpoint: {folder}")
            elif not getattr(self, "_said_no_checkpoint", False):
                self._said_no_checkpoint = True
                self.reporter.status(f"note: method {cfg.method} has no global adapter, so save_every writes no "
                                     "checkpoints (each client's own model is written at the end of the run)")
        return record

    # -------------------------------------------------------------------------------- evaluation

    def _install_global(self) -> None:
        ranks = {m: a.shape[0] for m, (a, _) in self.state.global_factors.items()}
        plan = uniform_plan(self.dims, max(ranks.values()), self.cfg.lora.scale)
        install_adapter(self.model, GLOBAL, plan, self.state.global_factors, self.targets, 0.0)

    def _evaluate(self) -> dict:
        out = evaluate(self.model, self.tok, self.eval_examples, self.cfg.max_new_tokens, self.device,
                       self.cfg.train.max_seq_len, with_rouge=self.cfg.eval.rouge_l or self.lead == "rouge_l")
        if self.backdoor_probes:
            out["backdoor"] = answer_rate(self.model, self.tok, self.backdoor_probes, self.cfg.train.max_seq_len,
                                          self.device)
        return out

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
        per_client: dict[str, dict] = {}
        shared: dict = {}
        examples: list = []
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
            examples.append(acc.get("per_example"))
            per_client[c.id] = {"overall": acc["overall"], "per_domain": acc["per_domain"],
                                "own_mix": mix_accuracy(acc["per_domain"], c.mix), "trained": own is not None,
                                "loss": acc["loss"], "own_mix_loss": mix_accuracy(acc["loss"]["per_domain"], c.mix),
                                **({"backdoor": acc["backdoor"]} if "backdoor" in acc else {}),
                                **({"rouge_l": acc["rouge_l"]} if "rouge_l" in acc else {})}
        n = len(per_client)
        vals = list(per_client.values())
        domains = vals[0]["per_domain"]

        def mean(get):
            return sum(get(v) for v in vals) / n

        return {"clients": per_client, "clients_trained": sum(v["trained"] for v in vals),
                "overall": mean(lambda v: v["overall"]), "own_mix": mean(lambda v: v["own_mix"]),
                "per_domain": {d: mean(lambda v, d=d: v["per_domain"][d]) for d in domains},
                "loss": {"overall": mean(lambda v: v["loss"]["overall"]),
                         "per_domain": {d: mean(lambda v, d=d: v["loss"]["per_domain"][d])
                                        for d in vals[0]["loss"]["per_domain"]}},
                "own_mix_loss": mean(lambda v: v["own_mix_loss"]),
                **({"backdoor": mean(lambda v: v["backdoor"])} if "backdoor" in vals[0] else {}),
                **({"rouge_l": {"overall": mean(lambda v: v["rouge_l"]["overall"]),
                                "per_domain": {d: mean(lambda v, d=d: v["rouge_l"]["per_domain"][d])
                                               for d in vals[0]["rouge_l"]["per_domain"]}}}
                   if "rouge_l" in vals[0] else {}),
                **({"per_example": _mean_per_example(examples)} if all(examples) else {})}

    # --------------------------------------------------------------------------------------- run

    def begin(self) -> None:
        """Evaluate the base model and show the fleet; call once before the first round."""
        self.reporter.status("evaluating the base model")
        self.base_accuracy = self.evaluate_base()
        self.reporter.leading_metric(self.lead)  # the console shows the run's leading metric first
        self.reporter.base(self.base_accuracy, self.clients, self.R)

    def finish(self) -> dict:
        """Final evaluation, report, adapters and plots on disk; returns the report."""
        base = self.base_accuracy
        final = (self.state.rounds[-1].get("accuracy") if self.state.rounds else None) or self.evaluate_global()
        fallback = final if self.method.personal_fallback == "global" else None
        personal = self.evaluate_personal(base, fallback) if self.method.personalised else {}
        own_mix = (personal["own_mix"] if personal else
                   sum(mix_accuracy(final["per_domain"], c.mix) for c in self.clients) / len(self.clients))
        own_mix_loss = (personal["own_mix_loss"] if personal else
                        sum(mix_accuracy(final["loss"]["per_domain"], c.mix) for c in self.clients) / len(self.clients))
        summary = self.run_summary()
        report = build_report(summary, base, final, personal, own_mix, own_mix_loss)
        try:
            save_outputs(summary, report)  # each file and folder written new and renamed into place
        except OSError as exc:
            raise StorageError(f"cannot write the run's outputs in {self.out}: {exc.strerror or exc}; nothing "
                               "half-written was left in place and every round is saved in "
                               f"{self.store.folder}: free the space, then `fedlora coordinator --resume` writes "
                               "the outputs without waiting for devices (simulate: run it again)") from None
        self.reporter.final(report)
        return report

    def write_report(self, report: dict) -> None:
        write_report(self.out, report)

    def run_summary(self) -> RunSummary:
        """What the report, the output files and a checkpoint read of the run, as it is now."""
        privacy = None
        if self.dp is not None:
            privacy = {"guarantee": "device-level (epsilon, delta) for the sequence of global adapters released",
                       "epsilon": self.accountant.epsilon(self.dp_delta), "delta": self.dp_delta,
                       "noise_multiplier": self.dp.noise_multiplier, "clip_norm": self.dp.clip_norm,
                       "adaptive_clipping": self.dp.adaptive_clipping, "sampling": "poisson",
                       # the sums each round releases (the updates', HAFL's importance scores') and the
                       # noise multiplier each gets so that together they cost noise_multiplier
                       "noised_sums": ["updates", "importance"] if self.method.sends_scores else ["updates"],
                       "sum_noise_multiplier": self.dp_update_z,
                       "sample_rate": self.dp_rate, "eligible_devices": len(self.participants),
                       "accountant": f"opacus {self.dp.accountant}", "rounds": self.accountant.rounds,
                       "epsilon_without_amplification": no_amplification_epsilon(
                           self.dp.noise_multiplier, self.accountant.rounds, self.dp_delta),
                       "stopped": self.privacy_stopped}
        return RunSummary(
            cfg=self.cfg, out=self.out, source=self.source, device=self.device, method=self.method, ctx=self.ctx,
            R=self.R, targets=tuple(self.targets), system_prompt=self.system_prompt, lead=self.lead,
            lead_reason=self.lead_reason, data_notes=tuple(self.data_notes), clients=tuple(self.clients),
            pooled=self.pooled, participants=frozenset(c.id for c in self.participants), privacy=privacy,
            contaminated=frozenset(self.contaminated), eval_examples=tuple(self.eval_examples), state=self.state,
            base_accuracy=getattr(self, "base_accuracy", None), t_start=self.t_start)


def _mean_per_example(per_client: list[dict]) -> dict:
    """Each prompt's scores averaged over the clients' own models."""
    return {k: [sum(v) / len(v) if None not in v else None for v in zip(*(d[k] for d in per_client))]
            for k in per_client[0]}


def _report_of(ret: Returned) -> dict:
    """The device's JSON report, or {} when it sent none or not a mapping (its update is then
    rejected for want of an example count)."""
    return ret.report if isinstance(ret.report, dict) else {}


def hash_seed(seed: int, round_idx: int, client: str) -> int:
    """The training seed of one client in one round (sent in its assignment)."""
    return int(hashlib.sha256(f"{seed}|{round_idx}|{client}".encode()).hexdigest()[:8], 16)


class _Silent:
    def __getattr__(self, name):
        return lambda *a, **k: None
