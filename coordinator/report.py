"""Outputs of a run: the adapter in peft's format, plots, and the live console display."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from edge_client.lora import Factors, adapter_config_json, to_state_dict
from edge_client.wire import write_factors_file


def save_adapter(folder: Path, factors: Factors, scale: float, targets: list[str], base_model: str,
                 model_spec: str | None = None, system_prompt: str | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` that stock
    ``peft.PeftModel.from_pretrained(base, folder)`` loads (per-module ranks via rank_pattern), and
    ``AutoPeftModelForCausalLM.from_pretrained(folder)`` where ``base_model`` is what transformers
    loads; ``fedlora.json`` keeps the run's model spec and system prompt (for ``fedlora export``)."""
    from edge_client.models import ADAPTER_SIDECAR

    folder.mkdir(parents=True, exist_ok=True)
    dims = {m: (a.shape[1], b.shape[0]) for m, (a, b) in factors.items()}
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    write_factors_file(folder / "adapter_model.safetensors", to_state_dict(factors))
    cfg = adapter_config_json(dims, ranks, scale, targets, base_model)
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    (folder / ADAPTER_SIDECAR).write_text(json.dumps({"model": model_spec or base_model,
                                                       "system_prompt": system_prompt}, indent=1))


def _rounds_axis(ax, label: str = "round (0 = base model)") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _legend_outside(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def save_plots(report: dict, out: Path) -> None:
    """``accuracy.png`` (exact match per round, overall and per domain), ``loss.png`` (held-out
    loss per round per domain, and every client's training loss per step) and ``bytes.png``
    (per client)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r for r in report["rounds"] if "accuracy" in r]
    xs = [0] + [r["round"] for r in rounds]
    base = report["base_accuracy"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(xs, [base["overall"]] + [r["accuracy"]["overall"] for r in rounds], "k-o", lw=2, label="overall")
    for d in base["per_domain"]:
        ax.plot(xs, [base["per_domain"][d]] + [r["accuracy"]["per_domain"].get(d, 0) for r in rounds],
                "--", marker=".", alpha=0.8, label=d)
    _rounds_axis(ax)
    ax.set_ylabel("exact match (global adapter)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{report['method']} on {report['model']}")
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
    if "loss" in base:
        held = [r for r in rounds if "loss" in r["accuracy"]]
        hx = [0] + [r["round"] for r in held]
        ax1.plot(hx, [base["loss"]["overall"]] + [r["accuracy"]["loss"]["overall"] for r in held], "k-o", lw=2,
                 label="overall")
        for d in base["loss"]["per_domain"]:
            ax1.plot(hx, [base["loss"]["per_domain"][d]] + [r["accuracy"]["loss"]["per_domain"].get(d) for r in held],
                     "--", marker=".", alpha=0.8, label=d)
        _legend_outside(ax1)
    _rounds_axis(ax1)
    ax1.set_ylabel("held-out loss, nats per response token")
    ax1.set_title("held-out loss (global adapter)")
    colour: dict[str, int] = {}
    for r in report["rounds"]:
        for c in r["clients"]:
            ls = c.get("losses") or []
            if not ls:
                continue
            first = c["client"] not in colour
            k = colour.setdefault(c["client"], len(colour))
            ax2.plot([(r["round"] - 1) + (i + 1) / len(ls) for i in range(len(ls))], ls, lw=1, alpha=0.7,
                     color=f"C{k % 10}", label=c["client"] if first else None)
    if colour:
        _legend_outside(ax2)
    _rounds_axis(ax2, "round (each client's local steps within it)")
    ax2.set_ylabel("training loss per step")
    ax2.set_title("local training loss, per client")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)

    up: dict[str, int] = {}
    down: dict[str, int] = {}
    for r in report["rounds"]:
        for c in r["clients"]:
            up[c["client"]] = up.get(c["client"], 0) + c["uplink_bytes"]
            down[c["client"]] = down.get(c["client"], 0) + c["downlink_bytes"]
    names = sorted(up)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [up[n] / 1e6 for n in names], 0.4, label="uplink")
    ax.bar([i + 0.2 for i in x], [down[n] / 1e6 for n in names], 0.4, label="downlink")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MB over the run")
    ax.set_title("bytes per client (safetensors payloads)")
    _legend_outside(ax)
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=110)
    plt.close(fig)


def build_report(e, base: dict, final: dict, personal: dict, own_mix: float, own_mix_loss: float) -> dict:
    """The run's report (report.json) from engine ``e`` at the end of the run."""
    from edge_client import __version__

    from .contamination import contamination_report
    from .evaluate import perplexity

    rounds = e.state.rounds
    headline = personal if personal else final
    return {
        "fedlora_edge_version": __version__,
        "method": e.cfg.method, "model": e.cfg.model, "device": e.device,
        "config": e.cfg.to_dict(), "global_rank": e.R, "target_modules": e.targets,
        "fleet": [{"client": c.id, "profile": c.device.profile.name, "capacity": c.capacity.rank,
                   "predicted_memory_gb": round(c.capacity.memory_gb, 3),
                   "usable_memory_gb": c.capacity.usable_gb,
                   "predicted_round_seconds": round(c.capacity.round_s, 1),
                   "reason": c.capacity.reason, "eligible": e.pooled or c in e.participants,
                   "train_examples": c.examples,
                   "domain_mix": {k: round(v, 3) for k, v in c.mix.items()}} for c in e.clients],
        "metrics": {"lead": e.lead, "reason": e.lead_reason,
                    "loss": "held-out negative log-likelihood per response token (nats), teacher-forced; "
                            "overall is the mean over domains; perplexity is exp(loss)",
                    "exact_match": "greedy answer of at most max_new_tokens tokens equals the reference"},
        "data_notes": e.data_notes,
        "base_accuracy": base,
        "rounds": rounds,
        "final_accuracy": {"overall": headline["overall"], "per_domain": headline["per_domain"],
                           "own_mix": own_mix, "loss": headline["loss"], "own_mix_loss": own_mix_loss,
                           "perplexity": perplexity(headline["loss"]),
                           **({"rouge_l": headline["rouge_l"]} if "rouge_l" in headline else {}),
                           **({"backdoor": headline["backdoor"]} if "backdoor" in headline else {}),
                           **({"per_example": headline["per_example"]} if "per_example" in headline else {}),
                           "evaluated": "each client's own adapter" if personal else "the global adapter"},
        "global_adapter_accuracy": final,
        "personalised": personal,
        "totals": {"uplink_bytes": sum(r["uplink_bytes"] for x in rounds for r in x["clients"]),
                   "downlink_bytes": sum(r["downlink_bytes"] for x in rounds for r in x["clients"]),
                   "failed_rounds": sum(x["status"] == "failed" for x in rounds),
                   "rejected_updates": sum(len(x["rejected"]) for x in rounds)},
        "contamination": contamination_report(e.cfg.contamination, e.contaminated, e.clients, rounds, final, personal),
        "method_summary": e.method.summary(e.state.method_state),
        "wall_seconds": round(time.perf_counter() - e.t_start, 1),
    }


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=1))


def save_outputs(e, report: dict) -> None:
    """Everything a run leaves in its output folder: the global adapter, each client's model, the
    report, the plots."""
    from edge_client.experts import mixture_of, save_mixture
    from edge_client.lora import from_state_dict
    from edge_client.models import base_reference

    e.out.mkdir(parents=True, exist_ok=True)
    base = base_reference(e.source)
    if e.method.global_model:
        save_adapter(e.out / "adapter", e.state.global_factors, e.cfg.lora.scale, e.targets, base,
                     e.cfg.model, e.cfg.data.system_prompt)
    for c in e.clients:
        own = e.method.personal_model(c.id, e.ctx, e.state.method_state)
        if own is None:
            continue
        plan, tensors, _ = own
        folder = e.out / "clients" / c.id
        if mixture_of(plan) is not None:
            save_mixture(folder / "model", plan, tensors, e.cfg.model, e.targets)
        else:
            save_adapter(folder / "adapter", from_state_dict(tensors), e.cfg.lora.scale, e.targets, base,
                         e.cfg.model, e.cfg.data.system_prompt)
    write_report(e.out, report)
    save_plots(report, e.out)


def export_table(rows: list[dict], folder: Path):
    """The exports per device class of a run (`--export`)."""
    from rich.table import Table

    t = Table(title=f"exports per device class ({folder})")
    for col in ("format", "quant", "devices", "MB", "MB update", "max |Δlogits|", "top-1 answer", "accuracy torch/artifact",
                "parity"):
        t.add_column(col)
    for r in rows:
        has = "size_bytes" in r
        t.add_row(r["format"], r["quant"], ", ".join(r["devices"]), f"{r['size_bytes'] / 1e6:.1f}" if has else "-",
                  f"{r['update_bytes'] / 1e6:.2f}" if has else "-",
                  f"{r['max_abs_logits_diff']:.2g}" if has else "-", f"{r['top1_agreement']:.3f}" if has else "-",
                  f"{r['accuracy_torch']:.1%} / {r['accuracy_artifact']:.1%}" if has else "-", r["parity"])
    return t


def device_timings_table(devices: dict):
    """`fedlora emulate`'s per-device limits and timings."""
    from rich.table import Table

    t = Table(title="per-device timings (emulated: threads, memory cap, compute slow-down, bandwidth)")
    for col in ("device", "threads", "slow-down", "memory cap GB", "up/down Mbit/s", "rounds", "missing",
                "mean local s", "exit"):
        t.add_column(col)
    for cid, d in devices.items():
        t.add_row(cid, str(d["threads"]), f"{d['slowdown']:.2f}", f"{d['memory_cap_gb']:.2f}",
                  f"{d['uplink_mbps']:g}/{d['downlink_mbps']:g}", str(d["rounds_trained"]), str(d["rounds_failed"]),
                  "-" if d["mean_local_seconds"] is None else f"{d['mean_local_seconds']:.1f}", str(d["exit_code"]))
    return t


def plan_table(cfg):
    """`fedlora plan`: per device of the fleet, the planner's capacity and the method's knob."""
    from rich.table import Table

    from .engine import capacity_for, method_context
    from .fleet import load_fleet
    from .methods import get_method
    from .planner import meta_shape

    method = get_method(cfg.method)
    fleet = load_fleet(cfg.fleet)
    shape = meta_shape(cfg.model, list(cfg.lora.target_modules) or None)
    ctx = method_context(cfg, shape.adapted)
    big_r = method.global_rank(ctx)
    fp = method.footprint(ctx)
    knob_name = method.knob
    t = cfg.train
    table = Table(title=f"plan: {cfg.model} ({shape.n_params / 1e6:.1f} M params), method {cfg.method}, "
                        f"batch {t.batch_size} x seq {t.max_seq_len}, {t.steps} steps, deadline "
                        f"{cfg.planner.round_deadline_s:.0f} s")
    if fp.down_rank is not None:
        table.caption = (f"{cfg.method} sends every device more than it trains: capacity is planned "
                         f"with a rank-{fp.down_rank} download"
                         + (f" and a rank-{fp.hold_rank} adapter in memory" if fp.hold_rank else "")
                         + (" and a copy of the adapted base weights" if fp.fold else ""))
    for col in ("device", "profile", "trainer", "usable GB", "capacity (rank)", "memory GB", "s/step", "round s",
                f"{cfg.method} {knob_name}"):
        table.add_column(col, justify="right" if col != "device" else "left")
    for dev in fleet:
        cap = capacity_for(cfg, shape, dev.profile, fp)  # memory and times are at its rank (rank 1 when 0)
        plan = method.plan(dev.id, cap.rank, ctx, 1)
        knob = (f"{plan.rank}" + (f" of {big_r}" if big_r != plan.rank and not method.pools_data else "")
                if plan else "[red]cannot take part[/red]")
        cap_s = str(cap.rank) if cap.rank else f"[red]0 ({cap.reason})[/red]"
        trainer = dev.profile.trainer + (f" ({dev.profile.trainer_base} base)" if dev.profile.trainer_base != "fp32" else "")
        table.add_row(dev.id, dev.profile.name, trainer, f"{dev.profile.memory_usable_gb:.1f}", cap_s,
                      f"{cap.memory_gb:.2f}",
                      f"{cap.step_s:.2f}", f"{cap.round_s:.0f}", knob)
    return table


def make_console():
    """A rich console; 140 columns when output is not a terminal (logs, CI), so tables are not cut."""
    from rich.console import Console

    probe = Console()
    return probe if probe.is_terminal else Console(width=140)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


class ConsoleReporter:
    """Progress per round and tables, with rich.  On a terminal a round shows a live bar; in a log
    file (no terminal) each client's result is a line, and while a round runs a line every
    ``progress_every`` seconds says how far it is."""

    FLEET_ROWS = 50  # past this many devices the fleet table has a row per kind of device, and a log
    # file gets a line per 5% of a round's clients instead of one per client

    def __init__(self, console=None, progress_every: float = 30.0):
        self.console = console or make_console()
        self.progress_every = progress_every
        self.progress = None
        self.task = None
        self._beat: threading.Event | None = None
        self._round = (0, 0, 0, 0.0)  # round, clients done, clients, start time

    def status(self, text: str) -> None:
        self.console.print(f"[dim]{text}...[/dim]")

    def base(self, acc: dict, clients, global_rank: int) -> None:
        from rich.table import Table

        t = Table(title="Fleet and plans", show_lines=False)
        for col in ("client", "profile", "capacity (rank)", "pred. memory GB", "usable GB", "pred. round s", "examples"):
            t.add_column(col)
        rows: dict[tuple, list[str]] = {}  # the row's cells but the id -> the clients it stands for
        for c in clients:
            cap = c.capacity
            cells = (c.device.profile.name, str(cap.rank) if cap.rank else f"[red]0: {cap.reason}[/red]",
                     f"{cap.memory_gb:.2f}", f"{cap.usable_gb:.2f}", f"{cap.round_s:.0f}", str(c.examples))
            rows.setdefault(cells, []).append(c.id)
        if len(clients) <= self.FLEET_ROWS:
            for cells, ids in rows.items():
                for i in ids:
                    t.add_row(i, *cells)
        else:  # a large fleet: one row per kind of device
            for cells, ids in rows.items():
                t.add_row(f"{len(ids)} devices ({ids[0]} ...)" if len(ids) > 1 else ids[0], *cells)
        self.console.print(t)
        self.console.print(f"global rank R = {global_rank}; base model: exact match {_pct(acc['overall'])}% "
                           + " ".join(f"{d}={_pct(v)}" for d, v in acc["per_domain"].items())
                           + (f"; held-out loss {acc['loss']['overall']:.3f}" if "loss" in acc else ""))

    def round_start(self, round_idx: int, n: int) -> None:
        self._round = (round_idx, 0, n, time.monotonic())
        if not self.console.is_terminal:
            self.console.print(f"round {round_idx}: {n} clients training")
            if self.progress_every > 0:
                self._beat = threading.Event()
                threading.Thread(target=self._heartbeat, args=(self._beat,), daemon=True).start()
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("round {task.fields[r]}"), BarColumn(), TextColumn("{task.completed}/{task.total} clients"),
                                 TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=self.console,
                                 transient=True)
        self.progress.start()
        self.task = self.progress.add_task("round", total=n, r=round_idx, last="")

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.progress_every):
            r, done, n, t0 = self._round
            where = (f"all {n} clients in, aggregating and evaluating" if done >= n else f"{done}/{n} clients in")
            self.console.print(f"round {r}: {where} after {time.monotonic() - t0:.0f} s")

    def client_done(self, client: str, report: dict | None, rank: int) -> None:
        last = (f"{client}: failed" if not report else
                f"{client}: r={rank} loss {report['first_loss']:.2f}->{report['last_loss']:.2f}")
        r, done, n, t0 = self._round
        self._round = (r, done + 1, n, t0)
        if self.progress is not None:
            self.progress.update(self.task, advance=1, last=last)
        elif n <= self.FLEET_ROWS or (done + 1) % max(1, n // 20) == 0 or done + 1 == n:
            self.console.print(f"  round {r} [{done + 1}/{n}] {last} ({time.monotonic() - t0:.0f} s)")

    def round_end(self, rec: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self._beat is not None:
            self._beat.set()
            self._beat = None
        cl = rec["clients"]
        acc = rec.get("accuracy")
        up = sum(c["uplink_bytes"] for c in cl) / 1e6
        down = sum(c["downlink_bytes"] for c in cl) / 1e6
        ranks = " ".join(f"{c['client']}:r{c['rank']}" for c in cl)
        loss = sum(c["loss_last"] for c in cl) / len(cl) if cl else float("nan")
        extra = ""
        if rec["skipped"]:
            extra += f" skipped {len(rec['skipped'])}"
        if rec.get("failed"):
            extra += f" [yellow]missing {len(rec['failed'])}: " + ", ".join(f["client"] for f in rec["failed"]) + "[/yellow]"
        if rec["rejected"]:
            extra += f" [red]rejected {len(rec['rejected'])}: {rec['rejected'][0]['reason']}[/red]"
        det = rec.get("detection")
        if det and det["flagged"]:
            extra += " [magenta]flagged: " + ", ".join(det["flagged"]) + "[/magenta]"
        if det and det.get("caution"):
            extra += f" [yellow]({det['caution']})[/yellow]"
        status = "" if rec["status"] == "ok" else " [red]FAILED (below min_updates, global kept)[/red]"
        held = f"{acc['loss']['overall']:.3f}" if acc and "loss" in acc else "-"
        self.console.print(f"round {rec['round']:>2} | {ranks} | train loss {loss:.3f} | held-out loss {held} | "
                           f"exact {_pct(acc['overall']) if acc else '-'}% | up {up:.2f} MB down {down:.2f} MB | "
                           f"{rec['seconds']:.1f} s{extra}{status}")

    def final(self, report: dict) -> None:
        from rich.table import Table

        fa = report["final_accuracy"]
        base = report["base_accuracy"]
        lead = report.get("metrics", {}).get("lead", "exact_match")
        t = Table(title=f"{report['method']} on {report['model']}, held-out, {fa['evaluated']}")
        t.add_column("domain")
        cols = [("loss", "held-out loss", lambda x: "-" if x is None else f"{x:.3f}"),
                ("exact_match", "exact match %", _pct)]
        if "rouge_l" in fa:
            cols.append(("rouge_l", "ROUGE-L %", _pct))
        cols.sort(key=lambda c: c[0] != lead)  # the leading metric first
        for _, name, _ in cols:
            t.add_column(f"{name}: base", justify="right")
            t.add_column("after", justify="right")

        def pick(acc: dict, key: str) -> dict:
            return acc if key == "exact_match" else acc.get(key, {})

        for d in list(fa["per_domain"]) + ["overall"]:
            cells = []
            for key, _, fmt in cols:
                b, a = pick(base, key), pick(fa, key)
                get = (lambda m: m.get("overall")) if d == "overall" else (lambda m, d=d: m.get("per_domain", {}).get(d))
                cells += [fmt(get(b)), fmt(get(a))]
            t.add_row("[b]overall[/b]" if d == "overall" else d, *cells)
        self.console.print(t)
        why = report.get("metrics", {}).get("reason")
        if why:
            self.console.print(f"leading metric: {lead.replace('_', ' ')} ({why})")
        tot = report["totals"]
        self.console.print(f"uplink {tot['uplink_bytes'] / 1e6:.2f} MB, downlink {tot['downlink_bytes'] / 1e6:.2f} MB, "
                           f"wall {report['wall_seconds']:.0f} s; failed rounds {tot['failed_rounds']}, "
                           f"rejected updates {tot['rejected_updates']}")
