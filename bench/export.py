"""Edge runtime exports side by side: agreement, size, speed and memory per format and quantization,
against PyTorch with its KV cache and against onnxruntime-genai's own model builder.

    python bench/export.py --out runs/export --adapter RUN/adapter [--model smollm2-135m]
        [--formats onnx:fp32,onnx:int8,onnx:int4,executorch:fp32,executorch:8da8w] (onnx:int8:merged: --merged)
        [--vendor fp32,int8,int4] [--prompts-per-task 8] [--new-tokens 64] [--threads 1]
        [--llama-cpp f32,q8_0,q4_k_m --gguf-convert LLAMA_CPP/convert_hf_to_gguf.py]

1. Each of our formats runs ``fedlora export`` (the base and the adapter apart; a spec ending
   ``:merged``, ``fedlora export --merged``: the adapter merged into one model) and
   its parity report into ``OUT/<format>-<quant>[-merged]/``: top-1 agreement on the answer tokens and over
   all positions, exact match of PyTorch and of the artifact.
2. The vendor's side: the adapter merged into the base and given to onnxruntime-genai's model
   builder as its users run it (``-p <precision> -e cpu``, its defaults otherwise) into
   ``OUT/vendor-onnx-<quant>/``, then the same parity report.  With ``--llama-cpp``, the merged
   model also goes to llama.cpp as its users run it: ``convert_hf_to_gguf.py --outtype f32``, then
   llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) for each type
   asked (``q8_0``, ``q4_k_m``, ``q4_0``, ...), into ``OUT/llama-cpp-<type>/``; it decodes through
   llama-cpp-python (greedy sampler, its KV cache), and the parity report runs on it.
3. Speed: every artifact, and PyTorch eager with transformers' KV cache, is loaded into one process
   with ``--threads`` threads each, and they take turns: for every held-out prompt (``--speed-prompts``
   of them, each ``--reps`` times) each runner decodes ``--new-tokens`` tokens greedily (end of
   sequence ignored), in an order rotated from prompt to prompt, so that the host's load falls on
   every runner alike.  Reported: the median time to first token (prompt + first token) and ms per
   further token, and the median over prompts of each runner's per-prompt speed against PyTorch's
   with its range; the host's load average before and after is printed.  Memory: each artifact's peak
   RSS (VmHWM) in a fresh child process of its own (a process's peak is its own).

Exports and parity reports already in OUT are read back, not redone.  Prints one markdown table;
the speed column is each artifact's tokens per second over PyTorch's, interleaved in one process on
this host (ratios; absolute times on a shared machine are noise).

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


def run_one(model: str, adapter: str | None, fmt: str, quant: str, out: Path, per_task: int,
            merged: bool = False) -> dict:
    report_file = out / "parity.json"
    if report_file.is_file():
        return json.loads(report_file.read_text())
    artifact, meta, reference, tok = export(model, adapter, fmt, quant, out, merged=merged)
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


def _runner(kind: str, target: str, model: str, adapter: str | None, threads: int):
    """(runner, tokenizer) of one side: PyTorch (the merged model with its KV cache), a llama.cpp
    GGUF, or one of the project's artifacts."""
    from transformers import AutoTokenizer

    from fedlora_edge.export.runners import TorchRunner, artifact_folder, load_runner

    if kind == "torch":
        ref, tok = merged_model(model, adapter)
        return TorchRunner(ref), tok
    run = LlamaCppRunner(Path(target), threads) if kind == "gguf" else load_runner(target, threads)
    return run, AutoTokenizer.from_pretrained(str(artifact_folder(target) / "tokenizer"))


def _prompts(tok, n: int, new_tokens: int) -> list[list[int]]:
    from fedlora_edge.core.data import TASKS, prompt_ids
    from fedlora_edge.export.parity import held_out

    per_task = -(-n // len(TASKS))
    examples = held_out(per_task)  # task by task: take them round-robin over the tasks
    mixed = [ex for j in range(per_task) for ex in examples[j::per_task]]
    return [prompt_ids(tok, ex, 256 - new_tokens) for ex in mixed[:n]]


def _time_one(run, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(time to first token s, s per further token) of one greedy decode, both as the runner times
    its own decoding: the prompt and one token, then the prompt and ``new_tokens``."""
    _, first = run.generate(ids, 1, None)
    new, secs = run.generate(ids, new_tokens, None)
    return first, max(0.0, secs - first) / max(1, len(new) - 1)


def interleaved_speed(sides: dict[str, tuple[str, str]], model: str, adapter: str | None, threads: int,
                      new_tokens: int, n_prompts: int, reps: int) -> dict[str, dict]:
    """Every side loaded into this process, then for each prompt (``reps`` times) every side decodes it
    in turn, the order rotated each time.  Per side: median ms/token and time to first token, and
    the median (min, max) over prompts of its speed against the side named ``torch``."""
    import statistics

    import torch

    torch.set_num_threads(threads)
    runners = {name: _runner(kind, target, model, adapter, threads) for name, (kind, target) in sides.items()}
    tok = runners["torch"][1]
    prompts = _prompts(tok, n_prompts, new_tokens)
    for run, _ in runners.values():
        run.generate(prompts[0], 2, None)  # one-off set-up costs
    names = list(runners)
    per: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    turn = 0
    for ids in prompts:
        for _ in range(reps):
            order = names[turn % len(names):] + names[:turn % len(names)]
            turn += 1
            for name in order:
                per[name].append(_time_one(runners[name][0], ids, new_tokens))
    out = {}
    for name in names:
        firsts, rests = zip(*per[name])
        # same prompt, same repetition (a decode too short to time, as on a tiny model, is left out)
        ratios = [b[1] / a[1] for a, b in zip(per[name], per["torch"]) if a[1] > 0 and b[1] > 0] or [float("nan")]
        out[name] = {"ms_per_token": 1000 * statistics.median(rests), "ttft_ms": 1000 * statistics.median(firsts),
                     "speed_vs_torch": statistics.median(ratios), "speed_range": [min(ratios), max(ratios)],
                     "samples": len(rests)}
    for run, _ in runners.values():
        if isinstance(run, LlamaCppRunner):
            run.close()
    return out


def peak_rss(kind: str, target: str, model: str, adapter: str | None, threads: int, new_tokens: int) -> float:
    """In a child process of its own: the peak RSS (MB) of loading ``target`` and decoding one prompt."""
    cmd = [sys.executable, __file__, "--measure", kind, target, "--model", model, "--threads", str(threads),
           "--new-tokens", str(new_tokens)] + (["--adapter", adapter] if adapter else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {target} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def _child(kind: str, target: str, model: str, adapter: str | None, threads: int, new_tokens: int) -> None:
    import torch

    torch.set_num_threads(threads)
    run, tok = _runner(kind, target, model, adapter, threads)
    run.generate(_prompts(tok, 1, new_tokens)[0], new_tokens, None)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over an exec, so a child would report
    # this bench's own peak
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": hwm / 1024}), flush=True)
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
    ap.add_argument("--speed-prompts", type=int, default=8, help="held-out prompts timed per side (default 8)")
    ap.add_argument("--reps", type=int, default=2, help="times each prompt is decoded per side (default 2)")
    ap.add_argument("--measure", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        _child(*args.measure, args.model, args.adapter, args.threads, args.new_tokens)
        return 0
    if not args.out:
        ap.error("--out is required")
    out = Path(args.out)
    specs = [(*s.split(":")[:2], s.endswith(":merged")) for s in args.formats.split(",") if s]
    for fmt, quant, merged in specs:
        check_format(fmt, quant)
        if merged and fmt != "onnx":
            ap.error(f"--formats {fmt}:{quant}:merged: only onnx exports merge the adapter into the base")
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
    for fmt, quant, merged in specs:
        print(f"exporting {fmt} {quant}{' merged' if merged else ''} ...", file=sys.stderr, flush=True)
        folder = out / f"{fmt}-{quant}{'-merged' if merged else ''}"
        rep = run_one(args.model, args.adapter, fmt, quant, folder, args.prompts_per_task, merged)
        rows[f"fedlora {fmt} {quant}{', merged' if merged else ''}"] = (folder / rep["artifact"], rep)
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
    import os

    load_before = os.getloadavg()
    print(f"measuring speed, interleaved in one process (host: {os.cpu_count()} CPUs, load average "
          f"{load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}) ...", file=sys.stderr, flush=True)
    sides = {"torch": ("torch", "torch"), **{
        name: ("gguf" if name.startswith("llama.cpp") else "artifact", str(path)) for name, (path, _) in rows.items()}}
    speed = interleaved_speed(sides, args.model, args.adapter, args.threads, args.new_tokens, args.speed_prompts,
                              args.reps)
    load_after = os.getloadavg()
    print("measuring peak memory, one process per side ...", file=sys.stderr, flush=True)
    rss = {name: peak_rss(kind, target, args.model, args.adapter, args.threads, args.new_tokens)
           for name, (kind, target) in sides.items()}
    (out / "bench.json").write_text(json.dumps({
        "host": {"cpus": os.cpu_count(), "load_before": load_before, "load_after": load_after,
                 "threads": args.threads, "speed_prompts": args.speed_prompts, "reps": args.reps},
        "torch": {**speed["torch"], "peak_rss_mb": rss["torch"]},
        "artifacts": {n: {"speed": {**speed[n], "peak_rss_mb": rss[n]}, "parity": r} for n, (_, r) in rows.items()}},
        indent=1))
    base = speed["torch"]
    print(f"host: {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{args.threads} thread(s) per side; {args.speed_prompts} prompts x {args.reps}, interleaved in one process")
    print(f"PyTorch fp32 eager with KV cache: time to first token {base['ttft_ms']:.1f} ms, "
          f"{base['ms_per_token']:.2f} ms/token, peak RSS {rss['torch']:.0f} MB\n")
    print("| artifact | MB | MB per update | tokens/s vs torch (per-prompt range) | ms/token | time to first token ms | "
          "peak RSS MB | top-1 answer tokens | top-1 all positions | KL per position | exact match torch / artifact % | "
          "parity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (_, r) in rows.items():
        sp = speed[name]
        update = r.get("adapter_bytes") or r["size_bytes"]
        parity = "ok" if r["ok"] else "BROKEN: " + "; ".join(r["failures"])
        if name.startswith(("genai builder", "llama.cpp")):
            parity = "(not judged)"
        lo, hi = sp["speed_range"]
        print(f"| {name} | {r['size_bytes'] / 1e6:.1f} | {update / 1e6:.2f} | {sp['speed_vs_torch']:.2f} "
              f"({lo:.2f}-{hi:.2f}) | {sp['ms_per_token']:.2f} | {sp['ttft_ms']:.1f} | {rss[name]:.0f} | "
              f"{r['top1_agreement']:.3f} | {r.get('top1_agreement_all', float('nan')):.3f} | "
              f"{r.get('mean_kl_all', float('nan')):.4f} | "
              f"{100 * r['accuracy_torch']['overall']:.1f} / {100 * r['accuracy_artifact']['overall']:.1f} | {parity} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
