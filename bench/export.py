"""Edge runtime exports side by side: agreement, size, speed and memory per format and quantization,
against PyTorch with its KV cache and against onnxruntime-genai's own model builder.

    python bench/export.py --out runs/export --adapter RUN/adapter [--model smollm2-135m]
        [--formats onnx:fp32,onnx:int8,onnx:int4,executorch:fp32,executorch:8da8w]
        [--vendor fp32,int8,int4] [--prompts-per-task 4] [--new-tokens 64] [--threads 1]

1. Each of our formats runs ``fedlora export`` (base + adapter for ONNX, merged for ExecuTorch) and
   its parity report into ``OUT/<format>-<quant>/``: top-1 agreement on the answer tokens and over
   all positions, exact match of PyTorch and of the artifact.
2. The vendor's side: the adapter merged into the base and given to onnxruntime-genai's model
   builder as its users run it (``-p <precision> -e cpu``, its defaults otherwise) into
   ``OUT/vendor-onnx-<quant>/``, then the same parity report.
3. Speed and memory: every artifact, and PyTorch eager with transformers' KV cache, is loaded in a
   fresh child process (so peak RSS is its own) with ``--threads`` threads and decodes
   ``--new-tokens`` tokens greedily (end of sequence ignored) after each of 5 held-out prompts:
   time to first token (prompt + first token), then ms per further token; peak RSS of the process
   (its VmHWM).

Exports and parity reports already in OUT are read back, not redone.  Prints one markdown table;
the speed column is each artifact's tokens per second over PyTorch's, measured on this host in the
same run (ratios; absolute times on a shared machine are noise).  llama.cpp is not compared: its
Python package builds from source, which this bench does not do.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# run as a script, this file's folder comes first on the path and its name would shadow the
# `export` package: drop the folder before importing it
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from export.build import check_format, export, merged_model  # noqa: E402
from export.parity import ParityError, Tolerance, parity_report  # noqa: E402

DEFAULT = "onnx:fp32,onnx:int8,onnx:int4,executorch:fp32,executorch:8da8w"
ANY = Tolerance(min_top1=0.0, max_accuracy_drop=1.0)  # the vendor's artifacts: measured, not judged


def run_one(model: str, adapter: str | None, fmt: str, quant: str, out: Path, per_task: int) -> dict:
    report_file = out / "parity.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    artifact, meta, reference, tok = export(model, adapter, fmt, quant, out)
    try:
        return parity_report(reference, tok, artifact, meta, per_task=per_task, threads=1)
    except ParityError:
        return json.loads(report_file.read_text())  # written before the error: report it as broken


def run_vendor(model: str, adapter: str | None, quant: str, out: Path, per_task: int) -> dict:
    """onnxruntime-genai's builder on the merged model, as its users run it."""
    from export.onnx_genai import base_bytes, run_builder, stage_model

    report_file = out / "parity.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    reference, tok = merged_model(model, adapter)
    with tempfile.TemporaryDirectory(prefix="fedlora-vendor-") as tmp:
        stage_model(reference, tok, Path(tmp) / "stage")
        run_builder(Path(tmp) / "stage", out, quant, tied=False, log_file=Path(tmp) / "builder.log", defaults=True)
    tok.save_pretrained(str(out / "tokenizer"))
    meta = {"format": "onnx", "quant": quant, "artifact": "model.onnx", "tokenizer": "tokenizer", "max_seq_len": 256,
            "base_bytes": base_bytes(out), "skipped_layers": []}
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    try:
        return parity_report(reference, tok, out / "model.onnx", meta, per_task=per_task, tolerance=ANY, threads=1)
    except ParityError:
        return json.loads(report_file.read_text())


def measure(kind: str, target: str, model: str, adapter: str | None, threads: int, new_tokens: int) -> dict:
    """In a child process: time to first token, ms per further token, peak RSS."""
    cmd = [sys.executable, __file__, "--measure", kind, target, "--model", model, "--threads", str(threads),
           "--new-tokens", str(new_tokens)] + (["--adapter", adapter] if adapter else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {target} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _child(kind: str, target: str, model: str, adapter: str | None, threads: int, new_tokens: int) -> None:
    import time

    import torch

    from edge_client.data import prompt_ids
    from export.parity import held_out
    from export.runners import TorchRunner, artifact_folder, load_runner

    torch.set_num_threads(threads)
    if kind == "torch":
        ref, tok = merged_model(model, adapter)
        run = TorchRunner(ref)
    else:
        from transformers import AutoTokenizer

        run = load_runner(target, threads)
        tok = AutoTokenizer.from_pretrained(str(artifact_folder(target) / "tokenizer"))
    prompts = [prompt_ids(tok, ex, 256 - new_tokens) for ex in held_out(1)]
    run.generate(prompts[0], 2, None)  # one-off set-up costs
    first, rest = [], []
    for ids in prompts:
        t0 = time.perf_counter()
        run.generate(ids, 1, None)
        first.append(time.perf_counter() - t0)
        new, secs = run.generate(ids, new_tokens, None)
        rest.append((secs - first[-1]) / max(1, len(new) - 1))
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over an exec, so a child would report
    # this bench's own peak
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"ttft_ms": 1000 * sum(first) / len(first), "ms_per_token": 1000 * sum(rest) / len(rest),
                      "peak_rss_mb": hwm / 1024}))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", help="a peft adapter folder (default: the base model alone)")
    ap.add_argument("--formats", default=DEFAULT, help=f"FORMAT:QUANT,... (default {DEFAULT})")
    ap.add_argument("--vendor", default="fp32,int8,int4", help="onnxruntime-genai builder precisions to compare "
                    "('' for none; default fp32,int8,int4)")
    ap.add_argument("--prompts-per-task", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        _child(*args.measure, args.model, args.adapter, args.threads, args.new_tokens)
        return 0
    if not args.out:
        ap.error("--out is required")
    out = Path(args.out)
    specs = [tuple(s.split(":", 1)) for s in args.formats.split(",") if s]
    for fmt, quant in specs:
        check_format(fmt, quant)
    rows: dict[str, tuple[Path, dict]] = {}
    for fmt, quant in specs:
        print(f"exporting {fmt} {quant} ...", file=sys.stderr, flush=True)
        folder = out / f"{fmt}-{quant}"
        rep = run_one(args.model, args.adapter, fmt, quant, folder, args.prompts_per_task)
        rows[f"fedlora {fmt} {quant}"] = (folder / rep["artifact"], rep)
    for quant in [q for q in args.vendor.split(",") if q]:
        print(f"onnxruntime-genai builder {quant} ...", file=sys.stderr, flush=True)
        folder = out / f"vendor-onnx-{quant}"
        rows[f"genai builder {quant}"] = (folder, run_vendor(args.model, args.adapter, quant, folder,
                                                             args.prompts_per_task))
    print("measuring speed and memory ...", file=sys.stderr, flush=True)
    base = measure("torch", "torch", args.model, args.adapter, args.threads, args.new_tokens)
    speed = {name: measure("artifact", str(path), args.model, args.adapter, args.threads, args.new_tokens)
             for name, (path, _) in rows.items()}
    (out / "bench.json").write_text(json.dumps({"torch": base, "artifacts": {
        n: {"speed": speed[n], "parity": r} for n, (_, r) in rows.items()}}, indent=1))
    print(f"PyTorch fp32 eager with KV cache, {args.threads} thread(s): time to first token {base['ttft_ms']:.1f} ms, "
          f"{base['ms_per_token']:.2f} ms/token, peak RSS {base['peak_rss_mb']:.0f} MB\n")
    print("| artifact | MB | MB per update | tokens/s vs torch | ms/token | time to first token ms | peak RSS MB | "
          "top-1 answer tokens | top-1 all positions | exact match torch / artifact % | parity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, r) in rows.items():
        s = speed[name]
        update = r.get("adapter_bytes") or r["size_bytes"]
        parity = "ok" if r["ok"] else "BROKEN: " + "; ".join(r["failures"])
        if name.startswith("genai builder"):
            parity = "(not judged)"
        print(f"| {name} | {r['size_bytes'] / 1e6:.1f} | {update / 1e6:.2f} | {base['ms_per_token'] / s['ms_per_token']:.2f} | "
              f"{s['ms_per_token']:.2f} | {s['ttft_ms']:.1f} | {s['peak_rss_mb']:.0f} | {r['top1_agreement']:.3f} | "
              f"{r.get('top1_agreement_all', float('nan')):.3f} | {100 * r['accuracy_torch']['overall']:.1f} / "
              f"{100 * r['accuracy_artifact']['overall']:.1f} | {parity} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
