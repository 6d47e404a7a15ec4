"""Edge runtime exports side by side: size, latency and parity per format and quantization.

    python bench/export.py --out runs/export [--model smollm2-135m] [--adapter RUN/adapter]
        [--formats onnx:fp32,onnx:int8,executorch:fp32,executorch:8da8w,executorch:8da4w]
        [--prompts-per-task 4]

Each format runs ``fedlora export`` (merge, export, parity report against PyTorch in this same
process) into ``OUT/<format>-<quant>/``; an export whose parity report is already there is read
back, not redone.  Prints one markdown table: file size relative to the fp32 artifact of the same
format, latency per generated token relative to torch eager (both timed by the parity report's
cache-less greedy loop on the same prompts), max |Δlogits|, top-1 agreement, exact-match accuracy
of PyTorch and of the artifact, and whether parity held.  A format whose parity is broken is
reported, not hidden (the export's own tolerance decides).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# run as a script, this file's folder comes first on the path and its name would shadow the
# `export` package: drop the folder before importing it
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from export.build import check_format, export  # noqa: E402
from export.parity import ParityError, parity_report  # noqa: E402

DEFAULT = "onnx:fp32,onnx:int8,executorch:fp32,executorch:8da8w,executorch:8da4w"


def run_one(model: str, adapter: str | None, fmt: str, quant: str, out: Path, per_task: int) -> dict:
    report_file = out / "parity.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    artifact, meta, reference, tok = export(model, adapter, fmt, quant, out)
    try:
        return parity_report(reference, tok, artifact, meta, per_task=per_task)
    except ParityError:
        return json.loads(report_file.read_text())  # written before the error: report it as broken


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", help="a peft adapter folder (default: the base model alone)")
    ap.add_argument("--formats", default=DEFAULT, help=f"FORMAT:QUANT,... (default {DEFAULT})")
    ap.add_argument("--prompts-per-task", type=int, default=4)
    args = ap.parse_args(argv)
    specs = [tuple(s.split(":", 1)) for s in args.formats.split(",") if s]
    for fmt, quant in specs:
        check_format(fmt, quant)
    rows = {}
    for fmt, quant in specs:
        print(f"exporting {fmt} {quant} ...", file=sys.stderr, flush=True)
        rows[(fmt, quant)] = run_one(args.model, args.adapter, fmt, quant, Path(args.out) / f"{fmt}-{quant}",
                                     args.prompts_per_task)
    print("| format | quant | size MB | size vs fp32 | ms/token torch | ms/token artifact | latency vs torch | "
          "max abs Δlogits | top-1 agreement | accuracy torch % | accuracy artifact % | parity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (fmt, quant), r in rows.items():
        fp32 = rows.get((fmt, "fp32"))
        size = f"{r['size_bytes'] / fp32['size_bytes']:.2f}" if fp32 else "-"
        print(f"| {fmt} | {quant} | {r['size_bytes'] / 1e6:.1f} | {size} | {r['ms_per_token_torch']:.1f} | "
              f"{r['ms_per_token_artifact']:.1f} | {r['ms_per_token_artifact'] / r['ms_per_token_torch']:.2f} | "
              f"{r['max_abs_logits_diff']:.3g} | {r['top1_agreement']:.3f} | "
              f"{100 * r['accuracy_torch']['overall']:.1f} | {100 * r['accuracy_artifact']['overall']:.1f} | "
              f"{'ok' if r['ok'] else 'BROKEN: ' + '; '.join(r['failures'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
