"""Splitting examples across clients: by domain (with a skew), Dirichlet(α) over domains, IID.

Built-in tasks are generated per client from the domain mix (so each client's data is distinct).
User data is either per device (a folder of ``<device>.jsonl``, or a ``device`` column), used as
it is, or a pool dealt to the clients by the same mixes without ever using an example twice.
Everything is deterministic in the seed.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from fedlora_edge.core.data import Example, domain_counts, generate_task, is_eval_prompt, with_system

from .errors import ConfigError

K = TypeVar("K", bound=Hashable)  # what a mix is over: domains, or clients


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


def counts_from_mix(mix: Mapping[K, float], n: int) -> dict[K, int]:
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
               seed: int, notes: list[str] | None = None) -> list[list[Example]]:
    """Deal user examples to clients following their domain mixes, at most ``n_per_client`` each,
    never one example twice (to one client or to two).  Where a domain has fewer examples than the
    clients ask of it, each gets its share of what there is, and ``notes`` says so."""
    rng = random.Random(f"pool|{seed}")
    by_domain: dict[str, list[Example]] = {}
    for ex in pool:
        by_domain.setdefault(ex.domain, []).append(ex)
    for v in by_domain.values():
        rng.shuffle(v)
    wants = [counts_from_mix(mix, n_per_client) for mix in mixes]
    out: list[list[Example]] = [[] for _ in mixes]
    short = []
    for dom, items in by_domain.items():
        asked = [w.get(dom, 0) for w in wants]
        total = sum(asked)
        if total > len(items):
            short.append(f"'{dom}' has {len(items)} for {total} asked")
            shares = counts_from_mix({i: a / total for i, a in enumerate(asked)}, len(items)) if total else {}
            asked = [shares.get(i, 0) for i in range(len(asked))]
        cursor = 0
        for i, k in enumerate(asked):
            out[i].extend(items[cursor: cursor + k])
            cursor += k
    for i, exs in enumerate(out):
        random.Random(f"shuffle|{seed}|{i}").shuffle(exs)
    if short and notes is not None:
        notes.append(f"the data cannot give {len(mixes)} clients {n_per_client} examples each without using one "
                     f"twice ({'; '.join(short)}): each client gets its share of what there is, "
                     f"{min(map(len, out))}-{max(map(len, out))} examples (data.samples_per_client is the most)")
    return out


def hold_out(pool: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(train, eval) of a pool without its own held-out set: one prompt in five, by a hash of the
    prompt (the same rule as the built-in tasks), so the split does not depend on the seed."""
    train = [ex for ex in pool if not is_eval_prompt(ex.prompt)]
    return train, [ex for ex in pool if is_eval_prompt(ex.prompt)]


def _mix_of(examples: Sequence[Example], domains: Sequence[str]) -> dict[str, float]:
    counts = domain_counts(examples)
    n = max(1, sum(counts.values()))
    return {d: counts.get(d, 0) / n for d in domains}


def _per_device(examples_of: dict[str, list[Example]], ids: Sequence[str], where: str,
                notes: list[str]) -> list[list[Example]]:
    missing = [c for c in ids if c not in examples_of]
    if missing:
        raise ConfigError(f"{where}: no data for device(s) {', '.join(missing)} of the fleet "
                          f"(the data names {', '.join(sorted(examples_of)) or 'none'})")
    extra = sorted(set(examples_of) - set(ids))
    if extra:
        notes.append(f"{where}: data of {len(extra)} device(s) not in the fleet is not used: {', '.join(extra)}")
    return [examples_of[c] for c in ids]


def cut_note(train: Sequence[tuple[int, int]], held_out: Sequence[tuple[int, int]], max_len: int) -> str | None:
    """What a run says of its examples longer than ``max_len`` tokens, given each one's ``(prompt,
    response)`` token counts (:func:`fedlora_edge.core.data.example_lengths`): training cuts them from the
    left of the prompt (:func:`fedlora_edge.core.data.encode_examples`), and a response that alone fills
    ``max_len`` leaves no prompt and is cut at its end; evaluation cuts the same way.  How many of
    the training and of the held-out examples, how many lose their whole prompt, and the length
    that would keep them all; None when none is cut."""
    longer = [sum(p + r > max_len for p, r in rows) for rows in (train, held_out)]
    if not any(longer):
        return None
    every = [*train, *held_out]
    whole = sum(r >= max_len for _, r in every)
    longest = max(p + r for p, r in every)
    return (f"{longer[0]} of {len(train)} training examples and {longer[1]} of {len(held_out)} held-out ones are "
            f"longer than train.max_seq_len {max_len} tokens (chat-formatted prompt and response) and are cut from "
            "the left of the prompt, in training and in evaluation alike"
            + (f"; {whole} of them have a response that alone fills it, so they keep none of their prompt and "
               "their response is cut at its end" if whole else "")
            + f"; the longest has {longest} tokens: train.max_seq_len {longest} would keep them all")


def build_data(cfg, ids: Sequence[str], notes: list[str] | None = None
               ) -> tuple[list[list[Example]], list[dict], list[Example]]:
    """(per-client training examples, per-client domain mix, held-out eval examples) for the
    fleet's devices ``ids``; what a user should know about the split is appended to ``notes``."""
    d = cfg.data
    notes = notes if notes is not None else []
    if not d.user_data:
        domains = list(d.tasks)
        mixes = domain_mix(len(ids), domains, d.partition, skew=d.skew, alpha=d.alpha, seed=cfg.seed)
        train = builtin_client_data(mixes, d.samples_per_client, cfg.seed)
        held_out = [ex for t in domains for ex in generate_task(t, d.eval_per_domain, seed=cfg.seed, split="eval")]
        return train, mixes, held_out
    from .userdata import load_user_data

    pool, evals, per_device, where = load_user_data(d)
    if evals is None:
        if per_device is not None:
            split = {c: hold_out(v) for c, v in per_device.items()}
            per_device = {c: tr for c, (tr, _) in split.items()}
            evals = [ex for _, ev in split.values() for ex in ev]
        else:
            pool, evals = hold_out(pool)
        notes.append(f"{where}: no held-out set given (data.eval_file or data.eval_split): {len(evals)} examples "
                     "(one prompt in five, by a hash of the prompt) are held out for evaluation")
    if not evals:
        raise ConfigError(f"{where}: the held-out set is empty; give data.eval_file or data.eval_split")
    if per_device is None and any(ex.device for ex in pool):
        per_device = {}
        for ex in pool:
            if not ex.device:
                raise ConfigError(f"{where}: some rows name their device and some do not; name it in every row "
                                  "(or in none, to split the pool by data.partition)")
            per_device.setdefault(ex.device, []).append(ex)
    evals = with_system(evals, d.system_prompt)
    if per_device is not None:
        train = [with_system(v, d.system_prompt) for v in _per_device(per_device, ids, where, notes)]
        domains = sorted({ex.domain for v in train for ex in v} | {ex.domain for ex in evals})
        return train, [_mix_of(v, domains) for v in train], evals
    domains = sorted(domain_counts(pool))
    mixes = domain_mix(len(ids), domains, d.partition, skew=d.skew, alpha=d.alpha, seed=cfg.seed)
    train = split_pool(with_system(pool, d.system_prompt), mixes, d.samples_per_client, cfg.seed, notes)
    return train, mixes, evals
