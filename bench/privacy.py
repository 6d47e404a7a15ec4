"""What device-level DP costs: held-out loss and exact match at epsilon = inf, 8, 4, 2 on one
simulated fleet, several seeds, with intervals, beside the epsilon per round and the same rounds
counted without amplification (Flower's only mode).

    python bench/privacy.py --out runs/privacy [--devices 200] [--rate 0.25] [--rounds 5]
        [--epsilons inf,8,4,2] [--seeds 0,1,2] [--model smollm2-135m] [--clip 0.1] [--adaptive]

The fleet: ``--devices`` identical devices (``jetson-agx-orin``, every one trains rank 8), each
taking part with probability ``--rate`` (Poisson sampling, also at epsilon = inf so that only the
noise and the clip differ), the built-in tasks dealt by domain (the default partition), 1 local step of batch 4 per device
and round (what a 2-core CPU runs: about 50 updates a round).  For each target epsilon the noise
multiplier ``z`` that spends it in ``--rounds`` rounds at ``delta = 1 / devices`` is found by
bisection on the run's own accountant.  Every (epsilon, seed) is a ``fedlora simulate`` under
``OUT/eps-<e>/seed-<s>/``; a finished run is reused.

Prints, per epsilon: z, the epsilon reached (the run's report), the same rounds without
amplification, the final held-out loss and exact match (mean and 95 % t-interval over seeds), and
the loss difference to epsilon = inf paired by seed with its interval ("within noise" where it
holds 0).  Run on a quiet machine; with a GPU add ``--set device=cuda`` and more devices.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from fedlora_edge.coordinator.privacy import epsilon_for, no_amplification_epsilon  # noqa: E402
from fedlora_edge.coordinator.stats import mean_interval  # noqa: E402


def noise_for(epsilon: float, rate: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds spend at most ``epsilon`` (bisection)."""
    lo, hi = 0.3, 50.0
    if epsilon_for(hi, rate, rounds, delta) > epsilon:
        raise SystemExit(f"epsilon {epsilon} is out of reach at rate {rate}, {rounds} rounds")
    for _ in range(40):
        mid = (lo + hi) / 2
        if epsilon_for(mid, rate, rounds, delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def fedit_fleet(out: Path, model: str, devices: int, rounds: int = 2, steps: int = 6) -> dict:
    """Overrides of a FedIT run on ``devices`` identical devices (``jetson-agx-orin``, every one each
    round, rank 8), its fleet file written under ``out``: the setting of bench/secagg.py's and
    bench/compression.py's loss comparisons."""
    fleet = out / "fleet.yaml"
    fleet.parent.mkdir(parents=True, exist_ok=True)
    fleet.write_text("devices:\n" + "".join(f"  - {{id: d{i:03d}, profile: jetson-agx-orin}}\n" for i in range(devices)))
    return {"model": model, "method": "fedit", "fleet": str(fleet), "rounds": rounds, "clients_per_round": devices,
            "train.steps": steps, "data.eval_per_domain": 6, "data.samples_per_client": 32, "lora.rank": 8,
            "lora.max_rank": 8}


def run(folder: Path, overrides: dict) -> dict:
    report_file = folder / "report.json"
    if report_file.is_file():
        old = json.loads(report_file.read_text())
        if all(_get(old["config"], k) == v for k, v in overrides.items() if k not in ("fleet",)):
            return old
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.simulate import Simulation

    folder.mkdir(parents=True, exist_ok=True)
    return Simulation(load_config(overrides=overrides), folder).run()


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--rate", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epsilons", default="inf,8,4,2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--clip", type=float, default=0.1)
    ap.add_argument("--adaptive", action="store_true", help="adaptive clipping (from --clip)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config field")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fleet = out / "fleet.yaml"
    fleet.write_text("devices:\n" + "".join(f"  - {{id: d{i:04d}, profile: jetson-agx-orin}}\n"
                                            for i in range(args.devices)))
    delta = 1.0 / args.devices
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = [float(e) for e in args.epsilons.split(",")]
    base = {"model": args.model, "method": "fedit", "fleet": str(fleet), "rounds": args.rounds,
            "clients_per_round": max(1, round(args.rate * args.devices)), "train.steps": 1, "train.batch_size": 4,
            "train.max_seq_len": 48, "lora.rank": 8, "lora.max_rank": 8, "data.samples_per_client": 8,
            "data.eval_per_domain": 8, "eval_every": args.rounds,
            "privacy.dp.clip_norm": args.clip, "privacy.dp.adaptive_clipping": args.adaptive}
    for kv in args.set:
        k, v = kv.split("=", 1)
        base[k] = json.loads(v) if v[:1] in "[{0123456789-tf" and v not in ("true", "false") else v
    rows = {}
    for eps in targets:
        z = 0.0 if math.isinf(eps) else noise_for(eps, args.rate, args.rounds, delta)
        # epsilon = inf: the same Poisson sampling and clip, and noise of 1e-3 of the clip (negligible;
        # z > 0 keeps the run on its DP path)
        over = {**base, "privacy.dp.noise_multiplier": z if z > 0 else 1e-3}
        reports = {}
        for s in seeds:
            print(f"epsilon {eps:g} (z {z:.3f}), seed {s} ...", file=sys.stderr, flush=True)
            reports[s] = run(out / f"eps-{eps:g}" / f"seed-{s}", {**over, "seed": s})
        rows[eps] = (z, reports)
    ref = rows[math.inf][1] if math.inf in rows else None
    print(f"fleet: {args.devices} devices, each sampled with probability {args.rate} (about "
          f"{args.rate * args.devices:.0f} a round), {args.rounds} rounds, delta {delta:.2g}, clip {args.clip}"
          f"{' (adaptive)' if args.adaptive else ''}, model {args.model}, seeds {args.seeds}\n")
    print("| target epsilon | z | epsilon after each round | without amplification | held-out loss | exact match % | "
          "loss - (epsilon inf), paired by seed |")
    print("|---|---|---|---|---|---|---|")
    for eps, (z, reports) in rows.items():
        loss = [r["final_accuracy"]["loss"]["overall"] for r in reports.values()]
        em = [100 * r["final_accuracy"]["overall"] for r in reports.values()]
        per_round = [max(r["rounds"][i]["privacy"]["epsilon"] for r in reports.values())
                     for i in range(min(len(r["rounds"]) for r in reports.values()))]
        lm, llo, lhi = mean_interval(loss)
        em_m, em_lo, em_hi = mean_interval(em)
        diff = "-"
        if ref is not None and not math.isinf(eps):
            d = [reports[s]["final_accuracy"]["loss"]["overall"] - ref[s]["final_accuracy"]["loss"]["overall"]
                 for s in seeds]
            dm, dlo, dhi = mean_interval(d)
            verdict = "within noise" if dlo is not None and dlo <= 0 <= dhi else "worse" if dm > 0 else "better"
            diff = f"{dm:+.3f} [{dlo:+.3f}, {dhi:+.3f}] {verdict}" if dlo is not None else f"{dm:+.3f}"
        noamp = "-" if math.isinf(eps) else f"{no_amplification_epsilon(z, args.rounds, delta):.1f}"
        shown = "inf" if math.isinf(eps) else ", ".join(f"{e:.2f}" for e in per_round)
        iv = f" [{llo:.3f}, {lhi:.3f}]" if llo is not None else ""
        ev = f" [{em_lo:.1f}, {em_hi:.1f}]" if em_lo is not None else ""
        print(f"| {eps:g} | {z:.3f} | {shown} | {noamp} | {lm:.3f}{iv} | {em_m:.1f}{ev} | {diff} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
