"""What secure aggregation costs: bytes and time per round against plain rounds, at N devices with
dropouts, and the held-out loss of a secure run against the plain one.

    python bench/secagg.py --out runs/secagg [--devices 10,100,1000] [--dropouts 0,0.1,0.3]
        [--model smollm2-135m] [--rank 8] [--loss] [--seeds 0,1,2] [--loss-devices 6]

1. **Protocol** (every N x dropout): SecAgg+ for N devices in one process
   (:func:`fedlora_edge.core.secagg.run_round`: real X25519 keys, Shamir shares encrypted to each
   neighbour, ChaCha20 masks, the unmasking), each device's vector the size of the global adapter
   of ``--model`` at ``--rank`` (q and v, every layer: FedIT's update at that rank), with the given
   fraction of devices dropping out: half of them after sharing their keys (before their masked
   vector), half after it (before the unmasking); the neighbourhoods are sized for that fraction
   (``privacy.secure_aggregation.dropout``, at least 0.1).  Reported per device (the mean over devices):
   bytes up and down through the coordinator beside a plain update's bytes (float32 safetensors of
   the same factors), and its protocol work; the coordinator's work for the whole round.  A
   device's work is what it adds to a round (keys, shares, masks, unmasking answers); in a
   deployment the devices work in parallel, so a round's added time is about one device's work
   plus the coordinator's.
2. **Shamir** (``--shamir 20,30,99,134``): what pycryptodome's Shamir (GF(2^128), pure Python) takes
   to split one 16-byte secret into ``k + 1`` shares of threshold ``k // 2 + 1`` and to combine
   them, at each degree ``k`` (a device splits four per round, two secrets of two halves; the
   coordinator combines two per secret it rebuilds): the cost that grows fastest with the degree.
3. **Loss** (``--loss``): ``fedlora simulate`` with FedIT on ``--loss-devices`` devices (every one
   a round, 2 rounds, the built-in tasks), plain and with ``privacy.secure_aggregation``, on each
   seed; the held-out loss of each and their difference paired by seed with its 95 % interval
   ("within noise" where it holds 0).  Finished runs in OUT are reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402

from fedlora_edge.coordinator.stats import mean_interval  # noqa: E402
from fedlora_edge.core.secagg import Params, encode, run_round, vector_length  # noqa: E402


def _privacy_bench():
    """bench/privacy.py's run() (a finished run reused), loaded from beside this file."""
    spec = importlib.util.spec_from_file_location("privacy_bench", Path(__file__).with_name("privacy.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def adapter_dims(model: str) -> dict[str, tuple[int, int]]:
    from fedlora_edge.core.lora import adapted_modules
    from fedlora_edge.core.models import load_model

    m, _ = load_model(model)
    return adapted_modules(m, ["q_proj", "v_proj"])


def protocol(n: int, dropout: float, dims: dict, rank: int, seed: int = 0) -> dict:
    length = vector_length(dims, rank, False)
    params = Params.for_round(n, dropout=max(dropout, 0.1))  # neighbourhoods sized to survive what drops
    rng = np.random.default_rng(seed)
    ids = [f"d{i:04d}" for i in range(n)]
    gone = [ids[i] for i in rng.permutation(n)[: round(dropout * n)]]
    before, after = gone[: len(gone) // 2], gone[len(gone) // 2:]
    vec = encode(rng.normal(0, 0.01, length), params)  # one vector for all: its encoding costs every device alike
    words, survivors, stats = run_round({u: vec for u in ids}, f"bench|{n}|{dropout}".encode(), params, before, after)
    b = stats["bytes"]
    plain_update = 4 * sum(rank * (i + o) for i, o in dims.values())  # float32 A [r, in] and B [out, r]
    return {"n": n, "dropout": dropout, "degree": params.degree, "threshold": params.threshold,
            "survivors": len(survivors), "length": length,
            "up_per_device": (b["keys"] + b["shares"] + b["masked"] + b["unmasking"]) / n,
            "down_per_device": (b["roster"] + b["relay"] + b["request"]) / n,
            "plain_up": plain_update, "device_seconds": stats["seconds"]["devices"] / n,
            "coordinator_seconds": stats["seconds"]["coordinator"]}


def shamir_cost(degrees: list[int], reps: int = 5) -> list[dict]:
    import time

    from Crypto.Protocol.SecretSharing import Shamir

    rows = []
    for k in degrees:
        t = k // 2 + 1
        split, combine = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            shares = Shamir.split(t, k + 1, b"0123456789abcdef")
            split.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            Shamir.combine(shares[1:t + 1])
            combine.append(time.perf_counter() - t0)
        rows.append({"degree": k, "threshold": t, "split_ms": 1e3 * statistics.median(split),
                     "combine_ms": 1e3 * statistics.median(combine)})
    return rows


def loss_runs(out: Path, model: str, devices: int, seeds: list[int]) -> list[dict]:
    bench = _privacy_bench()
    base = bench.fedit_fleet(out, model, devices)
    rows = []
    for s in seeds:
        for arm, extra in (("plain", {}), ("secure", {"privacy.secure_aggregation.enabled": True})):
            print(f"loss: {arm}, seed {s} ...", file=sys.stderr, flush=True)
            rep = bench.run(out / arm / f"seed-{s}", {**base, **extra, "seed": s})
            rows.append({"arm": arm, "seed": s, "loss": rep["final_accuracy"]["loss"]["overall"],
                         "exact_match": rep["final_accuracy"]["overall"]})
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", default="10,100,1000")
    ap.add_argument("--dropouts", default="0,0.1,0.3")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--shamir", default="", help="degrees at which to time pycryptodome's Shamir split and combine")
    ap.add_argument("--loss", action="store_true", help="also compare a secure FedIT run's held-out loss with the plain one")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--loss-devices", type=int, default=6)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.shamir:
        cost = shamir_cost([int(k) for k in args.shamir.split(",")])
        (out / "shamir.json").write_text(json.dumps(cost, indent=1))
        print("| neighbours | threshold | split one 16-byte secret, ms | combine it, ms | a device's splits per round, s |")
        print("|---|---|---|---|---|")
        for r in cost:
            print(f"| {r['degree']} | {r['threshold']} | {r['split_ms']:.1f} | {r['combine_ms']:.1f} | "
                  f"{4 * r['split_ms'] / 1e3:.2f} |")
        print()
    if not args.devices:
        return 0
    dims = adapter_dims(args.model)
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        for d in (float(x) for x in args.dropouts.split(",")):
            print(f"protocol: {n} devices, {d:.0%} dropping out ...", file=sys.stderr, flush=True)
            rows.append(protocol(n, d, dims, args.rank))
    (out / "protocol.json").write_text(json.dumps(rows, indent=1))
    print(f"model {args.model}, FedIT at rank {args.rank} (q, v): {rows[0]['length']:,} values per device, "
          f"{rows[0]['plain_up'] / 1e6:.2f} MB as a plain float32 update\n")
    print("| devices | dropping out | neighbours / threshold | survivors | MB up per device (plain) | "
          "kB down per device | a device's work, s | the coordinator's work, s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['dropout']:.0%} | {r['degree']} / {r['threshold']} | {r['survivors']} | "
              f"{r['up_per_device'] / 1e6:.2f} ({r['plain_up'] / 1e6:.2f}) | {r['down_per_device'] / 1e3:.1f} | "
              f"{r['device_seconds']:.2f} | {r['coordinator_seconds']:.1f} |")
    if args.loss:
        seeds = [int(s) for s in args.seeds.split(",")]
        got = loss_runs(out / "loss", args.model, args.loss_devices, seeds)
        (out / "loss.json").write_text(json.dumps(got, indent=1))
        by = {(r["arm"], r["seed"]): r for r in got}
        print(f"\nFedIT, {args.loss_devices} devices every round, 2 rounds, seeds {args.seeds}:\n")
        print("| arm | held-out loss (mean [95 % interval]) | exact match % |")
        print("|---|---|---|")
        for arm in ("plain", "secure"):
            m, lo, hi = mean_interval([by[(arm, s)]["loss"] for s in seeds])
            em = statistics.mean(100 * by[(arm, s)]["exact_match"] for s in seeds)
            iv = f" [{lo:.4f}, {hi:.4f}]" if lo is not None else ""
            print(f"| {arm} | {m:.4f}{iv} | {em:.1f} |")
        d = [by[("secure", s)]["loss"] - by[("plain", s)]["loss"] for s in seeds]
        dm, dlo, dhi = mean_interval(d)
        verdict = "within noise" if dlo is not None and dlo <= 0 <= dhi else "apart"
        print(f"\nsecure - plain, paired by seed: {dm:+.5f}"
              + (f" [{dlo:+.5f}, {dhi:+.5f}] {verdict}" if dlo is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
