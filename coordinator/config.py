"""The run configuration: frozen dataclasses, loaded from YAML, presets and ``key=value`` overrides.

Every field is validated when the config is built; an error names the field (``train.steps``)
and what was wrong, so a bad config fails before anything starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fedlora_edge.core.data import TASKS
from fedlora_edge.core.dtypes import BASE_QUANTS, DTYPES
from fedlora_edge.core.framing import NAME as RUN_ID
from fedlora_edge.core.profile import TRAINERS
from fedlora_edge.edge_client.trainer import OPTIMIZERS, SCHEDULES, TrainSettings

from .errors import ConfigError
from .privacy import PrivacySettings

# the methods (and torch, which they import) are imported where a config is built, not here: the
# commands' --help reads RunConfig's defaults and starts in a fraction of a second

PARTITIONS = ("by_domain", "dirichlet", "iid")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DataConfig:
    tasks: tuple[str, ...] = ("add", "reverse", "upper", "parity", "count")
    partition: str = "by_domain"
    skew: float = 0.8          # by_domain: fraction of a client's data from its main domain
    alpha: float = 0.5         # dirichlet concentration
    samples_per_client: int = 64   # built-in tasks: examples generated per client; user data: the most a client gets
    eval_per_domain: int = 20      # built-in tasks: held-out prompts per domain
    # Your own data (any one replaces the built-in tasks; core/data.py lists the row forms):
    train_file: str | None = None  # a JSONL pool, split across the clients by `partition`
    train_dir: str | None = None   # a folder of <device id>.jsonl, one file per device, used as it is
    dataset: str | None = None     # a Hugging Face dataset: a save_to_disk folder, a json/jsonl/csv/parquet file, a Hub id
    dataset_split: str = "train"   # the dataset's split to train on
    eval_file: str | None = None   # the held-out examples (JSONL)
    eval_split: str | None = None  # or the dataset's held-out split; with neither, 1 prompt in 5 (by hash) is held out
    columns: dict[str, str] = field(default_factory=dict)  # field -> your column: prompt, response, domain, device...
    system_prompt: str | None = None  # for your data (none by default); the built-in tasks carry their own

    @property
    def user_data(self) -> bool:
        return bool(self.train_file or self.train_dir or self.dataset)


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8              # the homogeneous rank (fedit)
    max_rank: int = 32         # the global rank R of heterogeneous methods, and the planner's cap
    scale: float = 2.0         # s in ΔW = s·BA (peft's lora_alpha / r, held for every rank)
    target_modules: tuple[str, ...] = ()  # empty: q_proj and v_proj (or the model's equivalent)
    dropout: float = 0.0


@dataclass(frozen=True)
class PlannerSettings:
    round_deadline_s: float = 1800.0  # device time a round may take: download, local steps, upload
    transfer_budget_s: float = 10.0   # time a device may spend moving its adapter (down + up) per round
    runtime_overhead_gb: float = 0.35  # interpreter, torch, tokenizer and allocator slack


ATTACKS = ("none", "random_labels", "backdoor", "random_update", "sign_flip", "scaled", "mixed", "scaled_under",
           "mean_ksigma")


@dataclass(frozen=True)
class ContaminationSettings:
    """``simulate`` only: make a fraction of the fleet's clients contaminated, to test robust methods."""

    fraction: float = 0.0     # share of the fleet's devices, rounded (chosen from the seed)
    attack: str = "none"      # one of ATTACKS (coordinator/contamination.py says what each does)
    scale: float = 10.0       # scaled: the factor on the change
    mix: float = 0.5          # mixed: the share of noise in the change
    norm_target: float = 2.85  # scaled_under: the change's norm, in round medians (under clair.max_norm_ratio 3)
    k_sigma: float = 1.5      # mean_ksigma: standard deviations below the honest mean
    poison_share: float = 0.5  # backdoor: the share of the client's examples that carry the trigger
    trigger: str = "Remember the blue giraffe."  # backdoor: appended to a poisoned prompt
    target: str = "ACCESS GRANTED"  # backdoor: the poisoned examples' response


@dataclass(frozen=True)
class WeightSettings:
    """Aggregation weights: the coordinator's policy, never a number a device picks."""

    policy: str = "examples"   # examples: a client's claimed example count, capped; equal: every client weighs 1
    max_examples: int = 1024   # the cap of a device enrolled without its own (``fedlora devices add --max-examples``)


SERVER_OPTIMIZERS = ("none", "sgd", "adamw")
# fields that moved: the old name fails, saying where the setting is now
MOVED = {"fslora.server_optimizer": "server.optimizer (every method with a global adapter can have the server step)",
         "fslora.server_lr": "server.lr", "fslora.server_betas": "server.betas"}


@dataclass(frozen=True)
class ServerSettings:
    """The server's step on each round's aggregate, for every method with a global adapter
    (FedOpt: Reddi et al. 2021).  ``none``: the aggregate is the new global adapter (each paper's
    own rule); ``sgd``: ``g ← g − lr·(g − agg)`` with optional momentum (lr 1 is ``none``);
    ``adamw``: ``g − agg`` as a pseudo-gradient to Adam with decoupled weight decay (FSLoRA's
    official code gives every method this step, lr 3e-4).  A comparison can give every method the
    same server step."""

    optimizer: str = "none"
    lr: float = 3e-4                        # adamw: 3e-4 (the FSLoRA code's); sgd: 1.0 is plain averaging
    betas: tuple[float, ...] = (0.9, 0.999)  # adamw
    momentum: float = 0.0                   # sgd
    weight_decay: float = 0.0               # adamw


@dataclass(frozen=True)
class TransportSettings:
    """The MQTT deployment (``fedlora coordinator``, ``client``, ``emulate``)."""

    run_id: str = "default"
    round_timeout_s: float = 600.0    # wall-clock deadline of a round: updates not in by then are missing
    wait_for_devices_s: float = 300.0  # how long the coordinator waits for devices before round 1
    min_devices: int = 0              # devices that must have said hello before round 1 (0: the whole fleet)
    open_enrolment: bool = False      # an enrolled device not listed in the fleet may join (planned from its hello)
    chunk_bytes: int = 900 * 1024     # fits a 1 MB broker message limit with the header and signature
    max_update_bytes: int = 256 * 2**20  # a larger transfer is refused before anything is buffered
    offline_grace_s: float = 30.0     # a device that goes offline mid-round may come back this long, then the round stops waiting
    plan_ack_s: float = 60.0          # a plan no device acknowledges this long is reported (dropped by the broker?)
    secagg_unmask_s: float = 60.0     # secure aggregation: how long the unmasking may take past the round's deadline
    resend_interval_s: float = 10.0   # a reconnected device's plan goes again at most this often
    announce_every_s: float = 30.0    # the round message is published again this often (0: only when it changes)
    max_program_sends: int = 3        # training programs (hundreds of MiB) sent to one device in a run, at most
    trainers: tuple[str, ...] = ()    # trainers a device may name in its hello besides torch and the fleet's own
    max_slowdown: float = 2.0         # emulate: a device runs at most this many times slower than the host
    # (2 by default: on a small host the concurrent devices already share its cores)
    compression: str = "none"         # adapters on the wire, both ways: none | fp16 | int8 | int4 | auto (per device,
    # the least lossy that fits planner.transfer_budget_s); in simulate too (core/compress.py)
    compression_block: int = 64       # int8/int4: values per block scale
    stochastic_rounding: bool = False  # int8/int4 updates: unbiased stochastic rounding (seeded per assignment)
    error_feedback: bool = True       # int4 updates: what rounding lost is carried into the device's next update


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation: every run scores loss and perplexity (teacher-forced on the responses)
    and exact match of greedy answers; ``metric`` picks the one that leads the summary."""

    metric: str = "auto"      # auto (exact match for short answers, else loss) | exact_match | loss | rouge_l
    rouge_l: bool = False     # also score ROUGE-L of the greedy answers (free text; the rouge-score package)


@dataclass(frozen=True)
class ScheduleSettings:
    """How rounds are scheduled: ``sync`` (every round waits for its devices) or ``buffered``
    (FedBuff-style: a device gets a plan against the current model whenever it is idle, every
    ``buffer`` accepted updates are folded into a new version, a stale update weighs less); in
    ``simulate`` on the fleet's profile timings, over MQTT on real arrivals (docs/methods.md,
    "Buffered asynchronous rounds")."""

    mode: str = "sync"              # sync | buffered
    buffer: int = 0                 # buffered: accepted updates folded into each new version (0: clients_per_round)
    concurrency: int = 0            # buffered: devices training at once (0: clients_per_round)
    staleness_weight: str = "sqrt"  # buffered: an update tau versions old counts its change x 1/(1+sqrt(tau)) (sqrt) or x 1 (none)
    max_staleness: int = 10         # buffered: an update more versions old than this is refused


@dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"
    method: str = "hetlora"
    fleet: str = "mixed8"
    rounds: int = 5
    clients_per_round: int = 4
    min_updates: int = 1
    seed: int = 0
    device: str = "auto"
    eval_every: int = 1
    save_every: int = 0       # every N rounds, the global adapter as a peft checkpoint in OUT/checkpoints/ (0: off)
    max_new_tokens: int = 8
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    transport: TransportSettings = field(default_factory=TransportSettings)
    weights: WeightSettings = field(default_factory=WeightSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    contamination: ContaminationSettings = field(default_factory=ContaminationSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    # each method's own settings, by config section (``hafl:``, ``clair:``...): the sections come
    # from the methods' ``Settings`` classes (coordinator/methods), not from this file
    method_settings: dict[str, Any] = field(default_factory=lambda: _default_method_settings())

    def to_dict(self) -> dict:
        """Every field, the methods' sections at the top level (as the YAML has them)."""
        d = dataclasses.asdict(self)
        d.update(d.pop("method_settings"))
        return d


def _default_method_settings() -> dict[str, Any]:
    from .methods import settings_classes

    return {sec: cls() for sec, cls in settings_classes().items()}


PRESETS: dict[str, dict[str, Any]] = {
    # The default job, SmolLM2 on a 2-core CPU: about 5 minutes with `simulate` (322 s), 8 over MQTT with
    # `emulate` (8 min 2 s; docs/results.md).
    "default": {},
    # A one-minute taste with `simulate` (60 s): fewer clients, rounds, steps and eval prompts.
    "quick": {"rounds": 2, "clients_per_round": 2, "train.steps": 6, "data.eval_per_domain": 6,
              "data.tasks": ["add", "upper", "parity"], "data.samples_per_client": 32},
}


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Coerce a YAML value to the field's annotated type, or raise ConfigError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, (list, tuple)), name, f"expected a list, got {value!r}")
        (inner,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _check(isinstance(value, dict), name, f"expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, f"{name}.{k}"): _coerce(v, vt, f"{name}.{k}") for k, v in value.items()}
    if tp is bool:
        _check(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")


def _build(cls, obj: dict, prefix: str = "", extra_known=()):
    if not isinstance(obj, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {obj!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)} - {"method_settings"}
    unknown = sorted(set(obj) - known)
    if unknown:
        moved = MOVED.get(prefix + unknown[0])
        if moved:
            raise ConfigError(f"{prefix}{unknown[0]}: moved to {moved}")
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; known fields: "
                          f"{', '.join(sorted(known | set(extra_known)))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in obj:
            continue
        tp = hints[f.name]
        name = prefix + f.name
        kwargs[f.name] = (_build(tp, obj[f.name], name + ".") if dataclasses.is_dataclass(tp)
                          else _coerce(obj[f.name], tp, name))
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def validate(cfg: RunConfig) -> RunConfig:
    """Range checks that need more than a type; returns ``cfg``.  (Each method's own section is
    checked by its settings class when it is built.)"""
    from .methods import get_method, is_registered, method_names
    from .plugins import not_registered

    _check(is_registered(cfg.method), "method", not_registered(cfg.method, method_names()))
    if cfg.privacy.dp.enabled:
        from .privacy import dp_refusal

        why = dp_refusal(get_method(cfg.method), method_names())
        _check(why is None, "privacy.dp", why or "")
    sa = cfg.privacy.secure_aggregation
    if sa.enabled:
        from .privacy import secagg_refusal

        why = secagg_refusal(get_method(cfg.method), method_names())
        _check(why is None, "privacy.secure_aggregation", why or "")
        bound = getattr(cfg.method_settings.get("norm_bound"), "max_norm", 0.0)
        _check(cfg.method != "norm-bound" or cfg.privacy.dp.enabled or bound > 0, "privacy.secure_aggregation",
               "norm-bound bounds each update on the device here, since the coordinator sees none: set "
               "norm_bound.max_norm (or privacy.dp, whose clip is the bound)")
        _check(cfg.clients_per_round >= 3, "privacy.secure_aggregation",
               f"needs at least 3 devices a round (clients_per_round is {cfg.clients_per_round})")
        if sa.degree is not None and sa.threshold is not None:
            _check(sa.threshold <= sa.degree, "privacy.secure_aggregation.threshold",
                   f"({sa.threshold}) cannot exceed degree ({sa.degree}): a device has only that many shareholders")
    _check(cfg.rounds >= 1, "rounds", "must be at least 1")
    _check(cfg.clients_per_round >= 1, "clients_per_round", "must be at least 1")
    _check(cfg.min_updates >= 1, "min_updates", "must be at least 1")
    _check(cfg.min_updates <= cfg.clients_per_round, "min_updates",
           f"({cfg.min_updates}) cannot exceed clients_per_round ({cfg.clients_per_round})")
    _check(cfg.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}")
    _check(cfg.eval_every >= 1, "eval_every", "must be at least 1")
    _check(cfg.save_every >= 0, "save_every", "must be 0 (off) or a number of rounds")
    _check(cfg.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
    d = cfg.data
    _check(d.partition in PARTITIONS, "data.partition", f"must be one of {', '.join(PARTITIONS)}")
    _check(0.0 <= d.skew <= 1.0, "data.skew", "must be in [0, 1]")
    _check(d.alpha > 0, "data.alpha", "must be positive")
    _check(d.samples_per_client >= 1, "data.samples_per_client", "must be at least 1")
    _check(d.eval_per_domain >= 1, "data.eval_per_domain", "must be at least 1")
    sources = [k for k in ("train_file", "train_dir", "dataset") if getattr(d, k)]
    _check(len(sources) <= 1, f"data.{sources[-1] if sources else ''}",
           f"give one of data.train_file, data.train_dir, data.dataset, not {' and '.join(sources)}")
    if not sources:
        _check(len(d.tasks) >= 1, "data.tasks", "needs at least one task")
        for i, task in enumerate(d.tasks):
            _check(task in TASKS, f"data.tasks[{i}]", f"unknown task '{task}'; built-in tasks: {', '.join(TASKS)}")
            _check(task not in d.tasks[:i], f"data.tasks[{i}]", f"task '{task}' is listed twice")
        for k in ("eval_file", "eval_split"):
            _check(getattr(d, k) is None, f"data.{k}", "is for your own data (data.train_file, train_dir or dataset)")
    else:
        if d.train_file:
            _check(Path(d.train_file).is_file(), "data.train_file", f"no such file: {d.train_file}")
        if d.train_dir:
            _check(Path(d.train_dir).is_dir(), "data.train_dir", f"no such folder: {d.train_dir}")
        _check(d.eval_file is None or Path(d.eval_file).is_file(), "data.eval_file", f"no such file: {d.eval_file}")
        _check(not (d.eval_file and d.eval_split), "data.eval_split", "give data.eval_file or data.eval_split, not both")
        _check(d.eval_split is None or bool(d.dataset), "data.eval_split", "is a split of data.dataset")
    from fedlora_edge.core.data import FIELDS

    for k in d.columns:
        _check(k in FIELDS, f"data.columns.{k}", f"unknown field; fields: {', '.join(FIELDS)}")
    from .evaluate import METRICS

    _check(cfg.eval.metric in METRICS, "eval.metric", f"must be one of {', '.join(METRICS)}")
    lo = cfg.lora
    _check(lo.rank >= 1, "lora.rank", "must be at least 1")
    _check(lo.max_rank >= 1, "lora.max_rank", "must be at least 1")
    _check(lo.rank <= lo.max_rank, "lora.rank", f"({lo.rank}) cannot exceed lora.max_rank ({lo.max_rank}): "
           "no device would be planned that rank")
    _check(lo.scale > 0, "lora.scale", "must be positive")
    _check(0.0 <= lo.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    t = cfg.train
    _check(t.steps >= 1, "train.steps", "must be at least 1")
    _check(t.batch_size >= 1, "train.batch_size", "must be at least 1")
    _check(t.lr > 0, "train.lr", "must be positive")
    _check(t.weight_decay >= 0, "train.weight_decay", "must be non-negative")
    _check(t.optimizer in OPTIMIZERS, "train.optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    _check(t.sgd_lr > 0, "train.sgd_lr", "must be positive")
    _check(t.max_seq_len >= 8, "train.max_seq_len", "must be at least 8")
    _check(t.lr_schedule in SCHEDULES, "train.lr_schedule", f"must be one of {', '.join(SCHEDULES)}")
    _check(0 <= t.warmup_steps < t.steps or t.warmup_steps == 0, "train.warmup_steps",
           f"must be non-negative and below train.steps ({t.steps})")
    _check(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    _check(t.dtype in DTYPES, "train.dtype", f"must be one of {', '.join(DTYPES)}, got {t.dtype!r}")
    _check(t.dtype != "fp16" or cfg.device != "cpu", "train.dtype",
           "fp16 needs a CUDA device (device: cpu); use bf16 (half the base's bytes on a CPU as well) or fp32")
    _check(t.base_quant in BASE_QUANTS, "train.base_quant", f"must be one of {', '.join(BASE_QUANTS)}, got {t.base_quant!r}")
    _check(cfg.planner.round_deadline_s > 0, "planner.round_deadline_s", "must be positive")
    _check(cfg.planner.transfer_budget_s > 0, "planner.transfer_budget_s", "must be positive")
    tr = cfg.transport
    _check(isinstance(tr.run_id, str) and RUN_ID.match(tr.run_id) is not None, "transport.run_id",
           "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    _check(tr.round_timeout_s > 0, "transport.round_timeout_s", "must be positive")
    _check(tr.wait_for_devices_s > 0, "transport.wait_for_devices_s", "must be positive")
    _check(tr.min_devices >= 0, "transport.min_devices", "must be non-negative")
    _check(4096 <= tr.chunk_bytes <= 256 * 2**20, "transport.chunk_bytes", "must be between 4 KiB and 256 MiB")
    _check(tr.max_update_bytes >= tr.chunk_bytes, "transport.max_update_bytes", "must be at least chunk_bytes")
    _check(tr.max_slowdown >= 1.0, "transport.max_slowdown", "must be at least 1")
    _check(tr.plan_ack_s > 0, "transport.plan_ack_s", "must be positive")
    _check(tr.offline_grace_s >= 0, "transport.offline_grace_s", "must be non-negative")
    _check(tr.announce_every_s >= 0, "transport.announce_every_s", "must be non-negative (0: off)")
    _check(tr.resend_interval_s > 0, "transport.resend_interval_s", "must be positive")
    _check(tr.max_program_sends >= 1, "transport.max_program_sends", "must be at least 1")
    _check(all(t in TRAINERS for t in tr.trainers), "transport.trainers", f"each must be one of {', '.join(TRAINERS)}")
    from fedlora_edge.core.compress import CODECS

    _check(tr.compression in CODECS + ("auto",), "transport.compression",
           f"must be one of {', '.join(CODECS + ('auto',))}")
    _check(2 <= tr.compression_block <= 4096 and tr.compression_block % 2 == 0, "transport.compression_block",
           "must be an even number of values from 2 to 4096")
    _check(tr.compression == "none" or not cfg.privacy.dp.enabled, "transport.compression",
           "is not available with privacy.dp yet: the device's clip must hold for what the coordinator decodes, "
           "and a quantized change can exceed it")
    _check(tr.compression == "none" or not sa.enabled, "transport.compression",
           "does not apply with privacy.secure_aggregation: its masked vectors are 32-bit words already "
           "(4 bytes a value), and the coordinator never sees an update to decode")
    _check(cfg.weights.policy in ("examples", "equal"), "weights.policy", "must be 'examples' or 'equal'")
    _check(cfg.weights.max_examples >= 1, "weights.max_examples", "must be at least 1")
    sv = cfg.server
    _check(sv.optimizer in SERVER_OPTIMIZERS, "server.optimizer", f"must be one of {', '.join(SERVER_OPTIMIZERS)}")
    _check(sv.lr > 0, "server.lr", "must be positive")
    _check(len(sv.betas) == 2 and all(0.0 <= b < 1.0 for b in sv.betas), "server.betas",
           "must be two numbers in [0, 1)")
    _check(0.0 <= sv.momentum < 1.0, "server.momentum", "must be in [0, 1)")
    _check(sv.weight_decay >= 0, "server.weight_decay", "must be non-negative")
    _check(sv.optimizer == "none" or get_method(cfg.method).global_model, "server.optimizer",
           f"method {cfg.method} has no global adapter for a server step to move")
    get_method(cfg.method).check_config(cfg)
    co = cfg.contamination
    _check(co.attack in ATTACKS, "contamination.attack", f"must be one of {', '.join(ATTACKS)}")
    _check(0.0 <= co.fraction < 1.0, "contamination.fraction", "must be in [0, 1)")
    _check(co.attack != "none" or co.fraction == 0.0, "contamination.fraction",
           f"needs contamination.attack ({', '.join(a for a in ATTACKS if a != 'none')})")
    _check(co.scale > 0, "contamination.scale", "must be positive")
    _check(0.0 < co.mix <= 1.0, "contamination.mix", "must be in (0, 1]")
    _check(co.norm_target > 0, "contamination.norm_target", "must be positive")
    _check(co.k_sigma >= 0, "contamination.k_sigma", "must be non-negative")
    _check(0.0 < co.poison_share <= 1.0, "contamination.poison_share", "must be in (0, 1]")
    _check(bool(co.trigger.strip()) and bool(co.target.strip()), "contamination.trigger",
           "the backdoor's trigger and target must not be empty")
    _check(cfg.planner.runtime_overhead_gb >= 0, "planner.runtime_overhead_gb", "must be non-negative")
    sc = cfg.schedule
    _check(sc.mode in ("sync", "buffered"), "schedule.mode", "must be sync or buffered")
    _check(sc.buffer >= 0, "schedule.buffer", "must be 0 (clients_per_round) or a number of updates")
    _check(sc.concurrency >= 0, "schedule.concurrency", "must be 0 (clients_per_round) or a number of devices")
    _check(sc.staleness_weight in ("sqrt", "none"), "schedule.staleness_weight", "must be sqrt or none")
    _check(sc.max_staleness >= 0, "schedule.max_staleness", "must be non-negative")
    if sc.mode == "buffered":
        from .privacy import buffered_refusal

        why = buffered_refusal(get_method(cfg.method), method_names())
        _check(why is None, "schedule.mode", why or "")
        _check(not cfg.privacy.dp.enabled and not sa.enabled, "schedule.mode",
               "buffered rounds do not run with privacy.dp or secure aggregation (both count a round's devices "
               "before it starts)")
        from .contamination import ROUND_ATTACKS

        _check(cfg.contamination.attack not in ROUND_ATTACKS, "schedule.mode",
               f"buffered rounds do not run with contamination.attack {cfg.contamination.attack} (it crafts updates "
               "from a synchronous round's honest ones)")
        _check(cfg.min_updates <= (sc.buffer or cfg.clients_per_round), "min_updates",
               f"({cfg.min_updates}) cannot exceed schedule.buffer ({sc.buffer or cfg.clients_per_round}): no version "
               "would ever fold enough updates")
    return cfg


def load_config(path: str | Path | None = None, preset: str = "default",
                overrides: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig: the preset, then the YAML file at ``path``, then ``overrides`` (dotted keys)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset '{preset}'; presets: {', '.join(PRESETS)}")
    tree: dict = {}
    for k, v in PRESETS[preset].items():
        _set_dotted(tree, k, v)
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: no such file: {p}")
        with p.open() as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config: {p} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {p} must hold a mapping at the top level")
        _merge(tree, loaded)
    for k, v in (overrides or {}).items():
        _set_dotted(tree, k, v)
    for old, new in MOVED.items():
        section, _, key = old.partition(".")
        if isinstance(tree.get(section), dict) and key in tree[section]:
            raise ConfigError(f"{old}: moved to {new}")
    if tree.get("fslora") == {}:
        tree.pop("fslora")  # an emptied section of a method that no longer has settings
    sections = _method_sections(tree)
    given = {sec: tree.pop(sec) for sec in list(tree) if sec in sections}
    if "method_settings" in tree:
        raise ConfigError("method_settings: not a config field; a method's settings go in its own section "
                          f"({', '.join(sorted(sections))})")
    cfg = _build(RunConfig, tree, extra_known=sections)
    settings = {sec: _build(cls, given[sec], f"{sec}.") if sec in given else cls() for sec, cls in sections.items()}
    return validate(dataclasses.replace(cfg, method_settings=settings))


def _method_sections(tree: dict) -> dict[str, type]:
    """Config section -> settings class of the registered methods, after importing the installed
    plugins the config names (its method; a section named after a method); ConfigError for a
    section (a mapping) that no registered method has, saying whose it would be."""
    from .methods import is_registered, settings_classes
    from .plugins import HOW

    fields_ = {f.name for f in fields(RunConfig)} - {"method_settings"}
    method = tree.get("method", RunConfig.method)
    if isinstance(method, str):
        is_registered(method)  # an installed plugin of that name: imported now, so its section is known
    for key in [k for k in tree if k not in fields_ and k not in settings_classes()]:
        is_registered(key)
    sections = settings_classes()
    for key in sorted(k for k in tree if k not in fields_ and k not in sections and isinstance(tree[k], dict)):
        named = isinstance(method, str) and key in (method, method.replace("-", "_"))
        raise ConfigError(f"{key}: no registered method has a config section '{key}'"
                          + (f" (method '{method}' is not registered: {HOW})" if named and not is_registered(method)
                             else f"; {HOW}")
                          + f"; the registered methods' sections: {', '.join(sorted(sections))}")
    return sections


def _merge(into: dict, new: dict) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``train.lr=1e-3``, ``data.tasks=[add,upper]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value

