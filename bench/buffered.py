"""Buffered asynchronous rounds against synchronous ones, on one clock: the fleet's profile timings.

    python bench/buffered.py --out runs/buffered [--model smollm2-135m] [--method hetlora]
        [--fleet spread10] [--rounds 6] [--clients 4] [--steps 6] [--seeds 0,1,2]

Both schedules are ``fedlora simulate`` runs with the same method, fleet, data and number of
updates (``--rounds`` rounds of ``--clients`` devices, or as many versions of ``--clients``
updates, ``--clients`` devices training at once); each round or version is evaluated. Time is the
simulation's virtual clock: a device's update arrives after its predicted round (download, local
steps, upload, from its profile), so a synchronous round lasts as long as its slowest device and a
buffered version until its ``--clients``-th update arrives. Per seed (a finished run is reused):

- the virtual time at which each schedule first reaches the target held-out loss (the higher of the
  two final losses: a level both reach), and the ratio;
- the final held-out loss, and the difference buffered - sync paired by seed with its interval;
- the synchronous devices' waiting (a round's finished devices waiting for its slowest), and the
  buffered updates' staleness.

Over MQTT buffered rounds are not built yet: these are the simulation's clock, not wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from fedlora_edge.coordinator.compare import reusable  # noqa: E402
from fedlora_edge.coordinator.config import load_config  # noqa: E402
from fedlora_edge.coordinator.simulate import Simulation  # noqa: E402
from fedlora_edge.coordinator.stats import mean_interval  # noqa: E402


def run(folder: Path, overrides: dict) -> dict:
    cfg = load_config(overrides=overrides)
    got = reusable(folder, cfg)
    if got is not None and all("virtual_seconds" in r for r in got["rounds"]):  # (an older run has no clock)
        return got
    folder.mkdir(parents=True, exist_ok=True)
    return Simulation(cfg, folder).run()


def curve(report: dict) -> list[tuple[float, float]]:
    """(virtual seconds, held-out loss) after each evaluated round or version."""
    return [(r["virtual_seconds"], r["accuracy"]["loss"]["overall"]) for r in report["rounds"] if "accuracy" in r]


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, loss in points if loss <= target + 1e-12), None)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="hetlora")
    ap.add_argument("--fleet", default="spread10")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = {"model": args.model, "method": args.method, "fleet": args.fleet, "rounds": args.rounds,
            "clients_per_round": args.clients, "train.steps": args.steps, "data.eval_per_domain": 6,
            "data.samples_per_client": 32, "eval_every": 1}
    rows = []
    for s in seeds:
        got = {}
        for mode in ("sync", "buffered"):
            print(f"{mode}, seed {s} ...", file=sys.stderr, flush=True)
            got[mode] = run(out / mode / f"seed-{s}", {**base, "schedule.mode": mode, "seed": s})
        curves = {m: curve(r) for m, r in got.items()}
        target = max(c[-1][1] for c in curves.values())
        rows.append({
            "seed": s, "target": target,
            **{f"{m}_time": time_to(curves[m], target) for m in got},
            **{f"{m}_final": curves[m][-1][1] for m in got},
            **{f"{m}_clock": curves[m][-1][0] for m in got},
            "sync_waiting": sum(r["waiting_seconds"] for r in got["sync"]["rounds"]),
            "staleness": [c["staleness"] for r in got["buffered"]["rounds"] for c in r["clients"]],
            "updates": {m: sum(r["valid_updates"] for r in got[m]["rounds"]) for m in got}})
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"{args.method} on {args.fleet}, {args.model}: {args.rounds} rounds of {args.clients} devices (sync) or "
          f"{args.rounds} versions of {args.clients} updates, {args.clients} devices at once (buffered), "
          f"{args.steps} local steps; virtual seconds on the profiles' predicted round times\n")
    print("| seed | target loss | sync: time to target / to the end, s | buffered: time to target / to the end, s | "
          "sync / buffered (to target) | final loss sync / buffered | sync devices' waiting, s | buffered staleness "
          "(mean / max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['sync_time'] / r['buffered_time']:.2f}x" if r["sync_time"] and r["buffered_time"] else "-")
        print(f"| {r['seed']} | {r['target']:.4f} | {r['sync_time']:.1f} / {r['sync_clock']:.1f} | "
              f"{r['buffered_time']:.1f} / {r['buffered_clock']:.1f} | {ratio} | {r['sync_final']:.4f} / "
              f"{r['buffered_final']:.4f} | {r['sync_waiting']:.1f} | {statistics.mean(r['staleness']):.2f} / "
              f"{max(r['staleness'])} |")
    d = [r["buffered_final"] - r["sync_final"] for r in rows]
    m, lo, hi = mean_interval(d)
    verdict = "within noise" if lo is not None and lo <= 0 <= hi else "apart"
    print(f"\nfinal loss, buffered - sync, paired by seed: {m:+.4f}"
          + (f" [{lo:+.4f}, {hi:+.4f}] {verdict}" if lo is not None else ""))
    ratios = [r["sync_time"] / r["buffered_time"] for r in rows if r["sync_time"] and r["buffered_time"]]
    if ratios:
        rm, rlo, rhi = mean_interval(ratios)
        print(f"time to the target, sync / buffered: {rm:.2f}x" + (f" [{rlo:.2f}, {rhi:.2f}]" if rlo is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
