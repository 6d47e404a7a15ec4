"""Print a markdown table from the report.json files of several runs.

    python bench/results_table.py runs/fedit runs/hetlora ...

The same table as ``fedlora compare`` (``fedlora_edge.coordinator.compare.markdown``), for runs made
separately: method, final exact-match accuracy (overall and per domain, what the method evaluates:
the global adapter, or each client's own for `local`), the base model's overall accuracy, MB up
and down per round (summed over the round's clients, averaged over rounds), wall time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedlora_edge.coordinator.compare import markdown, summary


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    rows = [summary(Path(p).name, json.loads((Path(p) / "report.json").read_text())) for p in paths]
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
