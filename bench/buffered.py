"""Buffered asynchronous rounds against synchronous ones, on one clock: the fleet's profile timings,
or (``--emulate``) the wall clock of a deployment over MQTT.

    python bench/buffered.py --out runs/buffered [--model smollm2-135m] [--method hetlora]
        [--fleet spread10] [--rounds 6] [--clients 4] [--steps 6] [--seeds 0,1,2]
    python bench/buffered.py --emulate --out runs/buffered-emu --fleet slowlinks6 --rounds 4 --clients 6 \
        --buffer 3 --steps 6 --seeds 0,1

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

With ``--emulate`` both schedules run as ``fedlora emulate`` (the embedded broker, the coordinator,
one process per device, each training at its profile's speed relative to this host (at most
``--max-slowdown`` times slower) behind its profile's link speeds): time is the coordinator's wall
clock when each round or version closed, a device's idle time the run's wall time less the time it
held a plan (from its plan going out to its update's acceptance).  ``--buffer`` updates fold into a
version (default ``--clients``), ``--clients`` devices train at once, and the buffered run has as many
versions as make the same number of updates.  On a host with fewer cores than devices the
processes share them: a device's emulated speed is its share of the host, stretched.
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


def run(folder: Path, overrides: dict, emulated: bool = False) -> dict:
    cfg = load_config(overrides=overrides)
    got = reusable(folder, cfg)
    if got is not None and all(CLOCK[emulated] in r for r in got["rounds"]):  # (an older run has no clock)
        return got
    folder.mkdir(parents=True, exist_ok=True)
    if emulated:
        from fedlora_edge.coordinator.emulate import emulate

        return emulate(cfg, folder, log=lambda line: print(line, file=sys.stderr, flush=True))
    return Simulation(cfg, folder).run()


CLOCK = {False: "virtual_seconds", True: "elapsed_seconds"}


def curve(report: dict, emulated: bool = False) -> list[tuple[float, float]]:
    """(seconds, held-out loss) after each evaluated round or version, on the run's clock."""
    return [(r[CLOCK[emulated]], r["accuracy"]["loss"]["overall"]) for r in report["rounds"] if "accuracy" in r]


def idle_share(report: dict) -> dict[str, float]:
    """Per device of an emulated run: the share of its wall time it held no plan."""
    total = report["rounds"][-1]["elapsed_seconds"]
    busy: dict[str, float] = {}
    for r in report["rounds"]:
        for c in r["clients"]:
            busy[c["client"]] = busy.get(c["client"], 0.0) + c.get("plan_to_update_seconds", 0.0)
    return {d: max(0.0, 1 - b / total) for d, b in sorted(busy.items())}


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
    ap.add_argument("--buffer", type=int, default=0, help="updates folded into a version (default: --clients)")
    ap.add_argument("--emulate", action="store_true", help="run both over MQTT (fedlora emulate): wall-clock time")
    ap.add_argument("--max-slowdown", type=float, default=8.0,
                    help="--emulate: a device runs at most this many times slower than this host (default 8)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    buffer = args.buffer or args.clients
    if (args.rounds * args.clients) % buffer:
        ap.error(f"--rounds x --clients ({args.rounds * args.clients} updates) is not a multiple of --buffer {buffer}")
    versions = args.rounds * args.clients // buffer
    base = {"model": args.model, "method": args.method, "fleet": args.fleet, "rounds": args.rounds,
            "clients_per_round": args.clients, "train.steps": args.steps, "data.eval_per_domain": 6,
            "data.samples_per_client": 32, "eval_every": 1}
    if args.emulate:
        base.update({"data.eval_per_domain": 4, "transport.max_slowdown": args.max_slowdown,
                     "transport.run_id": "bench-buffered"})
    arms = {"sync": {"schedule.mode": "sync"},
            # (concurrency: clients_per_round, the default)
            "buffered": {"schedule.mode": "buffered", "rounds": versions, **({"schedule.buffer": buffer} if args.buffer else {})}}
    rows = []
    for s in seeds:
        got = {}
        for mode, arm in arms.items():
            print(f"{mode}, seed {s} ...", file=sys.stderr, flush=True)
            got[mode] = run(out / mode / f"seed-{s}", {**base, **arm, "seed": s}, args.emulate)
        curves = {m: curve(r, args.emulate) for m, r in got.items()}
        target = max(c[-1][1] for c in curves.values())
        rows.append({
            "seed": s, "target": target,
            **{f"{m}_time": time_to(curves[m], target) for m in got},
            **{f"{m}_final": curves[m][-1][1] for m in got},
            **{f"{m}_clock": curves[m][-1][0] for m in got},
            "sync_waiting": (sum(r["waiting_seconds"] for r in got["sync"]["rounds"]) if not args.emulate else
                             sum(idle_share(got["sync"]).values()) / len(idle_share(got["sync"]))),
            "idle": {m: idle_share(got[m]) for m in got} if args.emulate else None,
            "staleness": [c["staleness"] for r in got["buffered"]["rounds"] for c in r["clients"]],
            "updates": {m: sum(r["valid_updates"] for r in got[m]["rounds"]) for m in got}})
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    clock = ("wall-clock seconds over MQTT (fedlora emulate)" if args.emulate
             else "virtual seconds on the profiles' predicted round times")
    print(f"{args.method} on {args.fleet}, {args.model}: {args.rounds} rounds of {args.clients} devices (sync) or "
          f"{versions} versions of {buffer} updates, {args.clients} devices at once (buffered), "
          f"{args.steps} local steps; {clock}\n")
    waiting = "sync devices' mean idle share" if args.emulate else "sync devices' waiting, s"
    print("| seed | target loss | sync: time to target / to the end, s | buffered: time to target / to the end, s | "
          f"sync / buffered (to target) | final loss sync / buffered | {waiting} | buffered staleness "
          "(mean / max) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['sync_time'] / r['buffered_time']:.2f}x" if r["sync_time"] and r["buffered_time"] else "-")
        print(f"| {r['seed']} | {r['target']:.4f} | {r['sync_time']:.1f} / {r['sync_clock']:.1f} | "
              f"{r['buffered_time']:.1f} / {r['buffered_clock']:.1f} | {ratio} | {r['sync_final']:.4f} / "
              f"{r['buffered_final']:.4f} | {r['sync_waiting']:.{2 if args.emulate else 1}f} | {statistics.mean(r['staleness']):.2f} / "
              f"{max(r['staleness'])} |")
    d = [r["buffered_final"] - r["sync_final"] for r in rows]
    m, lo, hi = mean_interval(d)
    verdict = "within noise" if lo is not None and lo <= 0 <= hi else "apart"
    print(f"\nfinal loss, buffered - sync, paired by seed: {m:+.4f}"
          + (f" [{lo:+.4f}, {hi:+.4f}] {verdict}" if lo is not None else ""))
    if args.emulate:
        print("\nidle share per device (the run's wall time it held no plan), sync / buffered, per seed:")
        for r in rows:
            print(f"- seed {r['seed']}: " + ", ".join(f"{d} {r['idle']['sync'][d]:.2f} / {r['idle']['buffered'].get(d, 1.0):.2f}"
                                                      for d in r["idle"]["sync"]))
    ratios = [r["sync_time"] / r["buffered_time"] for r in rows if r["sync_time"] and r["buffered_time"]]
    if ratios:
        rm, rlo, rhi = mean_interval(ratios)
        print(f"time to the target, sync / buffered: {rm:.2f}x" + (f" [{rlo:.2f}, {rhi:.2f}]" if rlo is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
