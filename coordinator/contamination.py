"""Made-up contamination, to test the robust methods in ``simulate``: which clients, how their data
or their updates are corrupted, and what the report says of it (``contamination.*`` in the config)."""

from __future__ import annotations

import dataclasses
import random

import torch

from edge_client.data import Example

from .evaluate import mix_accuracy

UPDATE_ATTACKS = ("random_update", "sign_flip", "scaled")


def attack_update(update: bytes, a, attack: str, scale: float, seed: int) -> bytes:
    """What a contaminated client sends instead of its trained factors ``f``, with ``f0`` the start
    factors of the components it trained and ``δ = f − f0`` its round's change: ``sign_flip``:
    ``f0 − δ``; ``scaled``: ``f0 + scale·δ``; ``random_update``: ``f0 + g``, ``g`` Gaussian with the
    norm of ``δ`` (per tensor, drawn in key order: the same seed gives the same update).  Importance
    scores and routers, if any, go as they were."""
    from edge_client.experts import split_tensors
    from edge_client.lora import from_state_dict, slice_factors, to_state_dict
    from edge_client.partial import held_count
    from edge_client.wire import decode_tensors, encode_tensors

    start = from_state_dict(split_tensors(decode_tensors(a.start))[0])
    if held_count(a.plan) is not None:  # it held all R components and sends the ones it trained
        start = slice_factors(start, a.plan)
    sent = decode_tensors(update)
    gen = torch.Generator().manual_seed(seed)
    for key, f0 in sorted(to_state_dict(start).items()):  # sorted: a blob's keys come in no fixed order
        delta = sent[key] - f0
        if attack == "sign_flip":
            sent[key] = f0 - delta
        elif attack == "scaled":
            sent[key] = f0 + scale * delta
        else:
            g = torch.randn(delta.shape, generator=gen)
            sent[key] = f0 + g * (delta.norm() / g.norm().clamp_min(1e-12))
    return encode_tensors(sent)


def contaminated_clients(cfg, ids: list[str]) -> set[str]:
    """``round(fraction × len(ids))`` of ``ids`` (the devices that can train), chosen from the seed."""
    n = round(cfg.contamination.fraction * len(ids)) if cfg.contamination.attack != "none" else 0
    return set(random.Random(f"contaminate|{cfg.seed}").sample(sorted(ids), n))


def poison(examples: list[Example], seed: int, client: str) -> list[Example]:
    """Data poisoning: every response replaced by another example's response, at random."""
    rng = random.Random(f"poison|{seed}|{client}")
    responses = [e.response for e in examples]
    return [dataclasses.replace(e, response=rng.choice(responses)) for e in examples]


def contamination_report(cfg, contaminated: set[str], clients, rounds: list[dict], final: dict,
                         personal: dict) -> dict:
    """Who was contaminated, how, the benign clients' accuracy, and detection precision/recall
    over every (round, client) the method judged."""
    co = cfg.contamination
    benign = [c for c in clients if c.id not in contaminated]
    acc = [personal["clients"][c.id] if personal else
           {"overall": final["overall"], "own_mix": mix_accuracy(final["per_domain"], c.mix)} for c in benign]
    out = {"attack": co.attack, "fraction": co.fraction, "clients": sorted(contaminated),
           "benign_accuracy": sum(a["overall"] for a in acc) / len(acc) if acc else None,
           "benign_own_mix": sum(a["own_mix"] for a in acc) / len(acc) if acc else None}
    judged = [(x["round"], cid, cid in x["detection"]["flagged"]) for x in rounds
              if "detection" in x for cid in x["detection"]["scores"]]
    if judged:
        tp = sum(f and cid in contaminated for _, cid, f in judged)
        fp = sum(f and cid not in contaminated for _, cid, f in judged)
        fn = sum(not f and cid in contaminated for _, cid, f in judged)
        out["detection"] = {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
                            "precision": tp / (tp + fp) if tp + fp else None,
                            "recall": tp / (tp + fn) if tp + fn else None}
    return out
