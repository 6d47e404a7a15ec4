"""Held-out loss of the training options against the float32 base: `fedlora simulate` per setting and seed.

    python bench/training_options.py [--model smollm2-135m] [--preset quick] [--seeds 3]
        [--settings fp32,bf16,nf4,int8] [--threads 1] [--out runs/training_options] [--method hetlora]

Each setting (``+``-joined from ``fp32 | bf16 | fp16``, ``nf4 | int8``, ``gc``, ``packing``: the
``train.dtype``, ``train.base_quant``, ``train.gradient_checkpointing`` and ``train.packing`` it
sets) runs ``fedlora simulate --preset P --seed S`` in a process of its own (``OMP_NUM_THREADS``
= ``--threads``), into ``OUT/<setting>-s<seed>``; a run whose ``report.json`` is there with the
same settings is reused.  Then, in this process, every run's final global adapter is loaded onto
the float32 base (stock peft) and scored on the run's held-out prompts, so that all settings are
also compared on one base.  Printed per setting and seed: the held-out loss of the base as the run
held it, of the trained adapter on the run's own base (what the run reports) and on the float32
base, their differences from the ``fp32`` run of the same seed, the run's wall time and its
process's peak RSS; then the mean and the range of the differences over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

KNOWN = {"fp32", "bf16", "fp16", "nf4", "int8", "gc", "packing"}


def settings_of(name: str) -> dict:
    """The ``--set`` values of a setting name (``bf16+nf4+gc``)."""
    opts = set(name.split("+"))
    bad = opts - KNOWN
    if bad:
        raise SystemExit(f"--settings: unknown {', '.join(sorted(bad))} in '{name}'; each of {', '.join(sorted(KNOWN))}")
    return {"train.dtype": next((d for d in ("bf16", "fp16") if d in opts), "fp32"),
            "train.base_quant": next((q for q in ("nf4", "int8") if q in opts), "none"),
            "train.gradient_checkpointing": "gc" in opts, "train.packing": "packing" in opts}


def run_one(args, name: str, seed: int) -> dict:
    """The run's report (run now, or reused), with its wall time and peak RSS."""
    out = Path(args.out) / f"{name}-s{seed}"
    sets = settings_of(name)
    report_path, stats_path = out / "report.json", out / "bench.json"
    if report_path.is_file() and stats_path.is_file():
        report = json.loads(report_path.read_text())
        cfg = report["config"]
        if (all(cfg["train"][k.split(".")[1]] == v for k, v in sets.items()) and cfg["seed"] == seed
                and cfg["model"] == args.model and cfg["method"] == args.method):
            return {**report, **json.loads(stats_path.read_text())}
    cmd = ["fedlora", "simulate", "--preset", args.preset, "--model", args.model, "--method", args.method,
           "--seed", str(seed), "--out", str(out)] + [f"--set={k}={str(v).lower()}" for k, v in sets.items()]
    print(f"running {' '.join(cmd)}", file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({status}): {proc.stderr.read()[-2000:]}")
    stats = {"bench_wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 2**30, 3)}
    stats_path.write_text(json.dumps(stats))
    return {**json.loads(report_path.read_text()), **stats}


def main() -> int:
    from fedlora_edge.core.quiet import quiet_third_party

    quiet_third_party()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--method", default="hetlora")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    ap.add_argument("--settings", default="fp32,bf16,nf4,int8",
                    help="comma-separated, each +-joined from fp32|bf16|fp16, nf4|int8, gc, packing; fp32 first "
                         "(the reference)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run and of the scoring (default: 1)")
    ap.add_argument("--out", default="runs/training_options")
    args = ap.parse_args()
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    for n in names:
        settings_of(n)
    if names[0] != "fp32":
        ap.error("--settings: fp32 comes first (every difference is against it)")

    reports = {(n, s): run_one(args, n, s) for n in names for s in range(args.seeds)}

    import torch
    from peft import PeftModel

    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.evaluate import loss_scores, response_nll
    from fedlora_edge.core.data import generate_task
    from fedlora_edge.core.models import load_model

    torch.set_num_threads(args.threads)
    base, tok = load_model(args.model)
    on_fp32 = {}
    for n, s in reports:
        cfg = load_config(preset=args.preset, overrides={"seed": s})
        held = [ex for t in cfg.data.tasks for ex in generate_task(t, cfg.data.eval_per_domain, seed=s, split="eval")]
        pm = PeftModel.from_pretrained(base, str(Path(args.out) / f"{n}-s{s}" / "adapter")).eval()
        on_fp32[(n, s)] = loss_scores(held, response_nll(pm, tok, held, cfg.train.max_seq_len, "cpu"))["loss"]["overall"]
        base = pm.unload()

    def loss(rep, which):
        return rep[which]["loss"]["overall"]

    print(f"{args.model}, `fedlora simulate --preset {args.preset} --method {args.method}`, seeds 0..{args.seeds - 1}, "
          f"{args.threads} thread(s); held-out loss (nats per response token)")
    print(f"{'setting':>20} {'seed':>4} {'base':>7} {'trained':>8} {'on fp32 base':>12} {'d trained':>9} "
          f"{'d on fp32':>9} {'wall s':>7} {'peak RSS GB':>11}")
    for n in names:
        for s in range(args.seeds):
            rep, ref = reports[(n, s)], reports[("fp32", s)]
            print(f"{n:>20} {s:>4} {loss(rep, 'base_accuracy'):>7.3f} {loss(rep, 'final_accuracy'):>8.3f} "
                  f"{on_fp32[(n, s)]:>12.3f} {loss(rep, 'final_accuracy') - loss(ref, 'final_accuracy'):>+9.3f} "
                  f"{on_fp32[(n, s)] - on_fp32[('fp32', s)]:>+9.3f} {rep['bench_wall_s']:>7.1f} "
                  f"{rep['peak_rss_gb']:>11.3f}")
    print("\nover the seeds (vs fp32 of the same seed): mean [min, max]")
    for n in names[1:]:
        dt = [loss(reports[(n, s)], "final_accuracy") - loss(reports[("fp32", s)], "final_accuracy")
              for s in range(args.seeds)]
        d32 = [on_fp32[(n, s)] - on_fp32[("fp32", s)] for s in range(args.seeds)]
        wall = [reports[(n, s)]["bench_wall_s"] / reports[("fp32", s)]["bench_wall_s"] for s in range(args.seeds)]
        print(f"{n:>20}: trained {sum(dt) / len(dt):+.4f} [{min(dt):+.4f}, {max(dt):+.4f}]; on the fp32 base "
              f"{sum(d32) / len(d32):+.4f} [{min(d32):+.4f}, {max(d32):+.4f}]; wall time x{sum(wall) / len(wall):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
