"""Predicted vs measured peak memory of local training, SmolLM2 at ranks 4, 8, 16, 32.

Each rank runs in a fresh process (peak RSS is per process): load the model, wrap it with LoRA
at that rank, and train a few AdamW steps on full-length batches (batch x max_seq_len tokens, the
planner's worst case).  Prints, per rank, the planner's prediction, the measured peak RSS of the
training phase and of the whole process (model loading included), and their ratios.  Target:
training-phase ratio within 1 +/- 0.15 (1 +/- 0.10 for the training options below).

``--options`` measures the torch trainer's training options, each a ``+``-joined set of
``fp32 | bf16 | fp16`` (``train.dtype``), ``nf4 | int8`` (``train.base_quant``), ``gc``
(``train.gradient_checkpointing``) and ``packing`` (``train.packing``: rows of whole examples of
random lengths packed to ``--seq`` tokens, examples' bounds in ``position_ids``), at every rank
of ``--ranks``: ``--options fp32,bf16,nf4,int8,gc,packing,nf4+gc --ranks 8``.

With ``--trainer executorch`` each rank trains SGD steps in its ExecuTorch training program
instead (fp32 base; the torch model is dropped before the program loads), the program taken
from ``--programs`` when built there before (``bench/executorch_training.py --out`` keeps the
rank-8 one), else built there first, in a process of its own (minutes for SmolLM2).

    python bench/planner_memory.py [--model smollm2-135m] [--batch 8] [--seq 64] [--steps 3]
        [--trainer torch|executorch] [--programs runs/executorch_training] [--options fp32,nf4+gc,...]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, random, resource, sys, gc
import psutil, torch
from fedlora_edge.core.quiet import quiet_third_party
quiet_third_party()
from peft import get_peft_model
from fedlora_edge.core.models import load_model, default_target_modules
from fedlora_edge.core.lora import adapted_modules, lora_config, uniform_plan
from fedlora_edge.core.data import collate_packed, pack_examples
from fedlora_edge.coordinator.planner import ModelShape, TrainForm, memory_bytes
from fedlora_edge.edge_client.trainer import checkpointing, train_steps
model_spec, rank, batch, seq, steps, overhead = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
trainer, programs, build_only = sys.argv[7], sys.argv[8], sys.argv[9] == "build"
opts = set(sys.argv[10].split("+"))
torch.set_num_threads(int(sys.argv[11]))
dtype = next((d for d in ("bf16", "fp16") if d in opts), "fp32")
quant = next((q for q in ("nf4", "int8") if q in opts), "none")
form = TrainForm(dtype, quant, "gc" in opts, "packing" in opts)
proc = psutil.Process()
rss_start = proc.memory_info().rss
model, tok = load_model(model_spec, dtype=dtype, base_quant=quant)
gc.collect()
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
targets = default_target_modules(model)
dims = adapted_modules(model, targets)
shape = ModelShape.from_model(model, dims)
plan = uniform_plan(dims, rank, 2.0)
g = torch.Generator().manual_seed(0)
rng = random.Random(0)
def gen():
    while True:
        if "packing" in opts:  # whole examples of 8 to seq/2 tokens (a prompt of 4 to 12) packed into rows of seq
            rows = []
            while len(rows) < batch:
                ex = []
                for _ in range(8 * batch):
                    n = rng.randint(8, max(8, seq // 2))
                    ex.append((torch.randint(0, shape.vocab, (n,), generator=g).tolist(), rng.randint(4, min(12, n - 1))))
                rows += [b for b in pack_examples(ex, seq) if sum(len(s) for s, _ in b) > seq - 8]
            yield collate_packed(rows[:batch], tok.pad_token_id)
            continue
        ids = torch.randint(0, shape.vocab, (batch, seq), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
if trainer == "executorch":
    from fedlora_edge.coordinator.et_compile import CompilingStore
    from fedlora_edge.edge_client.et_train import ProgramTrainer, program_spec
    path, _ = CompilingStore(programs, log=lambda t: print(t, file=sys.stderr)).get(
        program_spec(model_spec, plan, targets, batch, seq, "fp32"))
    if build_only:  # a build leaves its heap behind: it runs in a process of its own
        sys.exit(0)
    del model
    gc.collect()
    rss_start = proc.memory_info().rss  # what the process holds without a model: libraries, tokenizer
    def run():
        from executorch.extension.training import get_sgd_optimizer
        t = ProgramTrainer(path)  # loading runs one step: part of the training phase
        opt = get_sgd_optimizer(t.params, 1e-3, 0.0, 0.0, 0.0, False)
        data = gen()
        for _ in range(steps):
            b = next(data)
            t.module.forward_backward("forward", (b["input_ids"], b["labels"]))
            opt.step(t.module.named_gradients())
else:
    pm = get_peft_model(model, lora_config(plan, targets))
    params = [p for p in pm.parameters() if p.requires_grad]
    def run():
        with checkpointing(pm, form.checkpointing):
            train_steps(pm, params, gen(), steps, 1e-3)
# sample RSS during training with a thread (ru_maxrss also covers loading)
import threading, time
peak = [proc.memory_info().rss]
stop = threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.005)
t = threading.Thread(target=watch); t.start()
train_start = proc.memory_info().rss  # the loaded (and wrapped) model, before the first step
run()
stop.set(); t.join()
pred = memory_bytes(shape, rank, batch, seq, overhead, trainer, form=form)
print(json.dumps({"rank": rank, "predicted": sum(pred.values()), "parts": pred, "train_peak": peak[0],
                  "process_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "load_peak": load_peak, "rss_start": rss_start, "train_start": train_start}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranks", default="4,8,16,32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--overhead-gb", type=float, default=None, help="default: the config's planner value")
    ap.add_argument("--trainer", choices=("torch", "executorch"), default="torch",
                    help="torch (AdamW) or executorch (SGD in a training program, fp32 base)")
    ap.add_argument("--programs", default="runs/executorch_training",
                    help="where executorch training programs are found or built")
    ap.add_argument("--options", default="fp32",
                    help="comma-separated training options, each +-joined from fp32|bf16|fp16, nf4|int8, gc, packing "
                         "(the torch trainer; e.g. fp32,bf16,nf4,int8,gc,packing,nf4+gc)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each measuring process")
    args = ap.parse_args()
    if args.overhead_gb is None:
        from fedlora_edge.coordinator.config import PlannerSettings

        args.overhead_gb = PlannerSettings().runtime_overhead_gb
    gb = 2**30
    steps = "AdamW steps in torch" if args.trainer == "torch" else "SGD steps in an executorch program"
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, {args.steps} {steps}, runtime overhead "
          f"{args.overhead_gb} GB")
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    known = {"fp32", "bf16", "fp16", "nf4", "int8", "gc", "packing"}
    for o in options:
        bad = set(o.split("+")) - known
        if bad:
            ap.error(f"--options: unknown {', '.join(sorted(bad))} in '{o}'; each of {', '.join(sorted(known))}")
    if args.trainer == "executorch" and options != ["fp32"]:
        ap.error("--options are the torch trainer's")
    print(f"{'options':>12} {'rank':>4} {'predicted GB':>12} {'train peak GB':>13} {'ratio':>6} "
          f"{'process peak GB':>15} {'ratio':>6} {'load peak GB':>12}")
    worst = 0.0
    for opt in options:
        for r in [int(x) for x in args.ranks.split(",")]:
            child = [sys.executable, "-c", CHILD, args.model, str(r), str(args.batch), str(args.seq), str(args.steps),
                     str(args.overhead_gb), args.trainer, args.programs]
            tail = [opt, str(args.threads)]
            if args.trainer == "executorch":  # the program, built first where it is not in --programs yet
                subprocess.run(child + ["build"] + tail, stdout=sys.stderr, check=True)
            out = subprocess.run(child + ["measure"] + tail, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = res["predicted"] / res["train_peak"]
            worst = max(worst, abs(ratio - 1))
            print(f"{opt:>12} {r:>4} {res['predicted'] / gb:>12.3f} {res['train_peak'] / gb:>13.3f} {ratio:>6.3f} "
                  f"{res['process_peak'] / gb:>15.3f} {res['predicted'] / res['process_peak']:>6.3f} "
                  f"{res['load_peak'] / gb:>12.3f}", flush=True)
            parts = {k: round(v / gb, 3) for k, v in res["parts"].items()}
            print(f"{'':>12} prediction by part (GB): {parts}; held before the first step "
                  f"{res['train_start'] / gb:.3f} GB", flush=True)
    print(f"process RSS before loading: {res['rss_start'] / gb:.3f} GB")
    print(f"worst |predicted/measured - 1| (training phase): {worst:.3f} (target <= 0.15; <= 0.10 for --options)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
