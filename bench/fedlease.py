"""FedLEASE under task heterogeneity: fedlease vs fedit vs local on a by-domain fleet.

    python bench/fedlease.py --out runs/fedlease [--methods fedlease,fedit,local] [--set key=value ...]

One ``fedlease compare`` (same fleet, seed, data, rounds and steps for every method; default:
SmolLM2, fleet mixed10 with all 10 devices every round, by-domain data, 3 rounds of 8 local
steps of which 1 is FedLEASE's warm-up, up to 6 experts, 10 held-out prompts per domain, and a
60 s transfer budget so that the phones can download 6 experts and take part as in the others).  Finished runs in ``OUT`` are reused.  Prints one markdown
table: accuracy overall and per domain (each client's own model for fedlease and local, the
global adapter for fedit), accuracy on each client's own domain mix (own-mix), the number of
experts M the silhouette chose, the adjusted Rand index
of the clusters against the clients' main domains, and MB per round up and down (for fedlease,
also over its expert rounds alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedlora_edge.coordinator.compare import compare
from fedlora_edge.coordinator.config import load_config, parse_override
from fedlora_edge.coordinator.methods.fedlease import adjusted_rand_index

DEFAULTS = {"fleet": "mixed10", "clients_per_round": 10, "rounds": 3, "train.steps": 8, "eval_every": 3,
            "data.eval_per_domain": 10, "data.partition": "by_domain", "fedlease.warmup_rounds": 1,
            "fedlease.max_experts": 6, "planner.transfer_budget_s": 60}


def main_domain(mix: dict) -> str:
    return max(mix, key=mix.get)


def clustering(report: dict) -> tuple[int | None, float | None]:
    """(M, ARI of the clusters against the main domains) of a fedlease run."""
    s = report.get("method_summary") or {}
    clusters = s.get("clusters") or {}
    if not clusters:
        return None, None
    mixes = {c["client"]: c["domain_mix"] for c in report["fleet"]}
    ids = sorted(clusters)
    return s["experts"], adjusted_rand_index([clusters[i] for i in ids], [main_domain(mixes[i]) for i in ids])


def expert_rounds_mb(report: dict) -> tuple[float, float] | None:
    warm = report["config"]["fedlease"]["warmup_rounds"]
    rounds = [x for x in report["rounds"] if x["round"] > warm]
    if not rounds:
        return None
    up = sum(c["uplink_bytes"] for x in rounds for c in x["clients"]) / len(rounds) / 1e6
    down = sum(c["downlink_bytes"] for x in rounds for c in x["clients"]) / len(rounds) / 1e6
    return up, down


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="fedlease,fedit,local")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(overrides={**DEFAULTS, **dict(parse_override(s) for s in args.set)})
    rows = compare(cfg, [m for m in args.methods.split(",") if m], args.out)
    domains = list(rows[0]["per_domain"])
    print("| method | evaluated | accuracy % | " + " | ".join(f"{d} %" for d in domains)
          + " | own-mix % | experts M | ARI vs main domain | MB up/round | MB down/round |")
    print("|---|---|---|" + "---|" * len(domains) + "---|---|---|---|---|")
    for r in rows:
        report = json.loads((Path(args.out) / r["run"] / "report.json").read_text())
        m, ari = clustering(report)
        up, down = f"{r['mb_up_per_round']:.2f}", f"{r['mb_down_per_round']:.2f}"
        if r["method"] == "fedlease" and expert_rounds_mb(report):
            eu, ed = expert_rounds_mb(report)
            up, down = f"{up} ({eu:.2f} in expert rounds)", f"{down} ({ed:.2f} in expert rounds)"
        print(f"| {r['run']} | {r['evaluated']} | {100 * r['accuracy']:.1f} | "
              + " | ".join(f"{100 * r['per_domain'][d]:.1f}" for d in domains)
              + f" | {100 * r['own_mix']:.1f} | {'-' if m is None else m} | {'-' if ari is None else f'{ari:.2f}'} | {up} | {down} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
