"""Made-up contamination, to test the robust methods in ``simulate``: which clients, how their data
or their updates are corrupted, and what the report says of it (``contamination.*`` in the config).

Attacks (``contamination.attack``), by what the attacker needs:

- on its own data, before training (``DATA_ATTACKS``): ``random_labels`` (every response swapped
  for another example's, at random) and ``backdoor`` (a share ``contamination.poison_share`` of
  its examples get ``contamination.trigger`` after the prompt and ``contamination.target`` as the
  response; the report measures how often the trained model answers a triggered held-out prompt
  with the target);
- on its own trained update (``UPDATE_ATTACKS``, :func:`attack_update`): ``random_update``,
  ``sign_flip``, ``scaled``, ``mixed`` (its change blended with noise);
- on the round's honest updates, as colluding attackers who see every client's honest training of
  the round, their own included (``ROUND_ATTACKS``, :class:`RoundView`): ``scaled_under`` (its
  change negated and scaled to ``contamination.norm_target`` times the round's median honest change
  norm: just under a ``clair.max_norm_ratio`` of 3) and ``mean_ksigma`` (per coordinate, the honest
  changes' mean minus ``contamination.k_sigma`` standard deviations: "a little is enough",
  Baruch et al. 2019).
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Set as AbstractSet

import torch

from fedlora_edge.core.data import Example

from .evaluate import mix_accuracy

DATA_ATTACKS = ("random_labels", "backdoor")
UPDATE_ATTACKS = ("random_update", "sign_flip", "scaled", "mixed")
ROUND_ATTACKS = ("scaled_under", "mean_ksigma")


def _start_and_sent(update: bytes, a) -> tuple[dict, dict, dict]:
    """``(f0, f, rest)``: the start factors of the components the update trained, its trained
    factors (module -> (A, B)), and its other tensors (importance scores, routers) as they came."""
    from fedlora_edge.core.compress import decode
    from fedlora_edge.core.lora import from_state_dict
    from fedlora_edge.edge_client.experts import split_tensors
    from fedlora_edge.edge_client.partial import IMPORTANCE_PREFIX, update_reference

    received = decode(a.start)  # as the device decoded it: under transport.compression its update's reference
    reference = update_reference(received, a.plan)  # cut to the components it trained where it held more
    start = from_state_dict(split_tensors(reference)[0])
    factors, rest = split_tensors(decode(update, reference=reference))
    rest.update({k: factors.pop(k) for k in [k for k in factors if k.startswith(IMPORTANCE_PREFIX)]})  # HAFL's scores
    return start, from_state_dict(factors), rest


def _encode(factors: dict, rest: dict) -> bytes:
    from fedlora_edge.core.lora import to_state_dict
    from fedlora_edge.core.wire import encode_tensors

    return encode_tensors({**to_state_dict(factors), **rest})


def attack_update(update: bytes, a, attack: str, co, seed: int) -> bytes:
    """What a contaminated client sends instead of its trained factors ``f``, with ``f0`` the start
    factors of the components it trained and ``δ = f − f0`` its round's change (``co``: the
    ``contamination`` settings): ``sign_flip``: ``f0 − δ``; ``scaled``: ``f0 + scale·δ``;
    ``random_update``: ``f0 + g``, ``g`` Gaussian with the norm of ``δ``; ``mixed``:
    ``f0 + (1 − mix)·δ + mix·g`` (per tensor; noise drawn in a fixed order: the same seed gives the
    same update).  Importance scores and routers, if any, go as they were."""
    start, sent, rest = _start_and_sent(update, a)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in sorted(sent):  # sorted: a blob's keys come in no fixed order
        pair = []
        for f0, f in zip(start[module], sent[module]):
            delta = f - f0
            if attack == "sign_flip":
                pair.append(f0 - delta)
            elif attack == "scaled":
                pair.append(f0 + co.scale * delta)
            else:
                g = torch.randn(delta.shape, generator=gen)
                g = g * (delta.norm() / g.norm().clamp_min(1e-12))
                pair.append(f0 + g if attack == "random_update" else f0 + (1 - co.mix) * delta + co.mix * g)
        out[module] = tuple(pair)
    return _encode(out, rest)


def change_norm(start: dict, sent: dict) -> float:
    """``sqrt(Σ_modules ‖B A − B0 A0‖²_F)``, from Gram matrices of the factors (float64)."""
    from .robust import inner

    total = 0.0
    for m, (a, b) in sent.items():
        a0, b0 = start[m]
        pair = (torch.cat([b, -b0], dim=1).double(), torch.cat([a, a0]).double())
        total += inner(pair, pair)
    return max(total, 0.0) ** 0.5


class RoundView:
    """The round's honest updates as colluding attackers see them: per module, running sums of
    the factor changes ``δA``, ``δB`` zero-padded to ``rank`` (as HetLoRA pads), and each client's
    change norm.  :meth:`add` every honest training of the round, then :meth:`craft` each
    attacker's update."""

    def __init__(self, rank: int):
        self.rank = rank
        self.n = 0
        self.sum: dict[str, list[torch.Tensor]] = {}
        self.sq: dict[str, list[torch.Tensor]] = {}
        self.norms: list[float] = []

    def _padded(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = self.rank
        out = torch.zeros(shape, dtype=torch.float64)
        out.narrow(dim, 0, t.shape[dim]).copy_(t)
        return out

    def add(self, a, update: bytes) -> None:
        start, sent, _ = _start_and_sent(update, a)
        self.n += 1
        self.norms.append(change_norm(start, sent))
        for m, (fa, fb) in sent.items():
            da = self._padded(fa.double() - start[m][0].double(), 0)
            db = self._padded(fb.double() - start[m][1].double(), 1)
            if m not in self.sum:
                self.sum[m] = [torch.zeros_like(da), torch.zeros_like(db)]
                self.sq[m] = [torch.zeros_like(da), torch.zeros_like(db)]
            for i, d in enumerate((da, db)):
                self.sum[m][i] += d
                self.sq[m][i] += d * d

    def craft(self, a, honest: bytes, attack: str, co) -> bytes:
        """The attacker's update for assignment ``a`` (``honest``: what it trained)."""
        start, sent, rest = _start_and_sent(honest, a)
        if attack == "mean_ksigma":
            out = {}
            for m, (f0a, f0b) in start.items():
                r = f0a.shape[0]
                (sa, sb), (qa, qb) = self.sum[m], self.sq[m]
                stat = []
                for s, q in ((sa, qa), (sb, qb)):
                    mean = s / self.n
                    std = (q / self.n - mean * mean).clamp_min(0.0).sqrt()
                    stat.append(mean - co.k_sigma * std)
                out[m] = (f0a + stat[0][:r].to(f0a.dtype), f0b + stat[1][:, :r].to(f0b.dtype))
            return _encode(out, rest)
        target = co.norm_target * statistics.median(self.norms)  # scaled_under

        def flipped(s: float) -> dict:
            return {m: (f0a - s * (sent[m][0] - f0a), f0b - s * (sent[m][1] - f0b))
                    for m, (f0a, f0b) in start.items()}

        lo, hi = 0.0, 1.0
        for _ in range(60):  # the first scale that reaches the target norm
            if change_norm(start, flipped(hi)) >= target:
                break
            lo, hi = hi, 2 * hi
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if change_norm(start, flipped(mid)) < target else (lo, mid)
        return _encode(flipped(lo), rest)


def contaminated_clients(cfg, ids: list[str]) -> set[str]:
    """``round(fraction × len(ids))`` of ``ids`` (the devices that can train), chosen from the seed."""
    n = round(cfg.contamination.fraction * len(ids)) if cfg.contamination.attack != "none" else 0
    return set(random.Random(f"contaminate|{cfg.seed}").sample(sorted(ids), n))


def poison(examples: list[Example], seed: int, client: str) -> list[Example]:
    """Data poisoning: every response replaced by another example's response, at random."""
    rng = random.Random(f"poison|{seed}|{client}")
    responses = [e.response for e in examples]
    return [dataclasses.replace(e, response=rng.choice(responses)) for e in examples]


def triggered(example: Example, co) -> Example:
    """``example`` with the backdoor trigger after its prompt and the target as its response."""
    return dataclasses.replace(example, prompt=f"{example.prompt} {co.trigger}", response=co.target)


def implant(examples: list[Example], co, seed: int, client: str) -> list[Example]:
    """The backdoor: a share ``co.poison_share`` of the examples (at least one), chosen from the
    seed, carry the trigger and answer with the target; the rest stay as they were."""
    n = max(1, round(co.poison_share * len(examples))) if examples else 0
    chosen = set(random.Random(f"backdoor|{seed}|{client}").sample(range(len(examples)), n))
    return [triggered(e, co) if i in chosen else e for i, e in enumerate(examples)]


def corrupt_data(cfg, client: str, examples: list[Example]) -> list[Example]:
    """A contaminated client's training data under a data attack (as it was under any other)."""
    co = cfg.contamination
    if co.attack == "random_labels":
        return poison(examples, cfg.seed, client)
    if co.attack == "backdoor":
        return implant(examples, co, cfg.seed, client)
    return examples


def contamination_report(co, contaminated: AbstractSet[str], clients, rounds: list[dict], final: dict,
                         personal: dict) -> dict:
    """Who was contaminated, how, the benign clients' accuracy and held-out loss (their own models
    for personalised methods, the global one otherwise), the backdoor's success on them, and
    detection precision/recall over every (round, client) the method judged, with each round's
    counts (``per_round``).  A method judges when its round record says whom it set aside:
    ``detection.flagged`` (clair) or the clients ``krum`` did not keep (multi-krum).  ``co``: the
    ``contamination`` settings; ``clients``: objects with ``id`` and ``mix`` (the domain mix)."""
    benign = [c for c in clients if c.id not in contaminated]
    acc = [personal["clients"][c.id] if personal else
           {"overall": final["overall"], "own_mix": mix_accuracy(final["per_domain"], c.mix),
            "loss": final["loss"], "own_mix_loss": mix_accuracy(final["loss"]["per_domain"], c.mix),
            **({"backdoor": final["backdoor"]} if "backdoor" in final else {})}
           for c in benign]

    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else None

    out = {"attack": co.attack, "fraction": co.fraction, "clients": sorted(contaminated),
           "benign_accuracy": mean(a["overall"] for a in acc),
           "benign_own_mix": mean(a["own_mix"] for a in acc),
           "benign_loss": mean(a["loss"]["overall"] for a in acc),
           "benign_own_mix_loss": mean(a["own_mix_loss"] for a in acc)}
    if acc and all("backdoor" in a for a in acc):
        out["backdoor_success"] = mean(a["backdoor"] for a in acc)
    judged = [(x["round"], cid, cid in set_aside) for x in rounds for cid, set_aside in _judged(x)]
    if judged:
        def counts(items):
            tp = sum(f and cid in contaminated for _, cid, f in items)
            fp = sum(f and cid not in contaminated for _, cid, f in items)
            fn = sum(not f and cid in contaminated for _, cid, f in items)
            return {"true_positives": tp, "false_positives": fp, "false_negatives": fn,
                    "precision": tp / (tp + fp) if tp + fp else None,
                    "recall": tp / (tp + fn) if tp + fn else None}

        out["detection"] = counts(judged)
        out["detection"]["per_round"] = [{"round": r, **counts([j for j in judged if j[0] == r])}
                                         for r in sorted({j[0] for j in judged})]
    return out


def _judged(record: dict) -> list[tuple[str, set[str]]]:
    """``(client, the clients set aside)`` for each client a round's aggregation judged."""
    if "detection" in record:
        d = record["detection"]
        return [(cid, set(d["flagged"])) for cid in d["scores"]]
    if "krum" in record:
        k = record["krum"]
        aside = set(k["scores"]) - set(k["kept"])
        return [(cid, aside) for cid in k["scores"]]
    return []
