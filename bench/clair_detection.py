"""CLAIR's detection on generated updates, over many draws: honest clients flagged in clean rounds,
and precision and recall of attacks.

    python bench/clair_detection.py [--fleets 200] [--rounds 40] [--seed 0] [--only lora|limit|fleets]

Two kinds of draws.

**LoRA-shaped rounds** (:func:`lora_round`, the first table, ``--only lora``): what CLAIR sees in
a run.  A round samples clients from ``spread10``'s planner ranks (32, 32, 32, 32, 21, 10, 3, 3,
2, 2); a rank-r client starts from the first r components of a global adapter (rank 32) or from
its own, takes 2 gradient steps on both factors, and sends its change.  Geometries: ``shared``
(round 1: B = 0, one task gradient for all plus batch noise), ``noniid`` (round 1, each client's
gradient its own task's, on inputs that lean their own way), ``later`` and ``later-noniid`` (the
global B is non-zero, so A's step moves the update off the client's A rows; every other client
starts from its own adapter).  ``random_update`` replaces a client's change by one with random
rows (same norm), ``mixed`` by half of each.  The table compares the rule that judges whole
updates (``clair.reach: false``, the old one) with the one that judges each update off its own
A rows (the default).  The second table (``--only limit``) takes later rounds of 4 to where they
break the new rule: a larger global B under sign steps (Adam's first steps), where an honest
update's part off its A rows grows.

**Fleets of CLAIR's own model** (:func:`fleet`, the last table, ``--only fleets``): clients share a
low-rank input subspace (a rank the fleet can see, :func:`covered_rank`) and differ by
client-specific coefficients inside it, with their own ranks (1 to 16), noise off the subspace (0
to 20% of the norm) and ``agree`` in {0, 0.5, 0.8}: how far the clients share coefficients (0:
each its own, a non-IID fleet).  Client counts 4 to 32; 10, 20 or 30% of them attacked in the
attacked fleets.  ``random_update`` and ``mixed`` leave the subspace; ``sign_flip`` (``-B``) and
``scaled`` (``10 B``) stay in it.  These updates carry no start, so the whole update is judged.

tests/test_clair_fleets.py holds the targets on fewer draws.
"""

from __future__ import annotations

import argparse
import math
import random
import sys

import torch

from fedlora_edge.coordinator.methods.clair import clair_round, round_change

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


SPREAD10 = (32, 32, 32, 32, 21, 10, 3, 3, 2, 2)  # `fedlora plan --fleet spread10 --method clair`
GEOMETRIES = ("shared", "noniid", "later", "later-noniid")
TOP = 32  # the global adapter's rank (lora.max_rank)


def _orth_rows(x: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(x.T)
    return q.T


def lora_round(seed: int, ranks: list[int], geometry: str = "shared", bad=(), attack: str = "random_update",
               modules=MODULES, steps: int = 2, step: str = "sgd", b_scale: float = 0.5, noise: float = 0.5,
               lr: float = 0.05, n: int = N_IN, m: int = N_OUT):
    """One round of LoRA-shaped updates: ``(updates, reach)`` with ``updates[client][module]`` the
    change ``B A − B0 A0`` in factors (:func:`round_change`) and ``reach[client][module]`` the ``A0``
    it started from, for clients ``c00, c01, ...`` of the given ranks.

    Per module (``m × n``, 64 x 256 by default): inputs spread over a random basis ``V`` with a decaying spectrum
    ``(1+i)^-0.75``; the task's gradient ``G = N diag(spec) Vᵀ`` (``N`` Gaussian); a client's
    gradient at each step is its task's plus batch noise of ``noise`` times its norm.  ``geometry``:
    ``shared``/``noniid`` are round 1 (global A as peft initialises it, uniform in ±1/sqrt(n), and
    B = 0); ``noniid`` gives every client its own task, ``0.3 G + N' diag(spec) W_kᵀ`` on inputs
    ``W_k`` that lean their own way.  ``later*``: the global A has orthonormal rows (as after a
    refactor) and ``B = U diag(b_scale (1+j)^-1/2)``; every other client starts from its own adapter,
    its A rows drifted from the global's by 0.2.  A rank-r client starts from ``A[:r], B[:, :r]`` and
    takes ``steps`` steps on both factors: ``step="sgd"`` moves each factor by ``lr`` along its
    gradient normalised by ``‖g‖``; ``"sign"`` by ``lr`` in Frobenius norm along the gradient's sign
    (what Adam's first steps do).  Clients in ``bad`` send ``attack`` instead: ``random_update``
    (the change's A factor replaced by random rows, same norm of the change) or ``mixed`` (half
    the honest change, half such a random one)."""
    g = torch.Generator().manual_seed(seed)
    later, noniid = geometry.startswith("later"), geometry.endswith("noniid")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry must be one of {GEOMETRIES}, not {geometry!r}")

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    spec = torch.diag((1.0 + torch.arange(n, dtype=torch.float64)) ** -0.75)
    updates: dict = {}
    reach: dict = {}
    for mod in modules:
        v, _ = torch.linalg.qr(randn(n, n))
        task = randn(m, n) @ spec @ v.T
        if later:
            a_g = _orth_rows(randn(TOP, n))
            u, _ = torch.linalg.qr(randn(m, TOP))
            b_g = u * (b_scale * (1.0 + torch.arange(TOP, dtype=torch.float64)) ** -0.5)
        else:
            a_g = (2 * torch.rand(TOP, n, generator=g, dtype=torch.float64) - 1) / math.sqrt(n)
            b_g = torch.zeros(m, TOP, dtype=torch.float64)
        for i, r in enumerate(ranks):
            a0, b0 = a_g[:r].clone(), b_g[:, :r].clone()
            if later and i % 2:
                a0 = _orth_rows(a0 + 0.2 * randn(r, n) / math.sqrt(n))
            own = task
            if noniid:
                w, _ = torch.linalg.qr(v + 0.7 * randn(n, n) / math.sqrt(n))
                own = 0.3 * task + randn(m, n) @ spec @ w.T
            a, b = a0, b0
            for _ in range(steps):
                batch = randn(m, n) @ spec @ v.T
                grad = own + noise * float(own.norm()) * batch / float(batch.norm())
                ga, gb = b.T @ grad, grad @ a.T
                if step == "sign":
                    a = a - lr * torch.sign(ga) * (ga.abs() > 1e-12) / math.sqrt(ga.numel())
                    b = b - lr * torch.sign(gb) / math.sqrt(gb.numel())
                else:
                    a, b = a - lr * ga / float(grad.norm()), b - lr * gb / float(grad.norm())
            change = round_change({mod: (a, b)}, {mod: (a0, b0)})[mod]
            if i in bad:
                ca, cb = change
                x = randn(*ca.shape)
                x = x * (float((cb @ ca).norm()) / float((cb @ x).norm()))
                change = (x, cb) if attack == "random_update" else (torch.cat([ca, x]), torch.cat([cb, cb], dim=1) / 2)
            updates.setdefault(f"c{i:02d}", {})[mod] = change
            reach.setdefault(f"c{i:02d}", {})[mod] = a0
    return updates, reach


def judge_lora(n_rounds: int, seed: int, k: int, geometry: str, attack: str | None, rules=("reach",),
               share: float = 0.25, ranks=SPREAD10, **kw) -> dict[str, dict]:
    """Over ``n_rounds`` rounds of ``k`` clients drawn from ``ranks`` (without replacement when
    ``k <= len(ranks)``, else with), a quarter of them attacked when ``attack``: per rule
    (``"reach"``: judged off each client's own A rows; ``"whole"``: the whole update), ``{"fp",
    "tp", "fn", "honest", "fp_by_rank", "honest_by_rank", "off"}`` (``off``: with ``"reach"``, each
    honest update's share of its norm off its own A rows)."""
    rng = random.Random(seed)
    out = {rule: {"fp": 0, "tp": 0, "fn": 0, "honest": 0, "fp_by_rank": {}, "honest_by_rank": {}, "off": []}
           for rule in rules}
    for _ in range(n_rounds):
        drawn = rng.sample(ranks, k) if k <= len(ranks) else [rng.choice(ranks) for _ in range(k)]
        bad = set(rng.sample(range(k), max(1, round(share * k)))) if attack else set()
        ups, reach = lora_round(rng.randrange(2**31), drawn, geometry, bad, attack or "random_update", **kw)
        bad_ids = {f"c{i:02d}" for i in bad}
        for rule in rules:
            res = clair_round(ups, dict.fromkeys(ups, 1.0), reach=reach if rule == "reach" else None)
            flagged = set(res["flagged"])
            t = out[rule]
            t["fp"] += len(flagged - bad_ids)
            t["tp"] += len(flagged & bad_ids)
            t["fn"] += len(bad_ids - flagged)
            for i, r in enumerate(drawn):
                c = f"c{i:02d}"
                if c not in bad_ids:
                    t["honest"] += 1
                    t["honest_by_rank"][r] = t["honest_by_rank"].get(r, 0) + 1
                    t["fp_by_rank"][r] = t["fp_by_rank"].get(r, 0) + (c in flagged)
                    if "in_reach" in res["scores"][c]:
                        t["off"].append(math.sqrt(max(0.0, 1 - res["scores"][c]["in_reach"] ** 2)))
    return out


def _by_rank(t: dict) -> str:
    return ", ".join(f"{r}: {t['fp_by_rank'][r]}/{t['honest_by_rank'][r]}" for r in sorted(t["honest_by_rank"], reverse=True))


def _pr(t: dict) -> tuple[str, str]:
    p = f"{t['tp'] / (t['tp'] + t['fp']):.3f}" if t["tp"] + t["fp"] else "-"
    r = f"{t['tp'] / (t['tp'] + t['fn']):.3f}" if t["tp"] + t["fn"] else "-"
    return p, r


def lora_tables(rounds: int, seed: int) -> None:
    """Old rule vs new on LoRA-shaped rounds of 4, 10 and 40 clients, every geometry and attack."""
    print("LoRA-shaped rounds from spread10's ranks: whole update judged (old rule) vs off its own A rows (new)\n")
    print("| clients per round | rounds | geometry | attack | honest flagged, old (per rank) | honest flagged, new "
          "(per rank) | precision old / new | recall old / new |")
    print("|---|---|---|---|---|---|---|---|")
    for k, n_rounds in ((4, rounds), (10, max(1, rounds // 4)), (40, max(1, rounds // 20))):
        for geometry in GEOMETRIES:
            for attack in (None, "random_update", "mixed"):
                res = judge_lora(n_rounds, seed, k, geometry, attack, rules=("whole", "reach"))
                old, new = res["whole"], res["reach"]
                (po, ro), (pn, rn) = _pr(old), _pr(new)
                print(f"| {k} | {n_rounds} | {geometry} | {attack or 'none (clean)'} | {old['fp']}/{old['honest']} "
                      f"({_by_rank(old)}) | {new['fp']}/{new['honest']} ({_by_rank(new)}) | {po} / {pn} | {ro} / {rn} |",
                      flush=True)


def limit_table(rounds: int, seed: int) -> None:
    """The new rule in later rounds of 4 under sign steps, as the global B grows: the honest
    updates' share off their own rows grows with it, and so do the flags."""
    print("Where the new rule breaks: later rounds of 4 clients, sign steps, a larger global B\n")
    print("| geometry | global B scale | honest share off own rows, median (max) | honest flagged, new (per rank) "
          "| precision / recall, random_update |")
    print("|---|---|---|---|---|")
    for geometry in ("later", "later-noniid"):
        for b_scale in (0.5, 1.0, 2.0):
            clean = judge_lora(rounds, seed, 4, geometry, None, step="sign", b_scale=b_scale)["reach"]
            hit = judge_lora(rounds, seed, 4, geometry, "random_update", step="sign", b_scale=b_scale)["reach"]
            p, r = _pr(hit)
            off = sorted(clean["off"])
            print(f"| {geometry} | {b_scale} | {off[len(off) // 2]:.2f} ({off[-1]:.2f}) | {clean['fp']}/{clean['honest']} "
                  f"({_by_rank(clean)}) | {p} / {r} |", flush=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fleets", type=int, default=200, help="fleets drawn per row (default 200)")
    ap.add_argument("--rounds", type=int, default=40,
                    help="LoRA-shaped rounds of 4 clients per row (default 40; a quarter of that of 10, a 20th of 40)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("lora", "limit", "fleets"), help="print only this table")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.only in (None, "lora"):
        lora_tables(args.rounds, args.seed)
    if args.only in (None, "limit"):
        print()
        limit_table(args.rounds, args.seed)
    if args.only not in (None, "fleets"):
        return 0
    print("\nFleets of CLAIR's own model (no start: the whole update is judged)\n")
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
