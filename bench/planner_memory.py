"""Predicted vs measured peak memory of local training, SmolLM2 at ranks 4, 8, 16, 32.

Each rank runs in a fresh process (peak RSS is per process): load the model, wrap it with LoRA
at that rank, and train a few AdamW steps on full-length batches (batch x max_seq_len tokens, the
planner's worst case).  Prints, per rank, the planner's prediction, the measured peak RSS of the
training phase and of the whole process (model loading included), and their ratios.  Target:
training-phase ratio within 1 +/- 0.15.

With ``--trainer executorch`` each rank trains SGD steps in its ExecuTorch training program
instead (fp32 base; the torch model is dropped before the program loads), the program taken
from ``--programs`` when built there before (``bench/executorch_training.py --out`` keeps the
rank-8 one), else built there first, in a process of its own (minutes for SmolLM2).

    python bench/planner_memory.py [--model smollm2-135m] [--batch 8] [--seq 64] [--steps 3]
        [--trainer torch|executorch] [--programs runs/executorch_training]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, gc
import psutil, torch
torch.set_num_threads(2)
from peft import get_peft_model
from edge_client.models import load_model, default_target_modules
from edge_client.lora import adapted_modules, lora_config, uniform_plan
from coordinator.planner import ModelShape, memory_bytes
from edge_client.trainer import train_steps
model_spec, rank, batch, seq, steps, overhead = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
trainer, programs, build_only = sys.argv[7], sys.argv[8], sys.argv[9] == "build"
proc = psutil.Process()
rss_start = proc.memory_info().rss
model, tok = load_model(model_spec)
gc.collect()
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
targets = default_target_modules(model)
dims = adapted_modules(model, targets)
shape = ModelShape.from_model(model, dims)
plan = uniform_plan(dims, rank, 2.0)
g = torch.Generator().manual_seed(0)
def gen():
    while True:
        ids = torch.randint(0, shape.vocab, (batch, seq), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
if trainer == "executorch":
    from edge_client.et_train import ProgramStore, ProgramTrainer, program_spec
    path, _ = ProgramStore(programs, log=lambda t: print(t, file=sys.stderr)).get(
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
    run = lambda: train_steps(pm, params, gen(), steps, 1e-3)
# sample RSS during training with a thread (ru_maxrss also covers loading)
import threading, time
peak = [proc.memory_info().rss]
stop = threading.Event()
def watch():
    while not stop.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.005)
t = threading.Thread(target=watch); t.start()
run()
stop.set(); t.join()
pred = memory_bytes(shape, rank, batch, seq, overhead, trainer)
print(json.dumps({"rank": rank, "predicted": sum(pred.values()), "parts": pred, "train_peak": peak[0],
                  "process_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "load_peak": load_peak, "rss_start": rss_start}))
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
    args = ap.parse_args()
    if args.overhead_gb is None:
        from coordinator.config import PlannerSettings

        args.overhead_gb = PlannerSettings().runtime_overhead_gb
    gb = 2**30
    steps = "AdamW steps in torch" if args.trainer == "torch" else "SGD steps in an executorch program"
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, {args.steps} {steps}, runtime overhead "
          f"{args.overhead_gb} GB")
    print(f"{'rank':>4} {'predicted GB':>12} {'train peak GB':>13} {'ratio':>6} {'process peak GB':>15} {'ratio':>6}")
    worst = 0.0
    for r in [int(x) for x in args.ranks.split(",")]:
        child = [sys.executable, "-c", CHILD, args.model, str(r), str(args.batch), str(args.seq), str(args.steps),
                 str(args.overhead_gb), args.trainer, args.programs]
        if args.trainer == "executorch":  # the program, built first where it is not in --programs yet
            subprocess.run(child + ["build"], stdout=sys.stderr, check=True)
        out = subprocess.run(child + ["measure"], capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = res["predicted"] / res["train_peak"]
        worst = max(worst, abs(ratio - 1))
        print(f"{r:>4} {res['predicted'] / gb:>12.3f} {res['train_peak'] / gb:>13.3f} {ratio:>6.3f} "
              f"{res['process_peak'] / gb:>15.3f} {res['predicted'] / res['process_peak']:>6.3f}")
    parts = {k: round(v / gb, 3) for k, v in res["parts"].items()}
    print(f"prediction by part at rank {r} (GB): {parts}; process RSS before loading: {res['rss_start'] / gb:.3f} GB")
    print(f"worst |predicted/measured - 1| over ranks (training phase): {worst:.3f} (target <= 0.15)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
