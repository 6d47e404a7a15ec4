"""Free text of the user's own: does a federated run show what it learnt, per domain?

    python bench/freetext.py --out runs/freetext [--rounds 3] [--set key=value ...]

The data is real prose that no test was tuned on: the docstrings of the Python standard library
on this machine, in 8 domains (one per package: asyncio, email, importlib, logging,
multiprocessing, tkinter, urllib, xml).  Each example asks what a function or class does and answers
with the first paragraph of its docstring.  One prompt in five (by a hash of the prompt) is held
out; the rest is the pool, written to ``OUT/data/{train,eval}.jsonl`` and dealt to the fleet by
domain (``data.partition: by_domain``: each client mostly one package).  Then one ``simulate``
with ``fedit`` on SmolLM2 (defaults below) and a table of the held-out loss per domain, base
model against the trained global adapter, with exact match beside it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import re
import sys
from pathlib import Path

from fedlora_edge.coordinator.config import load_config, parse_override
from fedlora_edge.coordinator.partition import hold_out
from fedlora_edge.coordinator.simulate import Simulation
from fedlora_edge.core.data import Example, write_jsonl

PACKAGES = ("asyncio", "email", "importlib", "logging", "multiprocessing", "tkinter", "urllib", "xml")
DEFAULTS = {"method": "fedit", "rounds": 3, "clients_per_round": 4, "train.steps": 10, "train.batch_size": 8,
            "train.max_seq_len": 128, "max_new_tokens": 32, "eval.rouge_l": True, "data.samples_per_client": 48}
PER_DOMAIN = 60  # examples per package at most (before the held-out split)


def _paragraph(doc: str) -> str | None:
    first = re.split(r"\n\s*\n", inspect.cleandoc(doc), maxsplit=1)[0]
    text = " ".join(first.split())
    words = text.split()
    if len(words) < 6 or ">>>" in text:
        return None
    return " ".join(words[:60])


def docstring_examples(package: str) -> list[Example]:
    pkg = importlib.import_module(package)
    modules = [pkg] + [importlib.import_module(m.name) for m in
                       pkgutil.walk_packages(getattr(pkg, "__path__", []), f"{package}.")
                       if not any(part.startswith("_") or part in ("test", "tests", "__main__")
                                  for part in m.name.split("."))
                       and _importable(m.name)]
    seen, out = set(), []
    for mod in modules:
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", "") != mod.__name__ or not obj.__doc__:
                continue
            answer = _paragraph(obj.__doc__)
            if answer is None or answer in seen:
                continue
            seen.add(answer)
            kind = "class" if inspect.isclass(obj) else "function"
            out.append(Example(f"What does the {kind} {mod.__name__}.{name} do?", answer, package))
    return out[:PER_DOMAIN]


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # noqa: BLE001 - a platform-specific module that does not import here
        return False


def main() -> int:
    from fedlora_edge.core.quiet import quiet_third_party

    quiet_third_party()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    pool = [ex for p in PACKAGES for ex in docstring_examples(p)]
    train, evals = hold_out(pool)
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "eval.jsonl", evals)
    print(f"{len(train)} training and {len(evals)} held-out examples in {len(PACKAGES)} domains", file=sys.stderr)
    overrides = {**DEFAULTS, "data.train_file": str(out / "data" / "train.jsonl"),
                 "data.eval_file": str(out / "data" / "eval.jsonl")}
    overrides.update(dict(parse_override(s) for s in args.set))
    cfg = load_config(overrides=overrides)
    from fedlora_edge.coordinator.console import ConsoleReporter

    report = Simulation(cfg, out / "run", ConsoleReporter()).run()
    base, fa = report["base_accuracy"], report["final_accuracy"]
    rows = ["| domain | held-out examples | loss, base | loss, after | perplexity, base | perplexity, after "
            "| ROUGE-L %, base | after | exact match %, base | after |", "|---|---|---|---|---|---|---|---|---|---|"]
    counts = {d: sum(ex.domain == d for ex in evals) for d in fa["loss"]["per_domain"]}
    import math

    for d in list(fa["loss"]["per_domain"]) + ["overall"]:
        bl = base["loss"]["overall"] if d == "overall" else base["loss"]["per_domain"][d]
        al = fa["loss"]["overall"] if d == "overall" else fa["loss"]["per_domain"][d]
        be = base["overall"] if d == "overall" else base["per_domain"][d]
        ae = fa["overall"] if d == "overall" else fa["per_domain"][d]
        br = base["rouge_l"]["overall"] if d == "overall" else base["rouge_l"]["per_domain"][d]
        ar = fa["rouge_l"]["overall"] if d == "overall" else fa["rouge_l"]["per_domain"][d]
        n = sum(counts.values()) if d == "overall" else counts[d]
        rows.append(f"| {d} | {n} | {bl:.3f} | {al:.3f} | {math.exp(bl):.1f} | {math.exp(al):.1f} | "
                    f"{100 * br:.1f} | {100 * ar:.1f} | {100 * be:.1f} | {100 * ae:.1f} |")
    per_round = " → ".join(f"{x['accuracy']['loss']['overall']:.3f}" for x in report["rounds"] if "accuracy" in x)
    print("\n".join(rows))
    print(f"\nheld-out loss per round (overall): {base['loss']['overall']:.3f} → {per_round}; leading metric: "
          f"{report['metrics']['lead']} ({report['metrics']['reason']})")
    (out / "table.md").write_text("\n".join(rows) + "\n")
    json.dump({"rows": rows, "per_round": per_round}, (out / "table.json").open("w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
