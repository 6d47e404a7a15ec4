"""The project's local training step vs a bare peft training loop: same model, batch and rank.

Both sides train the same peft LoRA adapter (rank --rank on q_proj/v_proj) with AdamW on the same
examples.  The bare side is the shortest correct loop: pre-collated batches, forward, backward,
step, zero_grad.  The project side is `fedlora_edge.edge_client.trainer.train_local` as a client calls it:
tokenising, batching, gradient clipping, timing, loss bookkeeping and its optimiser set-up
included.  The two alternate, --repeats times each, in one process; the ratio of medians is
printed.  Target: <= 1.05.

    python bench/client_overhead.py [--model smollm2-135m] [--steps 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import get_peft_model

    from fedlora_edge.core.data import collate, encode_examples, generate_task
    from fedlora_edge.core.lora import (
        adapted_modules,
        init_global_factors,
        lora_config,
        set_factors,
        uniform_plan,
    )
    from fedlora_edge.core.models import default_target_modules, load_model
    from fedlora_edge.edge_client.trainer import TrainSettings, batches, train_local

    model, tok = load_model(args.model)
    targets = default_target_modules(model)
    dims = adapted_modules(model, targets)
    plan = uniform_plan(dims, args.rank, 2.0)
    pm = get_peft_model(model, lora_config(plan, targets))
    init = init_global_factors(dims, args.rank, seed=0)
    examples = generate_task("add", 32, 0) + generate_task("upper", 32, 0)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch, lr=1e-3)

    # the bare side gets the very same batches, collated ahead of time
    enc = encode_examples(tok, examples, settings.max_seq_len)
    it = batches(enc, args.batch, seed=1)
    fixed = [collate(next(it), tok.pad_token_id) for _ in range(args.steps)]

    def bare() -> float:
        set_factors(pm, "default", init)
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        pm.train()
        t0 = time.perf_counter()
        for b in fixed:
            loss = pm(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        dt = time.perf_counter() - t0
        pm.eval()
        return dt

    def ours() -> float:
        set_factors(pm, "default", init)
        t0 = time.perf_counter()
        train_local(pm, tok, examples, settings, seed=1)
        return time.perf_counter() - t0

    bare(), ours()  # warm-up
    tb, to = [], []
    for _ in range(args.repeats):
        tb.append(bare())
        to.append(ours())
    mb, mo = statistics.median(tb), statistics.median(to)
    print(f"model {args.model}, rank {args.rank}, batch {args.batch}, {args.steps} steps, {args.repeats} repeats, "
          f"{args.threads} threads")
    print(f"bare peft loop : median {mb:.3f} s ({1000 * mb / args.steps:.1f} ms/step)")
    print(f"train_local    : median {mo:.3f} s ({1000 * mo / args.steps:.1f} ms/step)")
    print(f"ratio train_local / bare = {mo / mb:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
