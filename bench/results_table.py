"""Print a markdown table from the report.json files of several runs.

    python bench/results_table.py runs/fedit runs/hetlora ...

Columns: method, final exact-match accuracy (overall and per domain, what the method evaluates:
the global adapter, or each client's own for `local`), the base model's overall accuracy, MB up
and down per round (summed over the round's clients, averaged over rounds), wall time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    reports = [(Path(p), json.loads((Path(p) / "report.json").read_text())) for p in paths]
    domains = list(reports[0][1]["final_accuracy"]["per_domain"])
    head = ["run", "method", "ranks", "accuracy %"] + [f"{d} %" for d in domains] + [
        "own-mix %", "MB up/round", "MB down/round", "wall s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base = reports[0][1]["base_accuracy"]
    print("| base model | - | - | " + f"{100 * base['overall']:.1f} | "
          + " | ".join(f"{100 * base['per_domain'][d]:.1f}" for d in domains) + " | - | - | - | - |")
    for path, r in reports:
        fa = r["final_accuracy"]
        n = len(r["rounds"])
        up = r["totals"]["uplink_bytes"] / n / 1e6
        down = r["totals"]["downlink_bytes"] / n / 1e6
        ranks = sorted({c["rank"] for x in r["rounds"] for c in x["clients"]})
        cells = [path.name, r["method"], ",".join(map(str, ranks)), f"{100 * fa['overall']:.1f}"]
        cells += [f"{100 * fa['per_domain'][d]:.1f}" for d in domains]
        cells += [f"{100 * fa['own_mix']:.1f}", f"{up:.2f}", f"{down:.2f}", f"{r['wall_seconds']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
