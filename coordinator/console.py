"""The console of a run and of the CLI's other commands: :class:`ConsoleReporter` (a run's progress
per round and its tables, with rich), :func:`make_console`, and the tables of ``--export``,
``fedlora emulate`` and ``fedlora plan``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported where a console is made: `fedlora --help` starts without it
    from rich.progress import Progress, TaskID


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

    from .fleet import load_fleet
    from .fleetplan import capacity_for, method_context, planned_by
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
    form = ", ".join(x for x in (t.dtype if t.dtype != "fp32" else "", f"{t.base_quant} base" if t.base_quant != "none"
                                 else "", "checkpointing" if t.gradient_checkpointing else "",
                                 "packing" if t.packing else "") if x)
    table = Table(title=f"plan: {cfg.model} ({shape.n_params / 1e6:.1f} M params), method {cfg.method}, "
                        f"batch {t.batch_size} x seq {t.max_seq_len}{f' ({form})' if form else ''}, {t.steps} steps, "
                        f"deadline {cfg.planner.round_deadline_s:.0f} s")
    if fp.down_rank is not None:
        table.caption = (f"{cfg.method} sends every device more than it trains: capacity is planned "
                         f"with a rank-{fp.down_rank} download"
                         + (f" and a rank-{fp.hold_rank} adapter in memory" if fp.hold_rank else "")
                         + (" and a copy of the adapted base weights" if fp.fold else ""))
    wire = cfg.transport.compression != "none"
    for col in ("device", "profile", "trainer", "usable GB", "capacity (rank)", "memory GB", "s/step", "round s",
                *(("on the wire",) if wire else ()), f"{cfg.method} {knob_name}"):
        table.add_column(col, justify="right" if col != "device" else "left")
    for dev in fleet:
        # memory and times are at its rank (rank 1 when 0)
        cap = capacity_for(cfg, shape, dev.profile, fp, planned_by(method, dev.id, ctx))
        plan = method.plan(dev.id, cap.rank, ctx, 1)
        knob = (f"{plan.rank}" + (f" of {big_r}" if big_r != plan.rank and not method.pools_data else "")
                if plan else "[red]cannot take part[/red]")
        cap_s = str(cap.rank) if cap.rank else f"[red]0 ({cap.reason})[/red]"
        trainer = dev.profile.trainer + (f" ({dev.profile.trainer_base} base)" if dev.profile.trainer_base != "fp32" else "")
        table.add_row(dev.id, dev.profile.name, trainer, f"{dev.profile.memory_usable_gb:.1f}", cap_s,
                      f"{cap.memory_gb:.2f}",
                      f"{cap.step_s:.2f}", f"{cap.round_s:.0f}", *((cap.compression,) if wire else ()), knob)
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
    ROUND_CLIENTS = 12  # past this many clients a round's line counts them per rank, and lists of
    # missing or flagged clients show NAMES_SHOWN names and how many more, so a line stays a line
    NAMES_SHOWN = 5

    def __init__(self, console=None, progress_every: float = 30.0):
        self.console = console or make_console()
        self.progress_every = progress_every
        self.progress: Progress | None = None  # rich's live bar, on a terminal, while a round trains
        self.task: TaskID | None = None
        self._beat: threading.Event | None = None
        self._round = (0, 0, 0, 0.0)  # round, clients done, clients, start time
        self.lead = "exact_match"  # the run's leading metric (:meth:`leading_metric`), shown first

    def leading_metric(self, lead: str) -> None:
        """The metric the run leads with (``exact_match``, ``loss`` or ``rouge_l``; the engine says it
        before :meth:`base`): the base model's line and the final table show it first."""
        self.lead = lead

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
        # each metric overall, the leading one first and per domain too
        shown = [("exact_match", "exact match", acc, lambda x: f"{_pct(x)}%", _pct)]
        if "loss" in acc:
            shown.append(("loss", "held-out loss", acc["loss"], lambda x: f"{x:.3f}", lambda x: f"{x:.3f}"))
        if "rouge_l" in acc:
            shown.append(("rouge_l", "ROUGE-L", acc["rouge_l"], lambda x: f"{_pct(x)}%", _pct))
        shown.sort(key=lambda m: m[0] != self.lead)
        parts = [f"{name} {fmt(m['overall'])}" + ("".join(f" {d}={per(v)}" for d, v in m["per_domain"].items())
                                                   if i == 0 else "")
                 for i, (_, name, m, fmt, per) in enumerate(shown)]
        self.console.print(f"global rank R = {global_rank}; base model: " + "; ".join(parts))

    def round_start(self, round_idx: int, n: int) -> None:
        self._round = (round_idx, 0, n, time.monotonic())
        if not self.console.is_terminal:
            self.console.print(f"round {round_idx}: {n} clients training")
            if self.progress_every > 0:
                self._beat = threading.Event()
                threading.Thread(target=self._heartbeat, args=(self._beat,), daemon=True).start()
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("round {task.fields[r]}"), BarColumn(), TextColumn("{task.completed}/{task.total} clients"),
                            TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=self.console,
                            transient=True)
        progress.start()
        self.task = progress.add_task("round", total=n, r=round_idx, last="")
        self.progress = progress

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
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=1, last=last)
        elif n <= self.FLEET_ROWS or (done + 1) % max(1, n // 20) == 0 or done + 1 == n:
            self.console.print(f"  round {r} [{done + 1}/{n}] {last} ({time.monotonic() - t0:.0f} s)")

    @classmethod
    def _ranks(cls, rows: list[dict]) -> str:
        """``client:r<rank>`` per client, or past ROUND_CLIENTS clients the count per rank, highest
        rank first (``40 clients: r32 x10, r8 x30``)."""
        if len(rows) <= cls.ROUND_CLIENTS:
            return " ".join(f"{c['client']}:r{c['rank']}" for c in rows)
        per: dict[int, int] = {}
        for c in rows:
            per[c["rank"]] = per.get(c["rank"], 0) + 1
        return f"{len(rows)} clients: " + ", ".join(f"r{r} x{n}" for r, n in sorted(per.items(), reverse=True))

    @classmethod
    def _names(cls, names: list[str]) -> str:
        """Every name, or past ROUND_CLIENTS names the first NAMES_SHOWN and how many more."""
        if len(names) <= cls.ROUND_CLIENTS:
            return ", ".join(names)
        return ", ".join(names[:cls.NAMES_SHOWN]) + f" and {len(names) - cls.NAMES_SHOWN} more"

    def round_end(self, rec: dict) -> None:
        """The round's line: its clients' ranks (summarised past ROUND_CLIENTS), mean training
        loss, held-out figures, bytes, seconds, and who was skipped, missing, rejected or flagged."""
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
        ranks = self._ranks(cl)
        loss = sum(c["loss_last"] for c in cl) / len(cl) if cl else float("nan")
        extra = ""
        if rec["skipped"]:
            extra += f" skipped {len(rec['skipped'])}"
        if rec.get("failed"):
            extra += (f" [yellow]missing {len(rec['failed'])}: " + self._names([f["client"] for f in rec["failed"]])
                      + "[/yellow]")
        if rec["rejected"]:  # an entry may stand for several refused copies of one update (absent: one)
            n = sum(x.get("count", 1) for x in rec["rejected"])
            extra += f" [red]rejected {n}: {rec['rejected'][0]['reason']}[/red]"
        det = rec.get("detection")
        if det and det["flagged"]:
            extra += " [magenta]flagged: " + self._names(list(det["flagged"])) + "[/magenta]"
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
                cells += [fmt(_cell(b, d)), fmt(_cell(a, d))]
            t.add_row("[b]overall[/b]" if d == "overall" else d, *cells)
        self.console.print(t)
        why = report.get("metrics", {}).get("reason")
        if why:
            self.console.print(f"leading metric: {lead.replace('_', ' ')} ({why})")
        tot = report["totals"]
        codecs = {c: n for c, n in (tot.get("compression") or {}).items() if c != "none"}
        wire = (f" ({', '.join(f'{c} x{n}' for c, n in codecs.items())}: {tot['uplink_vs_fp32']:.2f}x / "
                f"{tot['downlink_vs_fp32']:.2f}x float32)" if codecs and tot.get("uplink_vs_fp32") else "")
        self.console.print(f"uplink {tot['uplink_bytes'] / 1e6:.2f} MB, downlink {tot['downlink_bytes'] / 1e6:.2f} MB"
                           f"{wire}, wall {report['wall_seconds']:.0f} s; failed rounds {tot['failed_rounds']}, "
                           f"rejected updates {tot['rejected_updates']}")


def _cell(metric: dict, domain: str):
    """A metric's overall figure, or its figure for ``domain``."""
    return metric.get("overall") if domain == "overall" else metric.get("per_domain", {}).get(domain)
