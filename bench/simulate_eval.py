"""Held-out evaluation in `simulate`: one prefill per prompt against two (greedy answers and loss).

    python bench/simulate_eval.py [--model smollm2-135m] [--per-domain 20] [--repeats 3] [--threads 1]

`simulate` scores every evaluation twice over the same prompts: greedy answers (exact match) and
the teacher-forced loss on the reference responses.  Before, each had its own prefill of every
prompt (`generate_answers`: HF `generate` with its cache; `response_nll`: a forward over prompt +
response).  `evaluate` now computes the prompts' key-value cache once and runs both from it
(`answers_and_nll`).  Both sides run here in one process, on the default job's held-out prompts
(5 tasks x --per-domain), with the base model and with a random LoRA adapter on q/v (B != 0, so
that the answers move); the best of --repeats timings per side, the ratio, and whether the answers
and losses agree.
"""

from __future__ import annotations

import argparse
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-domain", type=int, default=20, help="held-out prompts per task (default: 20)")
    ap.add_argument("--repeats", type=int, default=3, help="timings per side; the best is kept (default: 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=64)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from fedlora_edge.coordinator.evaluate import answers_and_nll, generate_answers, response_nll
    from fedlora_edge.core.data import generate_task
    from fedlora_edge.core.models import load_model
    from fedlora_edge.core.quiet import quiet_third_party

    quiet_third_party()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    examples = [ex for t in ("add", "reverse", "upper", "parity", "count")
                for ex in generate_task(t, args.per_domain, seed=0, split="eval")]
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    pm.eval()

    def two_prefills():
        return (generate_answers(pm, tok, examples, args.max_new_tokens, "cpu", max_prompt_len=args.max_seq_len),
                response_nll(pm, tok, examples, args.max_seq_len, "cpu"))

    def one_prefill():
        return answers_and_nll(pm, tok, examples, args.max_new_tokens, "cpu", args.max_seq_len)

    print(f"{args.model}, {len(examples)} held-out prompts, {args.max_new_tokens} new tokens, "
          f"{args.threads} thread(s), best of {args.repeats}")
    print(f"{'model':<14} {'two prefills s':>15} {'one prefill s':>14} {'ratio':>6} {'same answers':>13} "
          f"{'max |loss diff|':>16}")
    for label, ctx in (("base", pm.disable_adapter), ("random LoRA", None)):
        times = {"two": [], "one": []}
        with (ctx() if ctx else _null()):
            for _ in range(args.repeats):
                for side, fn in (("two", two_prefills), ("one", one_prefill)):
                    t0 = time.perf_counter()
                    res = fn()
                    times[side].append(time.perf_counter() - t0)
                    if side == "two":
                        old = res
                    else:
                        new = res
        same = sum(a == b for a, b in zip(old[0], new[0]))
        diff = max(abs(a[0] / a[1] - b[0] / b[1]) for a, b in zip(old[1], new[1]))
        t2, t1 = min(times["two"]), min(times["one"])
        print(f"{label:<14} {t2:>15.2f} {t1:>14.2f} {t2 / t1:>5.2f}x {same:>6}/{len(examples):<6} {diff:>16.2e}")
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
