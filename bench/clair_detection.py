"""CLAIR's detection on generated fleets that follow its model, over many draws: the honest
clients flagged in clean fleets, and precision and recall per attack and per level of agreement
between the honest clients.

    python bench/clair_detection.py [--fleets 200] [--seed 0]

A fleet: clients share a low-rank input subspace (a rank the fleet can see, :func:`covered_rank`)
and differ by client-specific coefficients inside it, with their own ranks (1 to 16), noise off
the subspace (0 to 20% of the norm) and ``agree`` in {0, 0.5, 0.8}: how far the clients share
coefficients (0: each its own, a non-IID fleet).  Client counts 4 to 32; 10, 20 or 30% of them
attacked in the attacked fleets.  ``random_update`` and ``mixed`` leave the subspace;
``sign_flip`` (``-B``) and ``scaled`` (``10 B``) stay in it.  tests/test_clair_fleets.py holds
the targets on fewer draws.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from coordinator.methods.clair import clair_round

MODULES = ("l.q", "l.v")
N_IN, N_OUT = 256, 64


def covered_rank(ranks: list[int], rng: random.Random) -> int:
    """A shared subspace rank the fleet can see: every client's directions also spanned by the
    others' (else the directions only one client trains are its own, and no method that looks for
    a shared subspace can tell them from contamination: see ``alone_at_top_rank``)."""
    rs = rng.randint(1, max(ranks))
    while rs > 1 and any(sum(min(r, rs) for j, r in enumerate(ranks) if j != i) < rs for i in range(len(ranks))):
        rs -= 1
    return rs


def fleet(seed: int, ranks: list[int], rs: int, noise: float, agree: float, bad=(), attack="random_update"):
    """``{client: {module: (A, B)}}``: honest client ``i`` has ``A_i = C_i Vᵀ`` plus noise off
    ``V`` (a share ``noise`` of its norm) and its own ``B_i``; ``agree`` in [0, 1) mixes common
    coefficients into every client's (0: each its own, a non-IID fleet).  Clients in ``bad`` send
    ``attack`` instead: ``random_update`` (a random row space, same norm), ``mixed`` (half random),
    ``sign_flip`` (``-B``), ``scaled`` (``10 B``)."""
    g = torch.Generator().manual_seed(seed)
    top = max(ranks)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    common = {}
    for mod in MODULES:
        v, _ = torch.linalg.qr(randn(N_IN, rs))
        common[mod] = (v.T, randn(top, rs), randn(N_OUT, top))
    out = {}
    for i, r in enumerate(ranks):
        f = {}
        for mod in MODULES:
            vt, c0, b0 = common[mod]
            a = (agree * c0[:r] + (1 - agree) * randn(r, rs)) @ vt
            b = agree * b0[:, :r] + (1 - agree) * randn(N_OUT, r)
            if noise:
                e = randn(r, N_IN)
                e = e - (e @ vt.T) @ vt
                a = a + noise * e * (a.norm() / e.norm())
            if i in bad:
                x = randn(r, N_IN)
                x = x * (a.norm() / x.norm())
                a = {"random_update": x, "mixed": 0.5 * a + 0.5 * x}.get(attack, a)
                b = {"sign_flip": -b, "scaled": 10 * b}.get(attack, b)
            f[mod] = (a, b)
        out[f"c{i:02d}"] = f
    return out


def draw(rng: random.Random, counts=(4, 6, 8, 10, 16, 24, 32), top=16):
    k = rng.choice(counts)
    lo = rng.choice([1, 2, 4])
    hi = rng.choice([r for r in (4, 8, 16) if r <= top] or [top])
    ranks = [rng.randint(lo, max(lo, hi)) for _ in range(k)]
    return k, ranks, covered_rank(ranks, rng), rng.choice([0.0, 0.05, 0.1, 0.2]), rng.choice([0.0, 0.0, 0.5, 0.8])


def judge(n_fleets: int, seed: int, attack: str | None, share=(0.1, 0.2, 0.3), agree: float | None = None,
          **draw_kw) -> tuple[int, int, int, int]:
    """Over ``n_fleets`` drawn fleets: (honest flagged, bad caught, bad missed, honest judged);
    ``agree`` fixes the honest clients' agreement instead of drawing it."""
    rng = random.Random(seed)
    fp = tp = fn = honest = 0
    for _ in range(n_fleets):
        k, ranks, rs, noise, drawn = draw(rng, **draw_kw)
        bad = set(rng.sample(range(k), max(1, round(rng.choice(share) * k)))) if attack else set()
        ups = fleet(rng.randrange(2**31), ranks, rs, noise, drawn if agree is None else agree, bad, attack or "none")
        flagged = set(clair_round(ups, dict.fromkeys(ups, 1.0))["flagged"])
        bad_ids = {f"c{i:02d}" for i in bad}
        fp += len(flagged - bad_ids)
        tp += len(flagged & bad_ids)
        fn += len(bad_ids - flagged)
        honest += k - len(bad)
    return fp, tp, fn, honest


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleets", type=int, default=200, help="fleets drawn per row (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("| fleets | honest agreement | attack | honest flagged / judged | precision | recall |")
    print("|---|---|---|---|---|---|")
    for agree in (0.0, 0.5, 0.8):
        for attack in (None, "random_update", "mixed", "sign_flip", "scaled"):
            fp, tp, fn, honest = judge(args.fleets, args.seed, attack, agree=agree)
            p = f"{tp / (tp + fp):.3f}" if tp + fp else "-"
            r = f"{tp / (tp + fn):.3f}" if tp + fn else "-"
            print(f"| {args.fleets} | {agree} | {attack or 'none (clean)'} | {fp} / {honest} | {p} | {r} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
