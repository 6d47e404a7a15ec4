"""Outputs of a run: the adapter in peft's format, plots, and the live console display.

Every output file and folder is written new and renamed into place (``fedlora_edge.core.durable``), so a
full disk or a crash while a run's outputs are written leaves each output either as it was or
complete, never half-written.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedlora_edge.core import durable
from fedlora_edge.core.lora import Factors, adapter_config_json, to_state_dict
from fedlora_edge.core.wire import write_factors_file

PLOT_CLIENTS = 20  # past this many clients in a run, loss.png's training-loss panel draws quantile bands
# over the clients and bytes.png bars per device class, instead of a line, a bar, a legend entry and
# a tick per client (for 3,000 clients: 23-35 s and +330 MiB of RSS, against 1 s and +29 MiB summarised;
# bench/report_scale.py)
PLOT_CLASSES = 20  # most bars in bytes.png's per-class view; the smallest classes beyond it are one bar


def save_adapter(folder: Path, factors: Factors, scale: float, targets: list[str], base_model: str,
                 model_spec: str | None = None, system_prompt: str | None = None, *,
                 local_base: str | None = None, card: str | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` that stock
    ``peft.PeftModel.from_pretrained(base, folder)`` loads (per-module ranks via rank_pattern), and
    ``AutoPeftModelForCausalLM.from_pretrained(folder)`` where ``base_model`` is what transformers
    loads (a run's adapters name the public Hub id of a known base: :func:`fedlora_edge.core.models.public_reference`);
    ``fedlora.json`` keeps the run's model spec, its system prompt (for ``fedlora export`` and
    ``generate``) and ``base_local``, the base as transformers loads it where the run ran
    (``local_base``; default ``base_model``); ``card``, where given, is the folder's ``README.md``
    (:mod:`.modelcard`).

    The folder is written whole: built beside ``folder``, fsynced, then swapped in by a rename
    (:func:`fedlora_edge.core.durable.new_dir`), so it holds either its previous content or the complete
    new adapter, never a mix; it is replaced as a whole (files of other kinds in it go with the old
    version).  An OSError (a full disk) propagates unchanged, with ``folder`` as it was and the
    temporary folder removed."""
    from fedlora_edge.core.models import ADAPTER_SIDECAR

    dims = {m: (a.shape[1], b.shape[0]) for m, (a, b) in factors.items()}
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    cfg = adapter_config_json(dims, ranks, scale, targets, base_model)
    with durable.new_dir(folder) as tmp:  # plain writes: the folder is fsynced whole before the swap
        write_factors_file(tmp / "adapter_model.safetensors", to_state_dict(factors))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
        (tmp / ADAPTER_SIDECAR).write_text(json.dumps({"model": model_spec or base_model,
                                                        "system_prompt": system_prompt,
                                                        "base_local": local_base or base_model}, indent=1))
        if card is not None:
            (tmp / "README.md").write_text(card)


def save_checkpoint(e, round_idx: int) -> Path:
    """The global adapter of engine ``e`` after round ``round_idx`` as a peft checkpoint,
    ``OUT/checkpoints/round-NNNN/`` (the files of the final ``adapter/``, its model card saying what
    is known at that round), written whole like every adapter (:func:`save_adapter`); returns the
    folder.  An OSError propagates unchanged (the caller says what it means for the run)."""
    from fedlora_edge.core.models import base_reference, public_reference

    from .modelcard import model_card

    folder = e.out / "checkpoints" / f"round-{round_idx:04d}"
    public = public_reference(e.source)
    evaluated = [r for r in e.state.rounds if r["round"] <= round_idx and r.get("accuracy")]
    acc, at = (evaluated[-1]["accuracy"], evaluated[-1]["round"]) if evaluated else (None, None)
    card = model_card(e, public, round_idx=round_idx, acc=acc, acc_round=at, base=getattr(e, "base_accuracy", None))
    save_adapter(folder, e.state.global_factors, e.cfg.lora.scale, e.targets, public, e.cfg.model,
                 e.system_prompt, local_base=base_reference(e.source), card=card)
    return folder


def _rounds_axis(ax, label: str = "round (0 = base model)") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _legend_outside(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _client_classes(report: dict) -> dict[str, str]:
    """client -> device class (its profile's name): from the fleet, then from the round rows."""
    out = {f["client"]: f.get("profile") or "unknown" for f in report.get("fleet") or []}
    for r in report["rounds"]:
        for c in r["clients"]:
            if c.get("device"):
                out.setdefault(c["client"], c["device"])
    return out


def _loss_bands(ax, rounds: list[dict]) -> int:
    """Per round, the median and the 10-90 % band over clients of the training loss at each step
    position (a client with L steps puts step i at (i + 1) / L of the round, binned to the round's
    longest run, at most 100 bins).  Non-finite losses are left out.  Returns the clients drawn."""
    import math

    import numpy as np

    seen: set[str] = set()
    labelled = False
    for r in rounds:
        series = [(c["client"], c.get("losses") or []) for c in r["clients"]]
        series = [(n, ls) for n, ls in series if ls]
        if not series:
            continue
        bins = min(100, max(len(ls) for _, ls in series))
        values: list[list[float]] = [[] for _ in range(bins)]
        for name, ls in series:
            seen.add(name)
            for i, v in enumerate(ls):
                if v is not None and math.isfinite(v):
                    values[min(bins - 1, i * bins // len(ls))].append(v)
        kept = [(k, v) for k, v in enumerate(values) if v]
        if not kept:
            continue
        xs = [(r["round"] - 1) + (k + 1) / bins for k, _ in kept]
        q = np.array([np.quantile(v, [0.1, 0.5, 0.9]) for _, v in kept])
        ax.fill_between(xs, q[:, 0], q[:, 2], color="C0", alpha=0.25, lw=0,
                        label=None if labelled else "10-90 % of clients")
        ax.plot(xs, q[:, 1], color="C0", lw=1.5, label=None if labelled else "median")
        labelled = True
    return len(seen)


def _bytes_by_class(ax, report: dict, up: dict[str, int], down: dict[str, int]) -> None:
    """Bars of the mean MB per client over the run per device class, whiskers from the class's
    least to its most; past PLOT_CLASSES classes the smallest (by clients) are one "other" bar."""
    classes = _client_classes(report)
    members: dict[str, list[str]] = {}
    for n in up:
        members.setdefault(classes.get(n, "unknown"), []).append(n)
    order = sorted(members, key=lambda k: (-len(members[k]), k))
    if len(order) > PLOT_CLASSES:
        rest = order[PLOT_CLASSES - 1:]
        other = [n for k in rest for n in members.pop(k)]
        order = order[:PLOT_CLASSES - 1] + [f"other ({len(rest)} classes)"]
        members[order[-1]] = other
    x = range(len(order))
    for shift, series, label in ((-0.2, up, "uplink"), (0.2, down, "downlink")):
        mb = [[series[n] / 1e6 for n in members[k]] for k in order]
        mean = [sum(v) / len(v) for v in mb]
        # clamped: the mean of equal values can round a hair past them, and matplotlib refuses a negative error
        err = [[max(0.0, m - min(v)) for m, v in zip(mean, mb)], [max(0.0, max(v) - m) for m, v in zip(mean, mb)]]
        ax.bar([i + shift for i in x], mean, 0.4, yerr=err, capsize=2, label=label)
    ax.set_xticks(list(x), [f"{k}\n{len(members[k])} clients" for k in order], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MB per client over the run")
    ax.set_title(f"bytes per client by device class ({len(up)} clients; whiskers: least to most)")


def plot_figures(report: dict) -> Iterator[tuple[str, object]]:
    """``(file name, matplotlib Figure)`` of each plot, each made when the caller asks for it (so a
    caller that drops each one holds at most two): ``accuracy.png`` (exact match per round, overall and
    per domain), ``loss.png`` (held-out loss per round per domain; the training loss per step,
    per client, or past ``PLOT_CLIENTS`` clients its median and 10-90 % band over the clients) and
    ``bytes.png`` (MB per client, or past ``PLOT_CLIENTS`` clients the mean per device class);
    ``loss.png`` comes first where the report's leading metric is the loss (free text).
    Figures are made without pyplot, so no backend is switched and nothing is left registered."""
    from matplotlib.figure import Figure

    lead = (report.get("metrics") or {}).get("lead", "exact_match")
    rounds = [r for r in report["rounds"] if "accuracy" in r]
    xs = [0] + [r["round"] for r in rounds]
    base = report["base_accuracy"]
    names = {c["client"] for r in report["rounds"] for c in r["clients"]}
    many = len(names) > PLOT_CLIENTS

    def accuracy_figure():
        fig = Figure(figsize=(8, 4))
        ax = fig.subplots()
        ax.plot(xs, [base["overall"]] + [r["accuracy"]["overall"] for r in rounds], "k-o", lw=2, label="overall")
        for d in base["per_domain"]:
            ax.plot(xs, [base["per_domain"][d]] + [r["accuracy"]["per_domain"].get(d, 0) for r in rounds],
                    "--", marker=".", alpha=0.8, label=d)
        _rounds_axis(ax)
        ax.set_ylabel("exact match (global adapter)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{report['method']} on {report['model']}"
                     + (f" (the run leads with {lead.replace('_', ' ')})" if lead != "exact_match" else ""))
        _legend_outside(ax)
        fig.tight_layout()
        return fig

    def loss_figure():
        fig = Figure(figsize=(13, 4.2))
        ax1, ax2 = fig.subplots(1, 2)
        if "loss" in base:
            held = [r for r in rounds if "loss" in r["accuracy"]]
            hx = [0] + [r["round"] for r in held]
            ax1.plot(hx, [base["loss"]["overall"]] + [r["accuracy"]["loss"]["overall"] for r in held], "k-o", lw=2,
                     label="overall")
            for d in base["loss"]["per_domain"]:
                ax1.plot(hx, [base["loss"]["per_domain"][d]]
                         + [r["accuracy"]["loss"]["per_domain"].get(d) for r in held], "--", marker=".", alpha=0.8,
                         label=d)
            _legend_outside(ax1)
        _rounds_axis(ax1)
        ax1.set_ylabel("held-out loss, nats per response token")
        ax1.set_title("held-out loss (global adapter)")
        if many:
            drawn = _loss_bands(ax2, report["rounds"])
            if drawn:
                _legend_outside(ax2)
            ax2.set_title(f"local training loss over {drawn} clients")
        else:
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
            ax2.set_title("local training loss, per client")
        _rounds_axis(ax2, "round (each client's local steps within it)")
        ax2.set_ylabel("training loss per step")
        fig.tight_layout()
        return fig

    # the run's leading metric first: a run on free text (lead "loss") writes and lists loss.png first
    order = [("accuracy.png", accuracy_figure), ("loss.png", loss_figure)]
    for name, make in (order[::-1] if lead == "loss" else order):
        yield name, make()

    up: dict[str, int] = {}
    down: dict[str, int] = {}
    for r in report["rounds"]:
        for c in r["clients"]:
            up[c["client"]] = up.get(c["client"], 0) + c["uplink_bytes"]
            down[c["client"]] = down.get(c["client"], 0) + c["downlink_bytes"]
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    if many:
        _bytes_by_class(ax, report, up, down)
    else:
        names_sorted = sorted(up)
        x = range(len(names_sorted))
        ax.bar([i - 0.2 for i in x], [up[n] / 1e6 for n in names_sorted], 0.4, label="uplink")
        ax.bar([i + 0.2 for i in x], [down[n] / 1e6 for n in names_sorted], 0.4, label="downlink")
        ax.set_xticks(list(x), names_sorted, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("MB over the run")
        ax.set_title("bytes per client (safetensors payloads)")
    _legend_outside(ax)
    fig.tight_layout()
    yield "bytes.png", fig


def save_plots(report: dict, out: Path) -> None:
    """Write :func:`plot_figures`' plots into ``out``, each rendered in memory and then written new
    and renamed into place, so a plot file is either the previous one or complete.  An OSError
    propagates unchanged (plots written before it stay, each complete)."""
    for name, fig in plot_figures(report):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        durable.write_bytes(out / name, buf.getvalue())


def build_report(e, base: dict, final: dict, personal: dict, own_mix: float, own_mix_loss: float) -> dict:
    """The run's report (report.json) from engine ``e`` at the end of the run."""
    from fedlora_edge.core import __version__

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
                   # an entry may stand for several refused copies (``count``; absent: one)
                   "rejected_updates": sum(x.get("count", 1) for r in rounds for x in r["rejected"])},
        "contamination": contamination_report(e.cfg.contamination, e.contaminated, e.clients, rounds, final, personal),
        "method_summary": e.method.summary(e.state.method_state),
        "wall_seconds": round(time.perf_counter() - e.t_start, 1),
    }


def write_report(out: Path, report: dict) -> None:
    """``report.json`` in ``out``, written new, fsynced and renamed into place: it is either the
    previous report or the complete new one.  An OSError propagates unchanged."""
    durable.write_bytes(out / "report.json", json.dumps(report, indent=1).encode())


def save_outputs(e, report: dict) -> None:
    """Everything a run leaves in its output folder: the global adapter (``adapter/``), each
    client's model (``clients/<id>/adapter`` or ``clients/<id>/model``), ``report.json``, the plots.

    Each folder is built whole beside its place and swapped in, and each file written new and
    renamed into place (``fedlora_edge.core.durable``), in this order: the adapters and client models,
    then the report, then the plots; so a ``report.json`` in place means every model it describes
    is complete.  An OSError (a full disk) propagates unchanged at the first output that fails:
    the outputs before it are new and complete, that one is whole, old or new (new only when the
    fsync after its rename failed), those after it are as they were (the previous run's, or
    absent), and its temporary file or folder is removed (best effort)."""
    from fedlora_edge.core.lora import from_state_dict
    from fedlora_edge.core.models import base_reference, public_reference
    from fedlora_edge.edge_client.experts import mixture_of, save_mixture

    from .modelcard import model_card

    e.out.mkdir(parents=True, exist_ok=True)
    base, local = public_reference(e.source), base_reference(e.source)
    done = len(report["rounds"])
    if e.method.global_model:
        card = model_card(e, base, round_idx=done, acc=report["global_adapter_accuracy"], acc_round=done,
                          base=report["base_accuracy"], final=True)
        save_adapter(e.out / "adapter", e.state.global_factors, e.cfg.lora.scale, e.targets, base,
                     e.cfg.model, e.system_prompt, local_base=local, card=card)
    own_figures = (report.get("personalised") or {}).get("clients") or {}
    for c in e.clients:
        own = e.method.personal_model(c.id, e.ctx, e.state.method_state)
        if own is None:
            continue
        plan, tensors, _ = own
        folder = e.out / "clients" / c.id
        if mixture_of(plan) is not None:
            with durable.new_dir(folder / "model") as tmp:
                save_mixture(tmp, plan, tensors, e.cfg.model, e.targets)
        else:
            card = model_card(e, base, round_idx=done, acc=own_figures.get(c.id), acc_round=done,
                              base=report["base_accuracy"], client=c.id, final=True)
            save_adapter(folder / "adapter", from_state_dict(tensors), e.cfg.lora.scale, e.targets, base,
                         e.cfg.model, e.system_prompt, local_base=local, card=card)
    from .faults import crash_point

    crash_point("outputs")  # the tests kill the process here: the models are new, the report not yet
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

    from .fleet import load_fleet
    from .fleetplan import capacity_for, method_context
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
    ROUND_CLIENTS = 12  # past this many clients a round's line counts them per rank, and lists of
    # missing or flagged clients show NAMES_SHOWN names and how many more, so a line stays a line
    NAMES_SHOWN = 5

    def __init__(self, console=None, progress_every: float = 30.0):
        self.console = console or make_console()
        self.progress_every = progress_every
        self.progress = None
        self.task = None
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
