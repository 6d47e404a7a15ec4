"""What compressed transfers (``transport.compression``) save and cost: bytes up and down against
fp32, the held-out loss at each precision against fp32 over several seeds, and which devices of a
fleet each method can use at each precision.

    python bench/compression.py --out runs/compression [--model smollm2-135m] [--seeds 0,1,2]
        [--codecs none,fp16,int8,int4] [--devices 6] [--rounds 2] [--steps 6] [--fleet spread10]

1. **Runs** (``fedlora simulate``, FedIT, ``--devices`` identical devices every round, rank 8 on
   q and v, ``--rounds`` rounds of ``--steps`` local steps): one per (codec, seed) under
   ``OUT/<codec>/seed-<s>/`` (a finished run is reused). Every arm trains the same examples from
   the same seeds; only the wire differs. Prints the bytes per device and round up and down, their
   ratio to fp32 (the report's own count of what went on the wire), the final held-out loss (mean
   and 95 % t-interval over seeds) and its difference to fp32 paired by seed, with its interval:
   "within noise" where it holds 0.
2. **Who takes part** (the planner alone, no training): for each method, how many of the fleet's
   devices it can use at each precision, and under ``auto`` (each device the least lossy encoding
   at which it takes part).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from fedlora_edge.coordinator.stats import mean_interval  # noqa: E402

METHODS = ("fedit", "hetlora", "flexlora", "fslora", "fed-plora", "hafl", "fedlease", "clair")


def _privacy_bench():
    """bench/privacy.py's run() (a finished run reused), loaded from beside this file."""
    spec = importlib.util.spec_from_file_location("privacy_bench", Path(__file__).with_name("privacy.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def runs(out: Path, model: str, codecs: list[str], seeds: list[int], devices: int, rounds: int,
         steps: int) -> list[dict]:
    bench = _privacy_bench()
    base = bench.fedit_fleet(out, model, devices, rounds, steps)
    rows = []
    for s in seeds:
        for codec in codecs:
            print(f"run: {codec}, seed {s} ...", file=sys.stderr, flush=True)
            rep = bench.run(out / codec / f"seed-{s}", {**base, "transport.compression": codec, "seed": s})
            n = sum(len(r["clients"]) for r in rep["rounds"])
            rows.append({"codec": codec, "seed": s, "loss": rep["final_accuracy"]["loss"]["overall"],
                         "exact_match": rep["final_accuracy"]["overall"],
                         "up_per_device": rep["totals"]["uplink_bytes"] / n,
                         "down_per_device": rep["totals"]["downlink_bytes"] / n,
                         "up_vs_fp32": rep["totals"]["uplink_vs_fp32"],
                         "down_vs_fp32": rep["totals"]["downlink_vs_fp32"]})
    return rows


def who_joins(fleet: str, model: str, codecs: list[str]) -> list[dict]:
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.fleetplan import fleet_plans

    rows = []
    for method in METHODS:
        for codec in codecs + ["auto"]:
            plans = fleet_plans(load_config(overrides={"model": model, "method": method, "fleet": fleet,
                                                       "transport.compression": codec}))
            rows.append({"method": method, "codec": codec, "devices": len(plans),
                         "joined": [p.device for p in plans if p.plan is not None],
                         "encodings": {c: sum(p.capacity.compression == c for p in plans if p.plan is not None)
                                       for c in ("none", "fp16", "int8", "int4")}})
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--codecs", default="none,fp16,int8,int4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--devices", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--fleet", default="spread10", help="the fleet whose devices each method can use (planner only)")
    ap.add_argument("--no-runs", action="store_true", help="only the planner's table")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    codecs = args.codecs.split(",")
    joins = who_joins(args.fleet, args.model, codecs)
    (out / "joins.json").write_text(json.dumps(joins, indent=1))
    print(f"devices of {args.fleet} each method can use, by encoding ({args.model}; auto: how many at each "
          "encoding)\n")
    cols = codecs + ["auto"]
    print("| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    by = {(r["method"], r["codec"]): r for r in joins}
    for method in METHODS:
        cells = []
        for c in cols:
            r = by[(method, c)]
            cell = f"{len(r['joined'])}/{r['devices']}"
            if c == "auto":
                cell += " (" + ", ".join(f"{k} {v}" for k, v in r["encodings"].items() if v) + ")"
            cells.append(cell)
        print(f"| {method} | " + " | ".join(cells) + " |")
    if args.no_runs:
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    got = runs(out, args.model, codecs, seeds, args.devices, args.rounds, args.steps)
    (out / "runs.json").write_text(json.dumps(got, indent=1))
    rb = {(r["codec"], r["seed"]): r for r in got}
    print(f"\nFedIT, {args.model}, rank 8 (q, v), {args.devices} devices every round, {args.rounds} rounds of "
          f"{args.steps} steps, seeds {args.seeds}:\n")
    print("| encoding | kB up / down per device and round | vs fp32 up / down | held-out loss (mean [95 % interval]) | "
          "minus fp32, paired by seed | exact match % |")
    print("|---|---|---|---|---|---|")
    for codec in codecs:
        rs = [rb[(codec, s)] for s in seeds]
        m, lo, hi = mean_interval([r["loss"] for r in rs])
        iv = f" [{lo:.4f}, {hi:.4f}]" if lo is not None else ""
        if codec == codecs[0]:
            diff = "-"
        else:
            dm, dlo, dhi = mean_interval([rb[(codec, s)]["loss"] - rb[(codecs[0], s)]["loss"] for s in seeds])
            verdict = "within noise" if dlo is not None and dlo <= 0 <= dhi else "apart"
            diff = f"{dm:+.5f}" + (f" [{dlo:+.5f}, {dhi:+.5f}] {verdict}" if dlo is not None else "")
        print(f"| {codec} | {statistics.mean(r['up_per_device'] for r in rs) / 1e3:.1f} / "
              f"{statistics.mean(r['down_per_device'] for r in rs) / 1e3:.1f} | "
              f"{statistics.mean(r['up_vs_fp32'] for r in rs):.3f} / {statistics.mean(r['down_vs_fp32'] for r in rs):.3f} | "
              f"{m:.4f}{iv} | {diff} | {statistics.mean(100 * r['exact_match'] for r in rs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
