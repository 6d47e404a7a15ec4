"""``fedlora compare``: several methods on the same fleet, seed, data and rounds, one table.

A method spec is ``NAME`` or ``NAME@RANK``: ``@RANK`` sets ``lora.rank`` (the homogeneous rank of
``fedit``) to a number, or to ``min`` / ``max``, the smallest / largest planner capacity among the
fleet's devices that can train (capped at ``lora.max_rank``).  Each run writes its usual outputs
under ``OUT/<label>/``; a run whose ``report.json`` is already there with the same settings is
reused, so an interrupted comparison continues where it stopped (``--fresh`` re-runs everything).
The table (markdown, ``OUT/compare.md``), the numbers (``OUT/compare.json``) and a plot
(``OUT/compare.png``) are written at the end.

**Fair by construction.** Before anything runs, every method's round-1 plan is made for every
device of the fleet (:func:`~coordinator.fleetplan.fleet_plans`); where one method would leave out
devices that another keeps (Fed-PLoRA, HAFL and FedLEASE download the whole rank-R adapter, which a
slow link may not carry in ``planner.transfer_budget_s``), the comparison stops (ConfigError,
exit 2) naming the method, the devices and why, unless ``allow_unequal`` (``--allow-unequal-fleets``):
then the table marks those rows and says who was left out.  Every run's row records
``devices_trained``, the devices that trained at least once.

``jobs > 1`` runs the grid's runs in that many processes at once (each with ``cores / jobs``
torch threads; every run of a grid gets the same thread count, so ``jobs`` does not change which
results a grid gives beyond float summation order); a finished run is reused as ever, so an
interrupted grid goes on where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .config import ConfigError, RunConfig, validate
from .methods import get_method, is_registered, method_names, settings_classes
from .plugins import loaded_plugins, not_registered

# fedit@max is not among them: at the fleet's largest rank only the devices that can hold it train,
# so it would not train on the same devices as the others (compare it on a fleet where every device can)
DEFAULT_METHODS = ("fedit@min", "hetlora", "flexlora", "hafl", "fslora", "fed-plora", "local", "centralized")


@dataclasses.dataclass(frozen=True)
class Entry:
    label: str
    cfg: RunConfig


def fleet_rank_range(cfg: RunConfig) -> tuple[int, int]:
    """(smallest, largest) planner capacity over the fleet's devices that can train."""
    from .fleet import load_fleet
    from .fleetplan import capacity_for
    from .planner import meta_shape

    shape = meta_shape(cfg.model, list(cfg.lora.target_modules) or None)
    caps = [min(c.rank, cfg.lora.max_rank) for c in (capacity_for(cfg, shape, d.profile) for d in load_fleet(cfg.fleet))
            if c.can_train]
    if not caps:
        raise ConfigError(f"fleet {cfg.fleet}: no device can train rank 1")
    return min(caps), max(caps)


def entries(base: RunConfig, specs: list[str]) -> list[Entry]:
    """One validated config per method spec; a bad spec fails before anything runs."""
    out: list[Entry] = []
    span: tuple[int, int] | None = None  # the fleet's (min, max) rank, once a spec asks for it
    for spec in specs:
        name, _, rank = spec.partition("@")
        if not is_registered(name):
            raise ConfigError(f"--methods: '{spec}': {not_registered(name, method_names())}")
        cfg = dataclasses.replace(base, method=name)
        label = name
        if rank:
            if rank in ("min", "max"):
                span = span or fleet_rank_range(base)
                r = span[0] if rank == "min" else span[1]
            else:
                try:
                    r = int(rank)
                except ValueError:
                    raise ConfigError(f"--methods: '{spec}': the part after @ must be a rank, min or max") from None
            cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=r))
            label = f"{name}-r{r}"
        validate(cfg)
        if label in {e.label for e in out}:
            raise ConfigError(f"--methods: '{spec}' is listed twice (as {label})")
        out.append(Entry(label, cfg))
    return out


def devices_taking_part(e: Entry) -> dict[str, str]:
    """Device id -> '' when ``e``'s method plans it, else why not (a method that pools every
    client's data on the server takes no device: empty)."""
    from .fleetplan import fleet_plans

    if get_method(e.cfg.method).pools_data:
        return {}
    return {fp.device: fp.reason for fp in fleet_plans(e.cfg)}


def check_same_devices(es: list[Entry], allow_unequal: bool = False) -> dict[str, dict[str, str]]:
    """label -> {device left out: why} for each method that would leave out devices another method
    of the comparison trains; ConfigError naming them unless ``allow_unequal``."""
    plans = {e.label: devices_taking_part(e) for e in es}
    kept = {d for p in plans.values() for d, why in p.items() if not why}
    left = {label: {d: p[d] for d in sorted(kept) if p.get(d)} for label, p in plans.items() if p}
    left = {label: devs for label, devs in left.items() if devs}
    if left and not allow_unequal:
        lines = [f"{label} leaves out {len(devs)} device(s) that another method trains: "
                 + "; ".join(f"{d} ({why})" for d, why in devs.items()) for label, devs in left.items()]
        raise ConfigError("--methods: the methods would not train on the same devices, so their results could "
                          "not be compared: " + " | ".join(lines) + ". Give those devices the capacity (a larger "
                          "planner.transfer_budget_s, a faster profile), compare on another fleet, or pass "
                          "--allow-unequal-fleets to run it anyway (the table then marks those rows)")
    return left


def _plain(obj):
    return json.loads(json.dumps(obj))


def reusable(folder: Path, cfg: RunConfig) -> dict | None:
    """The saved report in ``folder`` when its run had the same settings (``device`` and other
    methods' sections aside)."""
    path = folder / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    # a section or field the saved run's version did not have ran with its default
    defaults = _plain(RunConfig().to_dict())
    saved = {k: {**v, **report.get("config", {}).get(k, {})} if isinstance(v, dict)
             else report.get("config", {}).get(k, v) for k, v in defaults.items()}
    want = _plain(cfg.to_dict())
    # a method's own section (hafl:, clair:...) matters to that method's runs only
    own = get_method(cfg.method).section
    ignore = {"device"} | {sec for sec in settings_classes() if sec != own}
    same = all(saved.get(k) == v for k, v in want.items() if k not in ignore)
    return report if same else None


def summary(label: str, r: dict) -> dict:
    """One row of the comparison from a run's report."""
    n = max(1, len(r["rounds"]))
    fa = r["final_accuracy"]
    ranks = sorted({c["rank"] for x in r["rounds"] for c in x["clients"]})
    trained = sorted({c["client"] for x in r["rounds"] for c in x["clients"]})
    return {"run": label, "method": r["method"], "ranks": ranks, "accuracy": fa["overall"],
            "devices_trained": trained, "fleet_size": len(r.get("fleet") or []),
            "per_domain": fa["per_domain"], "own_mix": fa["own_mix"], "evaluated": fa.get("evaluated"),
            "loss": (fa.get("loss") or {}).get("overall"), "own_mix_loss": fa.get("own_mix_loss"),
            "lead": (r.get("metrics") or {}).get("lead", "exact_match"),
            "mb_up_per_round": r["totals"]["uplink_bytes"] / n / 1e6,
            "mb_down_per_round": r["totals"]["downlink_bytes"] / n / 1e6,
            "wall_seconds": r["wall_seconds"], "base_accuracy": r["base_accuracy"],
            # the global adapter per round; none for a method whose global adapter is not a model (local)
            "curve": ([x.get("accuracy", {}).get("overall") for x in r["rounds"]]
                      if r["method"] not in method_names() or get_method(r["method"]).global_model else []),
            "contamination": r.get("contamination"), "own_models": own_models(r)}


def own_models(r: dict) -> str | None:
    """``"trained/clients"`` for a method whose clients keep their own models (a client without one
    is scored on the global adapter where the method gives it one, else on the base model, which
    pulls the mean down); None for a global model."""
    per = (r.get("personalised") or {}).get("clients")
    return f"{r['personalised']['clients_trained']}/{len(per)}" if per else None


def markdown(rows: list[dict]) -> str:
    """The comparison as a markdown table (the base model first)."""
    domains = list(rows[0]["per_domain"])
    head = ["run", "method", "ranks", "devices trained", "held-out loss", "accuracy %"] + [f"{d} %" for d in domains] + [
        "own-mix loss", "own-mix %", "own models trained", "MB up/round", "MB down/round", "wall s"]
    contaminated = any((s.get("contamination") or {}).get("attack", "none") != "none" for s in rows)
    if contaminated:
        head += ["contaminated", "benign %", "detection precision", "recall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]["base_accuracy"]
    base_loss = (base.get("loss") or {}).get("overall")
    lines.append("| base model | - | - | - | " + f"{_num(base_loss, 3)} | {100 * base['overall']:.1f} | "
                 + " | ".join(f"{100 * base['per_domain'][d]:.1f}" for d in domains) + " | - | - | - | - | - | -"
                 + " | - | - | - | -" * contaminated + " |")
    for s in rows:
        cells = [s["run"], s["method"], ",".join(map(str, s["ranks"])), devices_cell(s), _num(s.get("loss"), 3),
                 f"{100 * s['accuracy']:.1f}"]
        cells += [f"{100 * s['per_domain'][d]:.1f}" for d in domains]
        cells += [_num(s.get("own_mix_loss"), 3), f"{100 * s['own_mix']:.1f}", s.get("own_models") or "-",
                  f"{s['mb_up_per_round']:.2f}",
                  f"{s['mb_down_per_round']:.2f}", f"{s['wall_seconds']:.0f}"]
        if contaminated:
            co = s.get("contamination") or {}
            det = co.get("detection") or {}
            cells += [f"{len(co.get('clients', []))} ({co.get('attack', '-')})",
                      _pct(co.get("benign_accuracy")), _num(det.get("precision")), _num(det.get("recall"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def devices_cell(row: dict) -> str:
    """``trained/fleet``, marked when the method left out devices other runs trained."""
    n = len(row.get("devices_trained") or [])
    return f"{n}/{row.get('fleet_size') or '?'}" + (" (not the same devices)" if row.get("left_out") else "")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def plot(rows: list[dict], path: Path, intervals: list[dict] | None = None) -> None:
    """Accuracy per round (the first seed) and MB per round; with several seeds, a third panel:
    each run's final exact match and held-out loss, mean and 95 % interval over the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if intervals:
        fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5))
        x = list(range(len(intervals)))
        for offset, key, scale, colour, name in ((-0.2, "accuracy", 100.0, "C0", "exact match %"),
                                                 (0.2, "loss", 10.0, "C1", "held-out loss x 10")):
            means = [scale * r[key]["mean"] for r in intervals]
            err = [[scale * (r[key]["mean"] - r[key]["low"]) if r[key]["low"] is not None else 0 for r in intervals],
                   [scale * (r[key]["high"] - r[key]["mean"]) if r[key]["high"] is not None else 0 for r in intervals]]
            ax3.bar([i + offset for i in x], means, 0.4, yerr=err, capsize=3, color=colour, label=name)
        ax3.set_xticks(x, [r["run"] for r in intervals], rotation=45, ha="right", fontsize=8)
        ax3.set_title(f"final, mean and 95 % interval over {intervals[0]['seeds']} seeds")
        ax3.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for s in rows:
        xs = [i + 1 for i, v in enumerate(s["curve"]) if v is not None]
        if not xs:
            continue
        ax1.plot(xs, [100 * v for v in s["curve"] if v is not None], marker="o", label=s["run"])
    ax1.set(xlabel="round", ylabel="exact match %", title="global adapter accuracy per round"
            + (" (first seed)" if intervals else ""))
    from matplotlib.ticker import MaxNLocator

    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.legend(fontsize=7)
    labels = [s["run"] for s in rows]
    at = range(len(rows))
    ax2.bar([i - 0.2 for i in at], [s["mb_up_per_round"] for s in rows], width=0.4, label="up")
    ax2.bar([i + 0.2 for i in at], [s["mb_down_per_round"] for s in rows], width=0.4, label="down")
    ax2.set_xticks(list(at), labels, rotation=45, ha="right", fontsize=8)
    ax2.set(ylabel="MB per round (all clients)", title="communication")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(base: RunConfig, specs: list[str], out: str | Path, fresh: bool = False, console=None,
            log: str = "none", seeds: int = 1, jobs: int = 1, allow_unequal: bool = False,
            ray: dict | None = None) -> list[dict]:
    """Run (or reuse) every spec's run under ``out``; write and return the comparison rows.
    ``log``: each run also logged to tensorboard or mlflow (:mod:`.tracking`).  ``seeds > 1``:
    every spec on seeds ``base.seed .. base.seed + seeds - 1`` (runs in ``out/seed-<s>/``), and the
    table gives each metric's mean with its 95 % interval over the seeds, and paired differences
    between methods (:func:`paired`).  ``jobs``, ``allow_unequal``: see the module text."""
    from .console import ConsoleReporter

    if seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {seeds}")
    if jobs < 1:
        raise ConfigError(f"--jobs: must be at least 1, got {jobs}")
    out = Path(out)
    seed_list = [base.seed + i for i in range(seeds)]
    todo = [(s, e) for s in seed_list for e in entries(dataclasses.replace(base, seed=s), specs)]
    left_out = check_same_devices([e for s, e in todo if s == seed_list[0]], allow_unequal)
    console_reporter = ConsoleReporter(console)
    runs = [Run(e.label, e.cfg, (out / e.label) if seeds == 1 else (out / f"seed-{seed}" / e.label),
                f"{e.label}" + (f" seed {seed}" if seeds > 1 else "")) for seed, e in todo]
    reports = run_all(runs, jobs=jobs, fresh=fresh, console=console_reporter.console, log=log, ray=ray)
    per_seed: dict[int, list[dict]] = {s: [] for s in seed_list}
    for (seed, e), report in zip(todo, reports):
        row = summary(e.label, report) | {"per_example": report["final_accuracy"].get("per_example")}
        if e.label in left_out:
            row["left_out"] = left_out[e.label]
        per_seed[seed].append(row)
    out.mkdir(parents=True, exist_ok=True)
    rows = per_seed[seed_list[0]]
    table = markdown(rows) if seeds == 1 else ""
    result: dict = {"specs": specs, "seeds": seed_list, "rows": [_without_examples(r) for r in rows]}
    if seeds > 1:
        result["per_seed"] = {str(s): [_without_examples(r) for r in v] for s, v in per_seed.items()}
        result["intervals"] = intervals(per_seed)
        result["pairs"] = paired(per_seed)
        table = seeds_markdown(result["intervals"], result["pairs"], seed_list)
    table += unequal_note(rows)
    (out / "compare.md").write_text(table)
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "compare.png", result.get("intervals"))
    return rows


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a grid: its label, config, folder and what the console calls it."""

    label: str
    cfg: RunConfig
    folder: Path
    name: str


def run_all(runs: list[Run], jobs: int = 1, fresh: bool = False, console=None, log: str = "none",
            ray: dict | None = None) -> list[dict]:
    """Every run's report, in order: a finished run with the same settings is reused; the others run
    here one after another (``jobs`` 1) or in ``jobs`` processes at once, each with ``cores // jobs``
    torch threads (its output in ``<folder>/simulate.log``), or with ``ray`` (``{"address", "cpus"}``)
    each as a task on a Ray cluster (:func:`run_on_ray`).  A run that fails stops the grid
    with its log's tail (its error, on Ray); runs already finished stay reusable."""
    from .console import ConsoleReporter, make_console
    from .simulate import Simulation
    from .tracking import tracked

    console = console or make_console()
    reports: dict[int, dict] = {}
    pending = []
    for i, r in enumerate(runs):
        found = None if fresh else reusable(r.folder, r.cfg)
        if found is not None:
            console.print(f"[{i + 1}/{len(runs)}] {r.name}: reusing {r.folder / 'report.json'}")
            reports[i] = found
        else:
            pending.append(i)
    if ray is not None:
        if pending:
            run_on_ray(runs, pending, ray.get("cpus") or 1, ray.get("address"), log, console, reports)
        return [reports[i] for i in range(len(runs))]
    if jobs == 1:
        reporter = ConsoleReporter(console)
        for i in pending:
            console.print(f"[b][{i + 1}/{len(runs)}] {runs[i].name}[/b]")
            reports[i] = Simulation(runs[i].cfg, runs[i].folder, tracked(reporter, log, runs[i].folder, runs[i].cfg)).run()
        return [reports[i] for i in range(len(runs))]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // jobs)
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    queue = list(pending)
    while queue or running:
        while queue and len(running) < jobs:
            i = queue.pop(0)
            running[i] = (_start(runs[i], threads, log), time.monotonic())
            console.print(f"[{i + 1}/{len(runs)}] {runs[i].name}: started ({threads} thread(s), log "
                          f"{runs[i].folder / 'simulate.log'})")
        time.sleep(0.5)
        for i, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[i]
            found = reusable(runs[i].folder, runs[i].cfg) if proc.returncode == 0 else None
            if found is None:
                for other, _ in running.values():
                    other.terminate()
                tail = (runs[i].folder / "simulate.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"run {runs[i].name} failed (exit {proc.returncode}); the end of its log:\n{tail}")
            reports[i] = found
            console.print(f"[{i + 1}/{len(runs)}] {runs[i].name}: done in {time.monotonic() - t0:.0f} s, held-out "
                          f"loss {_num((found['final_accuracy'].get('loss') or {}).get('overall'), 3)}")
    return [reports[i] for i in range(len(runs))]


def _start(r: Run, threads: int, log: str) -> subprocess.Popen:
    """``fedlora simulate`` of ``r`` in a process of its own, its config written beside its outputs."""
    import yaml

    r.folder.mkdir(parents=True, exist_ok=True)
    cfg_file = r.folder / "run-config.yaml"
    cfg_file.write_text(yaml.safe_dump(_plain(r.cfg.to_dict()), sort_keys=False))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "fedlora_edge.coordinator.cli", "simulate", "--config", str(cfg_file), "--out", str(r.folder),
           "--log", log] + [a for spec in loaded_plugins() for a in ("--plugin", spec)]  # the methods this one knows
    with open(r.folder / "simulate.log", "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _run_remote(cfg_yaml: str, plugins: list[str], log: str, threads: int) -> dict[str, bytes]:
    """One ``simulate`` run on a Ray node, in a folder of its own, from its config as ``compare``
    writes it (YAML); its files back as bytes."""
    import tempfile

    import torch

    from fedlora_edge.core.quiet import quiet_third_party

    from .config import load_config
    from .engine import _Silent
    from .plugins import load_plugins
    from .simulate import Simulation
    from .tracking import tracked

    quiet_third_party()
    torch.set_num_threads(threads)
    load_plugins(plugins)
    with tempfile.TemporaryDirectory(prefix="fedlora-run-") as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        (folder / "run-config.yaml").write_text(cfg_yaml)
        cfg = load_config(folder / "run-config.yaml")
        Simulation(cfg, folder, tracked(_Silent(), log, folder, cfg)).run()
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_on_ray(runs: list, pending: list[int], cpus_per_run: int, address: str | None, log: str, console,
             reports: dict[int, dict]) -> None:
    """Each pending run of ``runs`` as a Ray task; its files written under its folder as it ends."""
    import yaml

    from fedlora_edge.core.durable import new_dir

    from .plugins import loaded_plugins
    from .ray_engine import cluster_cpus, connect

    ray = connect(address)
    task = ray.remote(_run_remote).options(num_cpus=cpus_per_run, max_retries=0)
    refs = {}
    t0 = {}
    for i in pending:
        cfg_yaml = yaml.safe_dump(_plain(runs[i].cfg.to_dict()), sort_keys=False)
        refs[task.remote(cfg_yaml, list(loaded_plugins()), log, cpus_per_run)] = i
        t0[i] = time.monotonic()
    console.print(f"ray: {len(pending)} run(s) as tasks of {cpus_per_run} CPU(s) on a cluster of "
                  f"{cluster_cpus(ray)} CPU(s)")
    left = list(refs)
    while left:
        ready, left = ray.wait(left, num_returns=1)
        i = refs[ready[0]]
        try:
            files = ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            for ref in left:
                ray.cancel(ref, force=True)
            raise RuntimeError(f"run {runs[i].name} failed on its Ray node: {exc}") from None
        folder = runs[i].folder
        with new_dir(folder) as tmp:  # the run's folder whole, swapped in
            for rel, data in files.items():
                path = tmp / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
        found = reusable(folder, runs[i].cfg)
        if found is None:
            raise RuntimeError(f"run {runs[i].name}: its Ray task ended without a report matching its settings")
        reports[i] = found
        console.print(f"[{i + 1}/{len(runs)}] {runs[i].name}: done in {time.monotonic() - t0[i]:.0f} s, held-out "
                      f"loss {_num((found['final_accuracy'].get('loss') or {}).get('overall'), 3)}")


def unequal_note(rows: list[dict]) -> str:
    """What the table says under it when some runs trained on fewer devices than others."""
    marked = [r for r in rows if r.get("left_out")]
    if not marked:
        return ""
    lines = ["", "**Not the same devices** (`--allow-unequal-fleets`): these runs' methods left devices out that "
             "other runs trained, so their rows are not comparable with the others':", ""]
    for r in marked:
        lines.append(f"- {r['run']}: trained {len(r['devices_trained'])} devices; left out "
                     + "; ".join(f"{d} ({why})" for d, why in r["left_out"].items()))
    return "\n".join(lines) + "\n"


def _without_examples(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "per_example"}


METRICS = (("accuracy", "exact match %", 100.0), ("loss", "held-out loss", 1.0), ("own_mix", "own-mix %", 100.0),
           ("own_mix_loss", "own-mix loss", 1.0))


def intervals(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Per run: each metric's mean over the seeds with its 95 % t-interval."""
    from .stats import mean_interval

    labels = [r["run"] for r in next(iter(per_seed.values()))]
    out = []
    for label in labels:
        runs = [next(r for r in rows if r["run"] == label) for rows in per_seed.values()]
        row = {"run": label, "method": runs[0]["method"], "seeds": len(runs)}
        for key, _, _ in METRICS:
            m, lo, hi = mean_interval([r.get(key) for r in runs])
            row[key] = {"mean": m, "low": lo, "high": hi}
        row["mb_up_per_round"] = sum(r["mb_up_per_round"] for r in runs) / len(runs)
        row["devices"] = devices_cell(runs[0])
        own = [r.get("own_models") for r in runs]
        row["own_models"] = ", ".join(o or "-" for o in own) if any(own) else None
        out.append(row)
    return out


def paired(per_seed: dict[int, list[dict]]) -> list[dict]:
    """Every pair of runs, compared on the same seeds and prompts: the mean difference of each
    prompt's exact match (points) and loss, with a 95 % interval from a bootstrap over seeds and
    prompts; and the difference of the loss on each client's own domain mix (``own_mix_loss``: one
    value per seed, a t-interval over the seeds); ``separated`` when the interval excludes 0 (the
    gap is not within noise)."""
    from .stats import mean_interval, paired_bootstrap, separated

    labels = [r["run"] for r in next(iter(per_seed.values()))]
    by = {(s, r["run"]): r["per_example"] for s, rows in per_seed.items() for r in rows}
    out = []
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            row = {"a": a, "b": b}
            for key, scale in (("exact", 100.0), ("loss", 1.0)):
                diffs = []
                for s in per_seed:
                    ea, eb = by.get((s, a)), by.get((s, b))
                    if not ea or not eb or len(ea[key]) != len(eb[key]):
                        break
                    diffs.append([scale * (x - y) for x, y in zip(ea[key], eb[key]) if x is not None and y is not None])
                else:
                    m, lo, hi = paired_bootstrap(diffs)
                    row[key] = {"mean": m, "low": lo, "high": hi, "separated": separated(lo, hi)}
            own = {s: {r["run"]: r.get("own_mix_loss") for r in rows} for s, rows in per_seed.items()}
            d = []
            for s in per_seed:
                loss_a, loss_b = own[s].get(a), own[s].get(b)
                if loss_a is not None and loss_b is not None:
                    d.append(loss_a - loss_b)
            if len(d) >= 2:
                mean, low, high = mean_interval(d)
                row["own_mix_loss"] = {"mean": mean, "low": low, "high": high, "separated": separated(low, high)}
            out.append(row)
    return out


def _ci(x: dict, scale: float = 1.0, digits: int = 1) -> str:
    if x["low"] is None:
        return f"{scale * x['mean']:.{digits}f}"
    return f"{scale * x['mean']:.{digits}f} [{scale * x['low']:.{digits}f}, {scale * x['high']:.{digits}f}]"


def seeds_markdown(rows: list[dict], pairs: list[dict], seeds: list[int]) -> str:
    """The multi-seed comparison: means and 95 % intervals, then the paired differences."""
    head = ["run", "method", "seeds", "devices trained"] + [name for _, name, _ in METRICS] + ["own models trained",
                                                                                               "MB up/round"]
    lines = [f"Mean over seeds {', '.join(map(str, seeds))} with the 95 % interval over the seeds (Student's t). "
             "Own models trained (per seed): for a method whose clients keep their own models, how many of the "
             "fleet's clients have one; the others are scored on what they use instead: the global adapter "
             "where the method gives them one (clair), else the base model (fedlease, local).",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["method"], str(r["seeds"]), r.get("devices", "-")]
        cells += [_ci(r[key], scale, 1 if scale == 100.0 else 3) for key, _, scale in METRICS]
        cells += [r.get("own_models") or "-", f"{r['mb_up_per_round']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paired differences A - B on the same seeds and held-out prompts, 95 % interval from a "
              "bootstrap over seeds and prompts (own-mix loss: one difference per seed, a t-interval over "
              "the seeds); **bold**: the interval excludes 0 (not within noise).", "",
              "| A | B | exact match, points | held-out loss | own-mix loss |", "|---|---|---|---|---|"]
    for p in pairs:
        cells = [p["a"], p["b"]]
        for key, digits in (("exact", 1), ("loss", 3), ("own_mix_loss", 3)):
            if key not in p:
                cells.append("-")
                continue
            text = _ci(p[key], 1.0, digits)
            cells.append(f"**{text}**" if p[key]["separated"] else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
