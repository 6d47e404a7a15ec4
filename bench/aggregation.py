"""FlexLoRA's (and CLAIR's) re-factorisation: the dense SVD of ΔW against the factored one.

    python bench/aggregation.py [--clients 8,128] [--rank 32] [--threads 1]

SmolLM2-135M's adapted shapes with LoRA on q_proj and v_proj (30 layers: q 576x576, v 576x192,
60 matrices), K clients of rank ``--rank`` with random factors.  Both sides run in this process
on the same tensors:

- dense: per module ``ΔW = Σ_k p_k B_k A_k`` formed client by client, then its SVD (what
  FlexLoRA did before);
- factored: ``[p_1 B_1 ... p_K B_K]`` and ``[A_1; ...; A_K]`` stacked, reduced QR of each and the
  SVD of the small core (``fedlora_edge.coordinator.aggregate.product_svd_factors``), exact; where the stacks
  are as wide as ΔW (K x r >= 576) one matrix product forms ΔW and its SVD is taken.

Prints per K the seconds of each (best of 3), the ratio, and the largest difference of the rank-R
results ``B A`` relative to the largest entry.

A second table: FedIT's averaging (``average_components``, every client training every
component) against a plain ``torch.add_`` loop over the same tensors (the bandwidth floor of any
weighted sum), and decoding + validating the same updates from their safetensors bytes
(``decode_tensors`` + ``validate_update``), as MB of update per second and as a ratio to the add loop.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora_edge.coordinator.aggregate import (
    Contribution,
    product_svd_factors,
    stacked_factors,
    svd_factors,
    weighted_delta_w,
)
from fedlora_edge.core.lora import ClientPlan, ModulePlan

SHAPES = [(f"model.layers.{i}.self_attn.{p}", n_in, n_out) for i in range(30)
          for p, n_in, n_out in (("q_proj", 576, 576), ("v_proj", 576, 192))]


def contributions(k: int, rank: int, seed: int = 0) -> list[Contribution]:
    gen = torch.Generator().manual_seed(seed)
    plan = ClientPlan({m: ModulePlan(tuple(range(rank))) for m, _, _ in SHAPES}, 2.0)
    return [Contribution(f"c{i}", plan, {m: (torch.randn(rank, n_in, generator=gen) * 0.05,
                                             torch.randn(n_out, rank, generator=gen) * 0.01)
                                         for m, n_in, n_out in SHAPES}, float(10 + i)) for i in range(k)]


def dense(contribs, rank):
    return {m: svd_factors(weighted_delta_w(contribs, m), rank) for m, _, _ in SHAPES}


def factored(contribs, rank):
    return {m: product_svd_factors(*stacked_factors(contribs, m), rank) for m, _, _ in SHAPES}


def best_of(fn, *args, repeat=3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="8,128")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| clients K | K x r | dense s | factored s | speed-up | max rel. diff of B A |")
    print("|---|---|---|---|---|---|")
    for k in (int(x) for x in args.clients.split(",")):
        contribs = contributions(k, args.rank)
        td, d = best_of(dense, contribs, args.rank)
        tf, f = best_of(factored, contribs, args.rank)
        diff = max(((d[m][1] @ d[m][0]) - (f[m][1] @ f[m][0])).abs().max().item()
                   / (d[m][1] @ d[m][0]).abs().max().item() for m, _, _ in SHAPES)
        print(f"| {k} | {k * args.rank} | {td:.3f} | {tf:.3f} | {td / tf:.1f}x | {diff:.1e} |")
    print()
    print("| clients K | MB of updates | add_ loop MB/s | averaging MB/s | ratio | decode+validate MB/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for k in (int(x) for x in args.clients.split(",")):
        averaging_row(k, args.rank)
    return 0


def averaging_row(k: int, rank: int) -> None:
    from fedlora_edge.coordinator.aggregate import average_components
    from fedlora_edge.coordinator.validate import validate_update
    from fedlora_edge.core.lora import to_state_dict
    from fedlora_edge.core.wire import decode_tensors, encode_tensors

    contribs = contributions(k, rank, seed=1)
    glob = contributions(1, rank, seed=2)[0].factors
    mb = sum(a.numel() + b.numel() for c in contribs for a, b in c.factors.values()) * 4 / 1e6

    def add_loop():
        acc = {m: (torch.zeros_like(a), torch.zeros_like(b)) for m, (a, b) in glob.items()}
        for c in contribs:
            for m, (a, b) in c.factors.items():
                acc[m][0].add_(a)
                acc[m][1].add_(b)
        return acc

    blobs = [encode_tensors(to_state_dict(c.factors)) for c in contribs]
    shapes = {key: tuple(t.shape) for key, t in to_state_dict(contribs[0].factors).items()}

    def decode_validate():
        for i, blob in enumerate(blobs):
            validate_update(f"c{i}", decode_tensors(blob), shapes)

    t_add, _ = best_of(add_loop)
    t_avg, _ = best_of(average_components, glob, contribs, "trainers")
    t_dec, _ = best_of(decode_validate)
    print(f"| {k} | {mb:.0f} | {mb / t_add:.0f} | {mb / t_avg:.0f} | {t_add / t_avg:.2f}x | {mb / t_dec:.0f} | "
          f"{t_add / t_dec:.2f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
