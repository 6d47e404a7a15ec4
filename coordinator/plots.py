"""The plots a run leaves in its output folder (``accuracy.png``, ``loss.png``, ``bytes.png``), drawn
from its report dict alone (:mod:`.report` builds it); each file is written new and renamed into
place (``fedlora_edge.core.durable``), so a plot file is either the previous one or complete.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported where a plot is drawn
    from matplotlib.figure import Figure

from fedlora_edge.core import durable

PLOT_CLIENTS = 20  # past this many clients in a run, loss.png's training-loss panel draws quantile bands
# over the clients and bytes.png bars per device class, instead of a line, a bar, a legend entry and
# a tick per client (for 3,000 clients: 23-35 s and +330 MiB of RSS, against 1 s and +29 MiB summarised;
# bench/report_scale.py)
PLOT_CLASSES = 20  # most bars in bytes.png's per-class view; the smallest classes beyond it are one bar


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


def plot_figures(report: dict) -> Iterator[tuple[str, Figure]]:
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
