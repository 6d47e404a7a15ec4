"""``fedlora simulate``: a whole federated run in one process.

One frozen base model is shared by every client; each client's adapter is installed into the
same peft model, trained, read back and removed.  Every update goes through the wire encoding
(safetensors bytes, counted) and the same validation the MQTT coordinator applies, then the
method aggregates the valid ones.  Deterministic under ``seed`` on a CPU.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from edge_client.data import Example, domain_counts, generate_task, load_jsonl, prompt_ids
from edge_client.lora import (
    ClientPlan,
    Factors,
    adapted_modules,
    expected_shapes,
    from_state_dict,
    get_factors,
    install_adapter,
    to_state_dict,
    uniform_plan,
)
from edge_client.models import default_target_modules, load_model, resolve_model
from edge_client.trainer import TrainSettings, train_local
from edge_client.wire import decode_tensors, encode_tensors

from .aggregate import Contribution
from .config import ConfigError, RunConfig
from .evaluate import evaluate, mix_accuracy
from .fleet import Device, load_fleet
from .methods import MethodContext, get_method
from .partition import builtin_client_data, domain_mix, split_pool
from .planner import Capacity, ModelShape, plan_capacity
from .validate import UpdateRejected, capped_weight, validate_update

GLOBAL, CLIENT = "global", "client"
MAX_UPDATE_BYTES = 512 * 2**20


@dataclass
class ClientData:
    id: str
    device: Device | None
    train: list[Example]
    mix: dict[str, float]
    capacity: Capacity | None = None


@dataclass
class RunState:
    """Everything a run carries from round to round."""

    global_factors: Factors
    method_state: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)


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


class Simulation:
    """Set up with :meth:`__init__` (everything validated and loaded), then :meth:`run`."""

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
        self.ctx = MethodContext(self.dims, cfg.lora.scale, cfg.lora.rank, cfg.lora.max_rank)
        self.shape = ModelShape.from_model(self.model, self.dims)
        self.R = self.method.global_rank(self.ctx)

        train, mixes, self.eval_examples = build_data(cfg, len(self.fleet))
        self.clients = [ClientData(dev.id, dev, tr, mix) for dev, tr, mix in zip(self.fleet, train, mixes)]
        t = cfg.train
        for c in self.clients:
            c.capacity = plan_capacity(c.device.profile, self.shape, max_rank=cfg.lora.max_rank, steps=t.steps,
                                       batch=t.batch_size, seq=t.max_seq_len,
                                       deadline_s=cfg.planner.round_deadline_s,
                                       overhead_gb=cfg.planner.runtime_overhead_gb,
                                       transfer_budget_s=cfg.planner.transfer_budget_s)
        # devices the method can give a plan; the others are reported (fleet table, report) and
        # never sampled, so every round gets clients_per_round devices that can train
        able = [c for c in self.clients if self.method.plan(c.id, c.capacity.rank, self.ctx, 1) is not None]
        if self.method.pooled:
            pooled = [ex for c in self.clients for ex in c.train]
            self.participants = [ClientData("pooled", None, pooled, {})]
        else:
            self.participants = able
        # clients that can train in a round: the federated step budget centralized is held to
        self.per_round = min(cfg.clients_per_round, len(able))
        reachable = 1 if self.method.pooled else self.per_round
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

    # ------------------------------------------------------------------------------------ rounds

    def _sample(self, round_idx: int) -> list[ClientData]:
        if self.method.pooled:
            return self.participants
        rng = random.Random(f"sample|{self.cfg.seed}|{round_idx}")
        k = min(self.cfg.clients_per_round, len(self.participants))
        return sorted(rng.sample(self.participants, k), key=lambda c: c.id)

    def _train_client(self, c: ClientData, plan: ClientPlan, round_idx: int, steps: int) -> dict:
        start = self.method.start_factors(c.id, self.state.global_factors, plan, self.state.method_state)
        down = encode_tensors(to_state_dict(start))
        install_adapter(self.model, CLIENT, plan, from_state_dict(decode_tensors(down)), self.targets,
                        self.cfg.lora.dropout)
        t = self.cfg.train
        settings = TrainSettings(steps, t.batch_size, t.lr, t.weight_decay, t.max_seq_len, t.grad_clip)
        seed = hash_seed(self.cfg.seed, round_idx, c.id)
        res = train_local(self.model, self.tok, c.train, settings, seed, self.device)
        up = encode_tensors(to_state_dict(get_factors(self.model, CLIENT)),
                            {"client": c.id, "round": str(round_idx), "num_examples": str(res.num_examples)})
        return {"uplink": up, "downlink_bytes": len(down), "result": res}

    def run_round(self, round_idx: int) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        sampled = self._sample(round_idx)
        steps = cfg.train.steps * (self.per_round if self.method.pooled else 1)
        rows, skipped, rejected, contribs = [], [], [], []
        self.reporter.round_start(round_idx, len(sampled))
        for c in sampled:
            capacity = c.capacity.rank if c.capacity else self.R
            plan = self.method.plan(c.id, capacity, self.ctx, round_idx)
            if plan is None:
                why = c.capacity.reason if c.capacity and c.capacity.reason else "below the method's rank"
                skipped.append({"client": c.id, "capacity": capacity, "reason": why})
                self.reporter.client_done(c.id, None)
                continue
            out = self._train_client(c, plan, round_idx, steps)
            res = out["result"]
            row = {"client": c.id, "device": c.device.profile.name if c.device else "server",
                   "rank": plan.rank, "capacity": capacity, "uplink_bytes": len(out["uplink"]),
                   "downlink_bytes": out["downlink_bytes"], "local_seconds": round(res.seconds, 3),
                   "steps": res.steps, "loss_first": res.first_loss, "loss_last": res.last_loss,
                   "num_examples": res.num_examples,
                   "predicted_round_seconds": round(c.capacity.round_s, 1) if c.capacity else None}
            rows.append(row)
            try:
                tensors = decode_tensors(out["uplink"], MAX_UPDATE_BYTES)
                validate_update(c.id, tensors, expected_shapes(self.dims, plan))
                weight = capped_weight(res.num_examples, len(c.train))
                contribs.append(Contribution(c.id, plan, from_state_dict(tensors), float(weight)))
            except (UpdateRejected, ValueError) as exc:
                rejected.append({"client": c.id, "reason": str(exc)})
            self.reporter.client_done(c.id, row)
        ok = len(contribs) >= cfg.min_updates
        if ok:
            self.state.global_factors = self.method.aggregate(self.state.global_factors, contribs, self.ctx,
                                                              self.state.method_state)
        record = {"round": round_idx, "status": "ok" if ok else "failed", "clients": rows,
                  "skipped": skipped, "rejected": rejected, "valid_updates": len(contribs)}
        if round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds:
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

    def evaluate_personal(self, base: dict) -> dict:
        """Each client's own model on the held-out set, and on its own domain mix.  A client that
        never trained still has its starting adapter (B = 0: the base model) and is scored so."""
        per_client = {}
        personal = self.state.method_state.get("personal", {})
        for c in self.clients:
            factors = personal.get(c.id)
            if factors is None:
                acc = base
            else:
                rank = next(iter(factors.values()))[0].shape[0]
                install_adapter(self.model, CLIENT, uniform_plan(self.dims, rank, self.cfg.lora.scale), factors,
                                self.targets, 0.0)
                acc = self._evaluate()
            per_client[c.id] = {"overall": acc["overall"], "per_domain": acc["per_domain"],
                                "own_mix": mix_accuracy(acc["per_domain"], c.mix), "trained": factors is not None}
        n = len(per_client)
        domains = next(iter(per_client.values()))["per_domain"]
        return {"clients": per_client, "clients_trained": sum(v["trained"] for v in per_client.values()),
                "overall": sum(v["overall"] for v in per_client.values()) / n,
                "own_mix": sum(v["own_mix"] for v in per_client.values()) / n,
                "per_domain": {d: sum(v["per_domain"][d] for v in per_client.values()) / n for d in domains}}

    # --------------------------------------------------------------------------------------- run

    def run(self) -> dict:
        self.reporter.status("evaluating the base model")
        base = self.evaluate_base()
        self.reporter.base(base, self.clients, self.R)
        for r in range(1, self.cfg.rounds + 1):
            self.run_round(r)
        final = self.state.rounds[-1].get("accuracy") or self.evaluate_global()
        personal = self.evaluate_personal(base) if self.method.personalised else {}
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
                       "reason": c.capacity.reason, "eligible": c in self.participants or self.method.pooled,
                       "train_examples": len(c.train),
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
            "wall_seconds": round(time.perf_counter() - self.t_start, 1),
        }

    def save(self, report: dict) -> None:
        from .report import save_adapter, save_plots

        self.out.mkdir(parents=True, exist_ok=True)
        if self.method.pooled:
            report["totals"]["uplink_bytes"] = report["totals"]["downlink_bytes"] = 0
            for x in report["rounds"]:
                for r in x["clients"]:
                    r["uplink_bytes"] = r["downlink_bytes"] = 0
        if self.method.global_model:
            save_adapter(self.out / "adapter", self.state.global_factors, self.cfg.lora.scale, self.targets,
                         self.cfg.model)
        for cid, factors in self.state.method_state.get("personal", {}).items():
            save_adapter(self.out / "clients" / cid / "adapter", factors, self.cfg.lora.scale, self.targets,
                         self.cfg.model)
        (self.out / "report.json").write_text(json.dumps(report, indent=1))
        save_plots(report, self.out)


def hash_seed(seed: int, round_idx: int, client: str) -> int:
    import hashlib

    return int(hashlib.sha256(f"{seed}|{round_idx}|{client}".encode()).hexdigest()[:8], 16)


class _Silent:
    def __getattr__(self, name):
        return lambda *a, **k: None
