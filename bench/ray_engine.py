"""`simulate` on the local engine against `--engine ray`: wall time and memory at N clients.

    python bench/ray_engine.py [--model smollm2-135m] [--clients 8,32,100] [--steps 2]

One round of N clients (all of them) on a fleet of N devices cycling through the default fleet's
eight (six device classes), HetLoRA, SmolLM2 by default. Each configuration runs in a fresh
process (peak RSS is per process), one after another on this machine:

- local, 1 torch thread, and local at every core's threads (the default);
- `--engine ray` with 1 and with 2 training workers of 1 CPU each (a local Ray cluster of this
  machine's CPUs; its start is timed apart and left out of the run's wall time);
- at the smallest N, 2 workers that each copy the whole base out of the object store instead of
  mapping it (what sharing saves).

Memory per worker, from its USS (the pages it alone holds; the base it maps from the object
store is not among them): once its model is built, before any training, against a bare worker
that imported the same libraries and built nothing (what holding the model costs each worker
beyond the first, against the base's size: goal at most 0.3x), and what training then added
(the high-water mark of a step's activations and gradients, which the heap keeps: what any
process training this model needs, the local engine's included). The overhead per client-round is (Ray with 1 worker - local at 1
thread) / N. Also checks that every configuration gives the same adapter, bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLASSES = ["jetson-agx-orin", "jetson-orin-nano", "jetson-nano", "raspberry-pi-5", "raspberry-pi-4",
           "raspberry-pi-4-lte", "phone", "phone"]


def bare_worker_uss() -> int:
    """USS of a Ray worker that imported what a training worker imports and built nothing."""
    import ray

    @ray.remote(num_cpus=1)
    class Bare:
        def memory(self) -> int:
            import psutil
            import torch  # noqa: F401
            import transformers  # noqa: F401
            from peft import get_peft_model  # noqa: F401

            from fedlora_edge.edge_client.work import run_assignment  # noqa: F401

            return psutil.Process().memory_full_info().uss

    b = Bare.remote()
    uss = ray.get(b.memory.remote())
    ray.kill(b)
    return uss


def child(model: str, n: int, steps: int, mode: str, folder: Path) -> dict:
    import torch

    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.simulate import Simulation
    from fedlora_edge.core.quiet import quiet_third_party

    quiet_third_party()
    fleet = folder / "fleet.yaml"
    fleet.write_text("devices:\n" + "".join(f"  - {{id: d{i:03d}, profile: {CLASSES[i % len(CLASSES)]}}}\n"
                                            for i in range(n)))
    cfg = load_config(overrides={"model": model, "method": "hetlora", "fleet": str(fleet), "rounds": 1,
                                 "clients_per_round": n, "train.steps": steps, "data.samples_per_client": 8,
                                 "data.eval_per_domain": 2, "max_new_tokens": 4})
    out: dict = {"mode": mode, "n": n}
    if mode == "local1":
        torch.set_num_threads(1)
    memory: list[dict] = []

    class Measured(Simulation):
        def close(self) -> None:
            if self.pool is not None:
                memory.extend(self.pool.memory())
            super().close()

    sim = Measured(cfg, folder / "out")
    if mode.startswith("ray"):
        from fedlora_edge.coordinator.ray_engine import RayPool, connect

        t = time.perf_counter()
        connect()
        out["ray_start_s"] = time.perf_counter() - t
        out["bare_worker_uss"] = bare_worker_uss()
        t = time.perf_counter()
        sim.pool = RayPool(sim.engine, int(mode[3]), 1, private_base=mode.endswith("private"))
        out["base_put_s"] = time.perf_counter() - t  # the base put once
        out["base_bytes"] = sim.pool.base.nbytes
        out["workers_built"] = sim.pool.memory()  # each worker's memory once its model is built, before training
        out["build_s"] = time.perf_counter() - t
    t = time.perf_counter()
    report = sim.run()
    out["wall_s"] = time.perf_counter() - t + out.get("build_s", 0.0)  # the workers' start and build included
    out["train_s"] = sum(c["local_seconds"] or 0 for r in report["rounds"] for c in r["clients"])
    out["driver_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["workers"] = memory
    out["updates"] = report["rounds"][0]["valid_updates"]
    files = sorted((folder / "out" / "adapter").glob("*.safetensors"))
    out["adapter"] = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:16]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", default="8,32,100", help="N values (default: 8,32,100)")
    ap.add_argument("--steps", type=int, default=2, help="local steps per client-round (default: 2)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    ap.add_argument("--child", nargs=2, metavar=("N", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(args.model, int(args.child[0]), args.steps, args.child[1], Path(tmp))))
        return 0
    ns = [int(x) for x in args.clients.split(",")]
    print(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for n in ns:
        modes = ["local1", "local", "ray1", "ray2"] + (["ray2private"] if n == ns[0] else [])
        for mode in modes:
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--steps", str(args.steps),
                                   "--child", str(n), mode], capture_output=True, text=True)
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"N={n} {mode} failed")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"done: N={n} {mode} in {time.perf_counter() - t:.0f} s (load {os.getloadavg()[0]:.2f})",
                  file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    mb = 2**20
    base = next(r["base_bytes"] for r in rows if "base_bytes" in r)
    print(f"model {args.model}: base {base / mb:.0f} MB in the object store; {args.steps} local steps per client-round")
    print("| N | engine | wall s | s per client-round | driver peak RSS MB | worker USS MB after the round "
          "| worker's model, MB beyond a bare worker (x base) | worker's training memory MB | same adapter |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        at = {r["mode"]: r for r in rows if r["n"] == n}
        ref = at["local1"]["adapter"]
        for mode, r in at.items():
            name = {"local1": "local, 1 thread", "local": f"local, {os.cpu_count()} threads",
                    "ray1": "ray, 1 worker", "ray2": "ray, 2 workers",
                    "ray2private": "ray, 2 workers, base copied"}[mode]
            if r["workers"]:
                held = [(w["uss"] - r["bare_worker_uss"]) / mb for w in r["workers_built"]]
                work = [(a["uss"] - b["uss"]) / mb for a, b in zip(r["workers"], r["workers_built"])]
                uss = " / ".join(f"{w['uss'] / mb:.0f}" for w in r["workers"])
                model = " / ".join(f"{h:.0f} ({h * mb / base:.2f}x)" for h in held)
                train = " / ".join(f"{x:.0f}" for x in work)
            else:
                uss, model, train = "-", "-", "-"
            print(f"| {n} | {name} | {r['wall_s']:.1f} | {r['wall_s'] / n:.2f} | {r['driver_peak_rss'] / mb:.0f} | "
                  f"{uss} | {model} | {train} | {'yes' if r['adapter'] == ref else 'NO'} |")
        over = (at["ray1"]["wall_s"] - at["local1"]["wall_s"]) / n
        speed = at["local"]["wall_s"] / at["ray2"]["wall_s"]
        print(f"N={n}: overhead per client-round, ray 1 worker - local 1 thread: {over * 1000:+.0f} ms; "
              f"local ({os.cpu_count()} threads) / ray (2 workers) wall: {speed:.2f}x; ray start "
              f"{at['ray1']['ray_start_s']:.1f} s (not in the wall), workers built {at['ray1']['build_s']:.1f} s "
              "(in the wall)")
    if len(ns) > 1:
        lo, hi = ({r["mode"]: r for r in rows if r["n"] == n} for n in (ns[0], ns[-1]))
        slope = {m: (hi[m]["wall_s"] - lo[m]["wall_s"]) / (ns[-1] - ns[0]) for m in ("local1", "local", "ray1", "ray2")}
        fixed = lo["ray1"]["wall_s"] - slope["ray1"] * ns[0] - (lo["local1"]["wall_s"] - slope["local1"] * ns[0])
        print(f"from N={ns[0]} to N={ns[-1]}, seconds per added client-round: local 1 thread {slope['local1']:.3f}, "
              f"local {os.cpu_count()} threads {slope['local']:.3f}, ray 1 worker {slope['ray1']:.3f}, ray 2 workers "
              f"{slope['ray2']:.3f}; Ray's overhead per client-round (1 worker - local 1 thread) "
              f"{(slope['ray1'] - slope['local1']) * 1000:+.0f} ms, its fixed cost per run (workers starting, "
              f"building their models) {fixed:+.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
