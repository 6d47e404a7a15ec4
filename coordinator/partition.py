"""Splitting examples across clients: by domain (with a skew), Dirichlet(α) over domains, IID.

Built-in tasks are generated per client from the domain mix (so each client's data is distinct);
user data is split from a fixed pool.  Everything is deterministic in the seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from edge_client.data import Example, domain_counts, generate_task, load_jsonl


def domain_mix(n_clients: int, domains: Sequence[str], partition: str, *, skew: float, alpha: float,
               seed: int) -> list[dict[str, float]]:
    """Per client, the fraction of its data from each domain.

    ``by_domain``: client i's main domain is ``domains[i % D]`` with fraction ``skew``, the rest
    spread evenly over the other domains.  ``dirichlet``: proportions drawn from Dir(α·1).
    ``iid``: uniform.
    """
    d = len(domains)
    if partition == "iid" or d == 1:
        return [{x: 1.0 / d for x in domains} for _ in range(n_clients)]
    if partition == "by_domain":
        out = []
        for i in range(n_clients):
            rest = (1.0 - skew) / (d - 1)
            out.append({x: (skew if j == i % d else rest) for j, x in enumerate(domains)})
        return out
    if partition == "dirichlet":
        rng = np.random.default_rng(seed)
        return [dict(zip(domains, map(float, rng.dirichlet([alpha] * d)))) for _ in range(n_clients)]
    raise ValueError(f"unknown partition '{partition}'")


def counts_from_mix(mix: dict[str, float], n: int) -> dict[str, int]:
    """Largest-remainder rounding of ``n × mix`` (sums to exactly n)."""
    raw = {k: v * n for k, v in mix.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def builtin_client_data(mixes: Sequence[dict[str, float]], n_per_client: int, seed: int) -> list[list[Example]]:
    """Generate each client's training examples from its domain mix."""
    out = []
    for i, mix in enumerate(mixes):
        exs: list[Example] = []
        for task, k in counts_from_mix(mix, n_per_client).items():
            if k:
                exs.extend(generate_task(task, k, seed=seed * 1000 + i, split="train"))
        random.Random(f"shuffle|{seed}|{i}").shuffle(exs)
        out.append(exs)
    return out


def split_pool(pool: Sequence[Example], mixes: Sequence[dict[str, float]], n_per_client: int,
               seed: int) -> list[list[Example]]:
    """Deal user examples to clients following their domain mixes, without replacement while the
    pool lasts (then with replacement); a client never gets an empty set."""
    rng = random.Random(f"pool|{seed}")
    by_domain: dict[str, list[Example]] = {}
    for ex in pool:
        by_domain.setdefault(ex.domain, []).append(ex)
    for v in by_domain.values():
        rng.shuffle(v)
    cursor = dict.fromkeys(by_domain, 0)
    out = []
    for mix in mixes:
        exs = []
        for dom, k in counts_from_mix(mix, n_per_client).items():
            items = by_domain.get(dom, [])
            for _ in range(k if items else 0):
                exs.append(items[cursor[dom] % len(items)])
                cursor[dom] += 1
        if not exs:
            exs = [pool[rng.randrange(len(pool))]]
        out.append(exs)
    return out


def build_data(cfg, n_clients: int) -> tuple[list[list[Example]], list[dict], list[Example]]:
    """(per-client training examples, per-client domain mix, held-out eval examples)."""
    d = cfg.data
    if d.train_file:
        pool = load_jsonl(d.train_file)
        evals = load_jsonl(str(d.eval_file))
        domains = sorted(domain_counts(pool))
        mixes = domain_mix(n_clients, domains, d.partition, skew=d.skew, alpha=d.alpha, seed=cfg.seed)
        return split_pool(pool, mixes, d.samples_per_client, cfg.seed), mixes, evals
    domains = list(d.tasks)
    mixes = domain_mix(n_clients, domains, d.partition, skew=d.skew, alpha=d.alpha, seed=cfg.seed)
    train = builtin_client_data(mixes, d.samples_per_client, cfg.seed)
    evals = [ex for t in domains for ex in generate_task(t, d.eval_per_domain, seed=cfg.seed, split="eval")]
    return train, mixes, evals
