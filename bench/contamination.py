"""Robust aggregation under contamination: clair vs fedit vs local, every attack, several fractions.

    python bench/contamination.py --out runs/contamination [--fractions 0,0.2,0.3]
        [--attacks random_labels,random_update,sign_flip,scaled] [--methods clair,fedit,local]
        [--set key=value ...]

Each (fraction, attack) cell is one ``fedlora compare`` over the methods on the same fleet, seed,
data and rounds (default: SmolLM2, fleet mixed10, all 10 devices every round, 3 rounds), in
``OUT/<fraction>-<attack>/``; finished runs are reused, so an interrupted grid continues.  Fraction
0 is run once.  Prints one markdown table: per cell and method, the benign clients' accuracy
(their own adapter for personalised methods, the global one otherwise), and for clair the
detection precision and recall over every (round, client) it judged.

``local`` is run under ``random_labels`` only: a local client's training depends on its own data and
seed alone, so under an update attack the benign clients' local adapters are exactly those of the
fraction-0 run, and their accuracy is read from it (marked "from 0%").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from coordinator.compare import compare
from coordinator.config import load_config, parse_override
from coordinator.contamination import contaminated_clients

DEFAULTS = {"fleet": "mixed10", "clients_per_round": 10, "rounds": 3}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fractions", default="0,0.2,0.3")
    ap.add_argument("--attacks", default="random_labels,random_update,sign_flip,scaled")
    ap.add_argument("--methods", default="clair,fedit,local")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    base = load_config(overrides={**DEFAULTS, **dict(parse_override(s) for s in args.set)})
    methods = [m for m in args.methods.split(",") if m]
    cells, clean_local = [], None
    fractions = [float(f) for f in args.fractions.split(",")]
    for frac in sorted(fractions):
        for attack in (["none"] if frac == 0 else args.attacks.split(",")):
            cfg = dataclasses.replace(base, contamination=dataclasses.replace(
                base.contamination, fraction=frac, attack=attack))
            derive = clean_local is not None and attack != "random_labels"
            run = [m for m in methods if not (derive and m == "local")]
            rows = compare(cfg, run, Path(args.out) / f"{frac:g}-{attack}")
            if frac == 0 and "local" in methods:
                clean_local = json.loads((Path(args.out) / "0-none" / "local" / "report.json").read_text())
            if derive and "local" in methods:
                rows.insert(methods.index("local"), local_from_clean(clean_local, cfg))
            cells.append((frac, attack, rows))
    print("| contaminated | attack | method | benign accuracy % | own-mix % | detection precision | recall | "
          "benign flagged (client-rounds) |")
    print("|---|---|---|---|---|---|---|---|")
    for frac, attack, rows in cells:
        for r in rows:
            co = r["contamination"] or {}
            det = co.get("detection") or {}
            n = len(co.get("clients", []))

            def f(x, pct=False):
                return "-" if x is None else (f"{100 * x:.1f}" if pct else f"{x:.2f}")

            print(f"| {frac:.0%} ({n}) | {attack} | {r['run']} | {f(co.get('benign_accuracy'), True)} | "
                  f"{f(co.get('benign_own_mix'), True)} | {f(det.get('precision'))} | {f(det.get('recall'))} | "
                  f"{det.get('false_positives', '-')} |")
    return 0


def local_from_clean(report: dict, cfg) -> dict:
    """The local row of an update-attack cell, from the fraction-0 local run's per-client results."""
    eligible = [c["client"] for c in report["fleet"] if c["eligible"]]
    bad = contaminated_clients(cfg, eligible)
    per = report["personalised"]["clients"]
    benign = [cid for cid in per if cid not in bad]
    return {"run": "local (from 0%)", "contamination": {
        "clients": sorted(bad), "benign_accuracy": sum(per[c]["overall"] for c in benign) / len(benign),
        "benign_own_mix": sum(per[c]["own_mix"] for c in benign) / len(benign)}}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
