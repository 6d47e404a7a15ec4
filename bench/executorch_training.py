"""Step time of the executorch trainer against torch eager, on the same model, batch and SGD.

    python bench/executorch_training.py [--model smollm2-135m] [--rank 8] [--batch 8] [--seq 64]
        [--steps 10] [--threads 1] [--bases fp32,int8] [--out runs/executorch_training]

Both sides run in this process on the same data: the torch trainer (a peft model, SGD) and the
training program of :mod:`fedlora_edge.edge_client.et_train` (built by :mod:`fedlora_edge.coordinator.et_compile`
into ``--out``, reused when there), each on
the batches a run trains on (padded to the longest sequence of each batch: the program's length
is dynamic, up to ``--seq``) and on batches padded to ``--seq`` (the fixed shape programs had
before).  Each side does one warm-up step, then ``--steps`` timed steps; the median step is
reported, with the loss agreement of the two sides (same start, same batches).  Prints one
markdown table with the ratio to torch on the same batches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def timed(fn, steps: int) -> tuple[float, list[float]]:
    """(median seconds per step, losses) of ``steps`` calls after one warm-up call."""
    fn()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), losses


def program_step(trainer, opt, data):
    """One SGD step of a loaded training program on the next batch of ``data``; returns the loss."""
    def step():
        b = next(data)
        loss = trainer.module.forward_backward("forward", (b["input_ids"], b["labels"]))[0]
        opt.step(trainer.module.named_gradients())
        return float(loss)
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="threads of each side: torch's, and the ExecuTorch "
                    "runtime's pool (XNNPACK's matmuls run on it)")
    ap.add_argument("--bases", default="fp32,int8")
    ap.add_argument("--out", default="runs/executorch_training")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from peft import get_peft_model

    from fedlora_edge.coordinator.config import DataConfig
    from fedlora_edge.coordinator.et_compile import CompilingStore
    from fedlora_edge.core.data import collate, encode_examples, generate_task
    from fedlora_edge.core.lora import (
        adapted_modules,
        init_global_factors,
        lora_config,
        set_factors,
        to_state_dict,
        uniform_plan,
    )
    from fedlora_edge.core.models import default_target_modules, load_model
    from fedlora_edge.edge_client.et_train import ProgramTrainer, program_spec
    from fedlora_edge.edge_client.trainer import batches

    model, tok = load_model(args.model)
    targets = default_target_modules(model)
    dims = adapted_modules(model, targets)
    plan = uniform_plan(dims, args.rank, 2.0)
    start = init_global_factors(dims, args.rank, 0)
    examples = [ex for t in DataConfig().tasks for ex in generate_task(t, 40, seed=0)]
    encoded = encode_examples(tok, examples, args.seq)
    it = batches(encoded, args.batch, seed=0)
    fixed = [collate(next(it), tok.pad_token_id, width=args.seq) for _ in range(args.steps + 1)]
    it = batches(encoded, args.batch, seed=0)
    natural = [collate(next(it), tok.pad_token_id) for _ in range(args.steps + 1)]

    pm = get_peft_model(model, lora_config(plan, targets), adapter_name="client")
    set_factors(pm, "client", start)
    params = [p for p in pm.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]

    def torch_side(data):
        for p, p0 in zip(params, initial):
            p.data.copy_(p0)
        opt = torch.optim.SGD(params, lr=0.05)
        pos = iter(data)
        pm.train()

        def step():
            b = next(pos)
            loss = pm(input_ids=b["input_ids"], labels=b["labels"]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)
        return timed(step, args.steps)

    rows = []
    width = f"{statistics.mean(b['input_ids'].shape[1] for b in natural[1:]):.0f}"
    t_nat, l_nat = torch_side(natural)
    t_fixed, l_fixed = torch_side(fixed)
    rows.append((f"torch eager, run batches (mean width {width})", t_nat, t_nat, None, ""))
    rows.append((f"torch eager, batches padded to {args.seq}", t_fixed, t_fixed, None, ""))
    store = CompilingStore(Path(args.out), log=print)
    for base in [b for b in args.bases.split(",") if b]:
        path, side = store.get(program_spec(args.model, plan, targets, args.batch, args.seq, base))
        trainer = ProgramTrainer(path, threads=args.threads)
        trainer.set_factors(to_state_dict(start))
        from executorch.extension.training import get_sgd_optimizer

        note = "Δloss includes the int8 base's quantization" if base == "int8" else ""
        for label, data, t_ref, l_ref in ((f"run batches (mean width {width})", natural, t_nat, l_nat),
                                          (f"batches padded to {args.seq}", fixed, t_fixed, l_fixed)):
            trainer.set_factors(to_state_dict(start))
            opt = get_sgd_optimizer(trainer.params, 0.05, 0.0, 0.0, 0.0, False)
            t_et, l_et = timed(program_step(trainer, opt, iter(data)), args.steps)
            diff = max(abs(a - b) for a, b in zip(l_et, l_ref))
            print(f"{label}: losses torch {[round(x, 6) for x in l_ref]}, program {[round(x, 6) for x in l_et]}")
            rows.append((f"executorch program, {base} base ({side['bytes'] / 2**20:.0f} MiB), {label}", t_et, t_ref,
                         diff, note))

    from executorch.extension.pybindings import portable_lib

    print(f"\n{args.model}, rank {args.rank}, batch {args.batch} x up to {args.seq} tokens, SGD, {args.steps} timed "
          f"steps (median), torch threads {torch.get_num_threads()}, executorch threads "
          f"{portable_lib._threadpool_get_thread_count()}\n")
    print("| trainer | ms/step | × torch (same batches) | max |Δloss| vs torch | note |")
    print("|---|---|---|---|---|")
    for name, t, t_ref, diff, note in rows:
        print(f"| {name} | {1000 * t:.0f} | {t / t_ref:.2f} | {'-' if diff is None else f'{diff:.1e}'} | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
