"""Robust aggregation under attack: clair and the standard defences against fedit and local, on two
fleets, several seeds.

    python bench/robustness.py --out runs/robustness [--methods clair,median,...] [--attacks ...]
        [--fractions 0,0.1,0.2,0.3] [--fleets iid,non-iid] [--seeds 0,1,2] [--shard I/N]
        [--table] [--set key=value ...]

Every cell is one ``simulate`` run: (fleet, contaminated fraction, attack, seed, method), in
``OUT/<fleet>/<fraction>-<attack>/seed-<s>/<method>/``.  A finished cell whose saved settings match
is reused, so an interrupted grid continues where it stopped; ``--shard I/N`` runs every N-th
cell from the I-th (start N processes, one thread each, to use N cores), ``--table`` runs
nothing and prints the table of the cells that are finished.  Cells run attack by attack (all
fleets, seeds and methods of one attack before the next), so a grid cut short holds whole attacks.

Fleets (``--fleets``): ``iid`` (every client samples every task alike) and ``non-iid`` (one task
per client: ``data.partition: by_domain``, ``data.skew: 1.0``).  Attacks: the ``contamination.attack``
values (coordinator/contamination.py says what each does); fraction 0 is run once per fleet and
seed.  ``local`` depends on a client's own data only, so under an update attack its benign
clients' adapters are those of the clean cell, whose results it shows (marked "= 0%"); it runs
under ``backdoor`` only, where the probes need measuring.

The table, per fleet, fraction, attack and method: the benign clients' held-out loss over all
tasks and over their own task mix (each task's loss weighted by the client's share of it), and
exact match over all tasks (their own models for personalised methods, the global one
otherwise), mean and 95 % t-interval over the seeds; the backdoor's success on them (triggered held-out prompts answered
with the target); and for methods that set clients aside (clair's flags, the clients multi-krum
does not keep) detection precision and recall over every (round, client) of every seed, and the
honest clients set aside per round (mean over seeds, rounds in order).

The defaults are this project's measured setting for a 2-core machine (SmolLM2-135M, fleet
mixed10 with all 10 devices every round at planner ranks 10 and 16 (``lora.max_rank`` 16: CLAIR's
decomposition costs an SVD of a 576 x (2 x the ranks' sum) matrix per adapted matrix and
iteration, about a minute a round at 32), 5 rounds of 2 local steps, batch 4, 16 examples per
client, 6 held-out prompts per task, evaluated after the last round; a cell takes about 2 minutes
on one core, clair's about 4); ``--set`` changes any of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from fedlora_edge.coordinator.compare import reusable
from fedlora_edge.coordinator.config import load_config, parse_override
from fedlora_edge.coordinator.stats import mean_interval

SETTINGS = {"fleet": "mixed10", "clients_per_round": 10, "rounds": 5, "lora.max_rank": 16, "train.steps": 2,
            "train.batch_size": 4,
            "data.samples_per_client": 16, "data.eval_per_domain": 6, "max_new_tokens": 4, "eval_every": 5,
            "multi_krum.byzantine": 3}  # multi-krum told to survive the grid's largest fraction, 3 of 10
FLEETS = {"iid": {"data.partition": "iid"}, "non-iid": {"data.partition": "by_domain", "data.skew": 1.0}}
METHODS = "clair,median,trimmed-mean,multi-krum,norm-bound,fedit,local"
ATTACKS = "sign_flip,random_update,mean_ksigma,scaled_under,backdoor,mixed,random_labels,scaled"
RUNS_LOCAL = ("none", "backdoor")  # local's benign adapters differ from the clean cell's only under these


@dataclasses.dataclass(frozen=True)
class Cell:
    fleet: str
    fraction: float
    attack: str
    seed: int
    method: str

    def folder(self, out: Path) -> Path:
        return out / self.fleet / f"{self.fraction:g}-{self.attack}" / f"seed-{self.seed}" / self.method

    def clean(self) -> Cell:
        return dataclasses.replace(self, fraction=0.0, attack="none")


def grid(methods, attacks, fractions, fleets, seeds) -> list[Cell]:
    """Every cell, attack by attack; the clean cells first."""
    out = [Cell(f, 0.0, "none", s, m) for f in fleets for s in seeds for m in methods] if 0 in fractions else []
    for attack in attacks:
        for frac in sorted(x for x in fractions if x > 0):
            out += [Cell(f, frac, attack, s, m) for f in fleets for s in seeds for m in methods]
    return out


def config_of(cell: Cell, extra: dict):
    return load_config(overrides={**SETTINGS, **FLEETS[cell.fleet], **extra, "method": cell.method,
                                  "seed": cell.seed, "contamination.fraction": cell.fraction,
                                  "contamination.attack": cell.attack})


def run_cell(cell: Cell, out: Path, extra: dict, log) -> dict:
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = config_of(cell, extra)
    folder = cell.folder(out)
    report = reusable(folder, cfg)
    if report is None:
        log(f"running {folder}")
        report = Simulation(cfg, folder).run()
    return report


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--attacks", default=ATTACKS)
    ap.add_argument("--fractions", default="0,0.1,0.2,0.3")
    ap.add_argument("--fleets", default="iid,non-iid")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--shard", default="1/1", metavar="I/N", help="run cells I, I+N, I+2N, ... (1-based)")
    ap.add_argument("--table", action="store_true", help="run nothing: print the table of the finished cells")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    out = Path(args.out)
    extra = dict(parse_override(s) for s in args.set)
    fleets = [f for f in args.fleets.split(",") if f]
    unknown = [f for f in fleets if f not in FLEETS]
    if unknown:
        ap.error(f"--fleets: unknown {unknown}; choose from {', '.join(FLEETS)}")
    try:
        shard, shards = (int(x) for x in args.shard.split("/"))
        assert 1 <= shard <= shards
    except (ValueError, AssertionError):
        ap.error(f"--shard: expected I/N with 1 <= I <= N, got {args.shard!r}")
    cells = grid([m for m in args.methods.split(",") if m], [a for a in args.attacks.split(",") if a],
                 [float(x) for x in args.fractions.split(",")], fleets, [int(s) for s in args.seeds.split(",")])
    for c in cells:  # a bad method, attack or setting fails here, before anything runs
        config_of(c, extra)
    if not args.table:
        todo = [c for c in cells if c.method != "local" or c.attack in RUNS_LOCAL]
        mine = todo[shard - 1::shards]
        for i, c in enumerate(mine, 1):
            run_cell(c, out, extra, lambda msg, i=i: print(f"[{i}/{len(mine)}] {msg}", file=sys.stderr, flush=True))
    print(table(cells, out, extra))
    return 0


def _finished(cell: Cell, out: Path, extra: dict) -> dict | None:
    return reusable(cell.folder(out), config_of(cell, extra))


def table(cells: list[Cell], out: Path, extra: dict) -> str:
    """The markdown table of the finished cells (a row per fleet, fraction, attack and method)."""
    rows: dict[tuple, list[dict]] = {}
    derived = set()
    for c in cells:
        key = (c.fleet, c.fraction, c.attack, c.method)
        if c.method == "local" and c.attack not in RUNS_LOCAL:  # not run: read from the clean cell
            rep = _finished(c.clean(), out, extra)
            derived.add(key)
        else:
            rep = _finished(c, out, extra)
        if rep is not None:
            rows.setdefault(key, []).append(rep)
    lines = ["| fleet | contaminated | attack | method | seeds | benign loss, all tasks | own tasks | "
             "exact match % | backdoor % | "
             "precision | recall | recall per round | honest set aside per round |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (fleet, frac, attack, method), reps in rows.items():
        cos = ([_local_from_clean(r, frac, attack) for r in reps] if (fleet, frac, attack, method) in derived
               else [contamination_of(r) for r in reps])
        loss = _interval([co["benign_loss"] for co in cos], "{:.3f}")
        own = _interval([co["benign_own_mix_loss"] for co in cos], "{:.3f}")
        exact = _interval([100 * co["benign_accuracy"] for co in cos], "{:.1f}")
        bd = _interval([100 * co["backdoor_success"] for co in cos if "backdoor_success" in co], "{:.0f}")
        det = [co["detection"] for co in cos if co.get("detection")]
        tp, fp, fn = (sum(d[k] for d in det) for k in ("true_positives", "false_positives", "false_negatives"))
        prec, rec = (_ratio(tp, tp + fp), _ratio(tp, tp + fn)) if det else ("-", "-")
        per_round = recall_rounds = "-"
        if det:
            rounds = [[d["per_round"][i] for d in det if i < len(d["per_round"])]
                      for i in range(max(len(d["per_round"]) for d in det))]
            per_round = " ".join(f"{sum(x['false_positives'] for x in r) / len(r):.1f}" for r in rounds)
            if tp + fn:
                recall_rounds = " ".join(_ratio(sum(x["true_positives"] for x in r),
                                                sum(x["true_positives"] + x["false_negatives"] for x in r)) for r in rounds)
        name = method + (" (= 0%)" if (fleet, frac, attack, method) in derived else "")
        n_bad = len(cos[0]["clients"])
        lines.append(f"| {fleet} | {frac:.0%} ({n_bad}) | {attack} | {name} | {len(reps)} | {loss} | {own} | {exact} | {bd} | "
                     f"{prec} | {rec} | {recall_rounds} | {per_round} |")
    return "\n".join(lines)


def _ratio(num: int, den: int) -> str:
    return f"{num / den:.2f}" if den else "-"


def _interval(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    m, lo, hi = mean_interval(values)
    return fmt.format(m) + (f" [{fmt.format(lo)}, {fmt.format(hi)}]" if lo is not None else "")


def contamination_of(report: dict, contaminated: set[str] | None = None) -> dict:
    """The report's ``contamination`` section computed again from what the report holds (so a
    cell run before a measure was added still has it), with ``contaminated`` in place of the run's
    own contaminated clients if given (and then no detection: the run judged other clients)."""
    from types import SimpleNamespace

    from fedlora_edge.coordinator.config import ContaminationSettings
    from fedlora_edge.coordinator.contamination import contamination_report

    co = ContaminationSettings(**report["config"]["contamination"])
    clients = [SimpleNamespace(id=c["client"], mix=c["domain_mix"]) for c in report["fleet"]]
    bad = set(report["contamination"]["clients"]) if contaminated is None else contaminated
    return contamination_report(co, bad, clients, report["rounds"] if contaminated is None else [],
                                report["global_adapter_accuracy"], report.get("personalised") or {})


def _local_from_clean(report: dict, frac: float, attack: str) -> dict:
    """The local row of an update-attack cell from the clean cell: the same clients are
    contaminated at this fraction and seed (the choice depends on neither the attack nor the
    method), and their data is untouched, so every benign client's adapter is the same."""
    from fedlora_edge.coordinator.contamination import contaminated_clients

    cfg = load_config(overrides={"seed": report["config"]["seed"], "contamination.fraction": frac,
                                 "contamination.attack": attack})
    eligible = [c["client"] for c in report["fleet"] if c["eligible"]]
    return contamination_of(report, contaminated_clients(cfg, eligible))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
