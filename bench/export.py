"""Edge runtime exports side by side: agreement, size, speed and memory per format and quantization,
against PyTorch with its KV cache and against onnxruntime-genai's own model builder.

    python bench/export.py --out runs/export --adapter RUN/adapter [--model smollm2-135m]
        [--formats onnx:fp32,onnx:int8,onnx:int4,executorch:fp32,executorch:8da8w]
        [--vendor fp32,int8,int4] [--prompts-per-task 8] [--new-tokens 64] [--threads 1]
        [--llama-cpp f32,q8_0,q4_k_m --gguf-convert LLAMA_CPP/convert_hf_to_gguf.py]

1. Each of our formats runs ``fedlora export`` (the base and the adapter apart) and
   its parity report into ``OUT/<format>-<quant>/``: top-1 agreement on the answer tokens and over
   all positions, exact match of PyTorch and of the artifact.
2. The vendor's side: the adapter merged into the base and given to onnxruntime-genai's model
   builder as its users run it (``-p <precision> -e cpu``, its defaults otherwise) into
   ``OUT/vendor-onnx-<quant>/``, then the same parity report.  With ``--llama-cpp``, the merged
   model also goes to llama.cpp as its users run it: ``convert_hf_to_gguf.py --outtype f32``, then
   llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) for each type
   asked (``q8_0``, ``q4_k_m``, ``q4_0``, ...), into ``OUT/llama-cpp-<type>/``; it decodes through
   llama-cpp-python (greedy sampler, its KV cache), and the parity report runs on it.
3. Speed and memory: every artifact, and PyTorch eager with transformers' KV cache, is loaded in a
   fresh child process (so peak RSS is its own) with ``--threads`` threads and decodes
   ``--new-tokens`` tokens greedily (end of sequence ignored) after each of 5 held-out prompts:
   time to first token (prompt + first token), then ms per further token; peak RSS of the process
   (its VmHWM).

Exports and parity reports already in OUT are read back, not redone.  Prints one markdown table;
the speed column is each artifact's tokens per second over PyTorch's, measured on this host in the
same run (ratios; absolute times on a shared machine are noise).

llama.cpp is optional.  Its Python package builds from source (a C++ compiler and cmake, several
minutes), and its converter is a script in llama.cpp's source tree, not in a package::

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcp && tar xzf /tmp/lcp/*.tar.gz -C /tmp/lcp
    pip install /tmp/lcp/llama_cpp_python-*/        # builds llama.cpp
    python bench/export.py ... --llama-cpp f32,q8_0,q4_k_m,q4_0 --gguf-convert CONVERT
    # CONVERT: /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py
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

from fedlora_edge.export.build import check_format, export, merged_model  # noqa: E402
from fedlora_edge.export.parity import ParityError, Tolerance, parity_report  # noqa: E402

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
    from fedlora_edge.export.onnx_genai import base_bytes, run_builder, stage_model

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


class LlamaCppRunner:
    """A GGUF in llama.cpp (llama-cpp-python), as an :class:`fedlora_edge.export.runners.Runner`: ``generate``
    is llama.cpp's own loop with its greedy sampler and KV cache (cleared before each prompt, so no
    prompt is served from an earlier one's cache); ``logits`` runs a second context that keeps
    every position's logits (one that keeps only the last one decodes, so the speed is not paying
    for the parity check)."""

    def __init__(self, path: Path, threads: int = 0, n_ctx: int = 256):
        from llama_cpp import Llama

        self._kw = {"model_path": str(path), "n_ctx": n_ctx, "n_batch": n_ctx, "n_ubatch": n_ctx,
                    "n_threads": threads or None, "n_threads_batch": threads or None, "verbose": False}
        self.llm, self._all = Llama(**self._kw), None

    def logits(self, ids):
        import numpy as np
        from llama_cpp import Llama

        if self._all is None:
            self._all = Llama(**self._kw, logits_all=True)
        rows = []
        for row in ids:
            self._all.reset()
            self._all.eval([int(t) for t in row])
            rows.append(np.array(self._all.scores[:len(row)], dtype=np.float32))
        return np.stack(rows)

    def generate(self, ids: list[int], max_new_tokens: int, eos: int | None) -> tuple[list[int], float]:
        import time

        t0, new = time.perf_counter(), []
        self.llm.reset()
        if max_new_tokens > 0:
            for tok in self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                if tok == eos:
                    break
                new.append(int(tok))
                if len(new) == max_new_tokens:
                    break  # the generator evaluates a token only when asked for the next one
        return new, time.perf_counter() - t0

    def close(self) -> None:
        """Free the contexts now (llama-cpp-python's own finalizer fails at interpreter exit)."""
        for llm in (self.llm, self._all):
            if llm is not None:
                llm.close()
        self.llm = self._all = None


def _llama_cpp_f32(reference, tok, out: Path, convert: Path) -> Path:
    """The merged model as an f32 GGUF, by llama.cpp's converter (once per OUT)."""
    gguf = out / "llama-cpp-source.f32.gguf"
    if gguf.is_file():
        return gguf
    from fedlora_edge.export.onnx_genai import stage_model

    with tempfile.TemporaryDirectory(prefix="fedlora-gguf-") as tmp:
        stage_model(reference, tok, Path(tmp) / "stage")
        log = out / "llama-cpp-convert.log"
        with open(log, "w") as fh:
            done = subprocess.run([sys.executable, str(convert), str(Path(tmp) / "stage"), "--outtype", "f32",
                                   "--outfile", str(Path(tmp) / "model.gguf")], stdout=fh, stderr=subprocess.STDOUT,
                                  check=False)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp's converter failed: {log.read_text(errors='replace').splitlines()[-1:]} "
                               f"(log: {log})")
        Path(tmp, "model.gguf").replace(gguf)
    return gguf


def run_llama_cpp(model: str, adapter: str | None, qtype: str, out: Path, per_task: int, convert: Path) -> dict:
    """llama.cpp on the merged model, as its users run it: convert to f32, then its quantizer."""
    import ctypes
    import shutil

    import llama_cpp

    report_file = out / "parity.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    reference, tok = merged_model(model, adapter)
    source = _llama_cpp_f32(reference, tok, out.parent, convert)
    gguf = out / "model.gguf"
    if qtype == "f32":
        shutil.copyfile(source, gguf)
    else:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(source).encode(), str(gguf).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp's quantizer failed on {qtype}")
    tok.save_pretrained(str(out / "tokenizer"))
    meta = {"format": "gguf", "quant": qtype, "artifact": "model.gguf", "tokenizer": "tokenizer", "max_seq_len": 256,
            "base_bytes": gguf.stat().st_size, "skipped_layers": []}
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    runner = LlamaCppRunner(gguf, 1)
    try:
        return parity_report(reference, tok, gguf, meta, per_task=per_task, tolerance=ANY, threads=1, runner=runner)
    except ParityError:
        return json.loads(report_file.read_text())
    finally:
        runner.close()


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

    from fedlora_edge.core.data import prompt_ids
    from fedlora_edge.export.parity import held_out
    from fedlora_edge.export.runners import TorchRunner, artifact_folder, load_runner

    torch.set_num_threads(threads)
    if kind == "torch":
        ref, tok = merged_model(model, adapter)
        run = TorchRunner(ref)
    elif kind == "gguf":
        from transformers import AutoTokenizer

        run = LlamaCppRunner(Path(target), threads)
        tok = AutoTokenizer.from_pretrained(str(artifact_folder(target) / "tokenizer"))
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
                      "peak_rss_mb": hwm / 1024}), flush=True)
    if isinstance(run, LlamaCppRunner):
        run.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", help="a peft adapter folder (default: the base model alone)")
    ap.add_argument("--formats", default=DEFAULT, help=f"FORMAT:QUANT,... (default {DEFAULT})")
    ap.add_argument("--vendor", default="fp32,int8,int4", help="onnxruntime-genai builder precisions to compare "
                    "('' for none; default fp32,int8,int4)")
    ap.add_argument("--llama-cpp", default="", help="llama.cpp quantization types to compare, e.g. f32,q8_0,q4_k_m "
                    "(needs llama-cpp-python and --gguf-convert; default: none)")
    ap.add_argument("--gguf-convert", help="llama.cpp's convert_hf_to_gguf.py (in its source tree)")
    ap.add_argument("--prompts-per-task", type=int, default=8)
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
    gguf_types = [q.strip().lower() for q in args.llama_cpp.split(",") if q.strip()]
    if gguf_types:
        try:
            import llama_cpp
        except ImportError:
            ap.error("--llama-cpp needs llama-cpp-python, which builds from source (see this script's --help)")
        if not args.gguf_convert or not Path(args.gguf_convert).is_file():
            ap.error("--llama-cpp needs --gguf-convert: the path of llama.cpp's convert_hf_to_gguf.py")
        unknown = [q for q in gguf_types if q != "f32" and not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q.upper()}")]
        if unknown:
            ap.error(f"--llama-cpp: unknown llama.cpp quantization type(s) {', '.join(unknown)} "
                     "(llama.cpp's names: f32, q8_0, q4_0, q4_k_m, q5_k_m, q6_k, ...)")
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
    for qtype in gguf_types:
        print(f"llama.cpp {qtype} ...", file=sys.stderr, flush=True)
        folder = out / f"llama-cpp-{qtype}"
        rows[f"llama.cpp {qtype}"] = (folder / "model.gguf", run_llama_cpp(
            args.model, args.adapter, qtype, folder, args.prompts_per_task, Path(args.gguf_convert)))
    print("measuring speed and memory ...", file=sys.stderr, flush=True)
    base = measure("torch", "torch", args.model, args.adapter, args.threads, args.new_tokens)
    speed = {name: measure("gguf" if name.startswith("llama.cpp") else "artifact", str(path), args.model,
                           args.adapter, args.threads, args.new_tokens)
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
        if name.startswith(("genai builder", "llama.cpp")):
            parity = "(not judged)"
        print(f"| {name} | {r['size_bytes'] / 1e6:.1f} | {update / 1e6:.2f} | {base['ms_per_token'] / s['ms_per_token']:.2f} | "
              f"{s['ms_per_token']:.2f} | {s['ttft_ms']:.1f} | {s['peak_rss_mb']:.0f} | {r['top1_agreement']:.3f} | "
              f"{r.get('top1_agreement_all', float('nan')):.3f} | {100 * r['accuracy_torch']['overall']:.1f} / "
              f"{100 * r['accuracy_artifact']['overall']:.1f} | {parity} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
