"""What the end-of-run plots cost for a large fleet: ``save_plots`` on a synthetic report.

    python bench/report_scale.py [--clients 3000] [--rounds 3] [--steps 10] [--classes 6]

A report as ``build_report`` writes one (every client in every round, ``--steps`` losses each,
devices of ``--classes`` profiles), plotted twice, each in a fresh child process so one variant's
memory does not colour the other's:

- ``per-device``: ``fedlora_edge.coordinator.plots.PLOT_CLIENTS`` raised above the fleet, so every client gets
  its line, legend entry and tick (what save_plots did for every fleet before it summarised);
- ``summarised``: the default, quantile bands of the training loss and bytes per device class.

Printed per variant: seconds in ``save_plots``; the child's peak RSS growth over ``save_plots``
(VmHWM after a reset through /proc/self/clear_refs, minus VmRSS before, so the report's own
memory is not counted); tracemalloc's peak over a second call (Python and numpy allocations only,
not matplotlib's C++ raster buffers); the PNG bytes.  Then the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def synthetic_report(n_clients: int, rounds: int, steps: int, classes: int, domains: int = 5) -> dict:
    """A report with the keys save_plots reads; deterministic (no RNG), losses falling per step."""
    names = [f"dev-{i:05d}" for i in range(n_clients)]
    doms = [f"task{d}" for d in range(domains)]

    def acc(k: float) -> dict:
        return {"overall": k, "per_domain": {d: k for d in doms},
                "loss": {"overall": 2.0 - k, "per_domain": {d: 2.0 - k for d in doms}}}

    recs = []
    for r in range(1, rounds + 1):
        rows = [{"client": n, "device": f"class-{i % classes}", "rank": 4 << (i % 4),
                 "uplink_bytes": 40_000 * (1 + i % 4), "downlink_bytes": 160_000,
                 "losses": [3.0 / (1 + 0.1 * (r * steps + s)) + 0.001 * (i % 97) for s in range(steps)]}
                for i, n in enumerate(names)]
        recs.append({"round": r, "status": "ok", "clients": rows, "skipped": [], "failed": [], "rejected": [],
                     "accuracy": acc(r / (rounds + 1))})
    return {"method": "hetlora", "model": "synthetic", "base_accuracy": acc(0.0), "rounds": recs,
            "fleet": [{"client": n, "profile": f"class-{i % classes}"} for i, n in enumerate(names)]}


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(variant: str, args) -> dict:
    from fedlora_edge.coordinator import plots

    if variant == "per-device":
        plots.PLOT_CLIENTS = 10 ** 9
    data = synthetic_report(args.clients, args.rounds, args.steps, args.classes)
    import matplotlib  # noqa: F401 - imported before the measurement, as a run has it by then

    with tempfile.TemporaryDirectory() as tmp:
        before = _vm("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        t0 = time.perf_counter()
        plots.save_plots(data, Path(tmp))
        seconds = time.perf_counter() - t0
        rss = _vm("VmHWM") - before
        png = sum(p.stat().st_size for p in Path(tmp).glob("*.png"))
        tracemalloc.start()
        plots.save_plots(data, Path(tmp))
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return {"variant": variant, "seconds": seconds, "rss_growth": rss, "traced_peak": traced, "png_bytes": png}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--variants", default="per-device,summarised")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    print(f"save_plots: {args.clients} clients x {args.rounds} rounds x {args.steps} steps, {args.classes} classes")
    rows = {}
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", v, "--clients", str(args.clients), "--rounds", str(args.rounds),
               "--steps", str(args.steps), "--classes", str(args.classes)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
        if done.returncode:
            sys.exit(f"{v}: the child failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        r = rows[v] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {v:>11}: {r['seconds']:7.2f} s, peak RSS +{r['rss_growth'] / 2**20:6.1f} MiB, "
              f"tracemalloc peak {r['traced_peak'] / 2**20:6.1f} MiB, PNGs {r['png_bytes'] / 1e3:.0f} kB")
    if {"per-device", "summarised"} <= set(rows):
        a, b = rows["per-device"], rows["summarised"]
        print(f"  per-device / summarised: time {a['seconds'] / b['seconds']:.1f}x, "
              f"peak RSS growth {a['rss_growth'] / max(1, b['rss_growth']):.1f}x, "
              f"tracemalloc peak {a['traced_peak'] / max(1, b['traced_peak']):.1f}x")


if __name__ == "__main__":
    main()
