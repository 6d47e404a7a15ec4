"""CLAIR's detection on generated updates, from fixed seeds.

LoRA-shaped rounds (bench/clair_detection.py's :func:`lora_round`): clients drawn from
``spread10``'s planner ranks (32 x 4, 21, 10, 3, 3, 2, 2) in rounds of 4, 10 and 40; a rank-r
client's change is a few gradient steps on the first r components of the global adapter (or on
its own adapter), in round 1 or a later round, with one task gradient for all or each its own.
What must hold: at most 1 % of honest updates flagged in every geometry (judged whole, the rank-32
ones were flagged in a third to a half of 4-client rounds); random off-subspace updates caught at
precision and recall >= 0.95.

Fleets of CLAIR's own model (:func:`fleet`): clients share a low-rank input subspace and differ by
client-specific coefficients inside it, with heterogeneous ranks and noise off the subspace (client
counts 4 to 32, ranks 1 to 16, noise up to 20%, clients that agree or point their own ways); these
carry no start, so the whole update is judged.  What must hold: in clean fleets no honest client is
flagged; updates off the shared subspace (random, or half random) are caught at precision and
recall >= 0.95; in-subspace attacks are caught where the honest clients agree enough for them to
stand out, and the clients flagged alongside them stay rare.
"""

import random
import sys
from pathlib import Path

import pytest

from fedlora_edge.coordinator.methods.clair import clair_round

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after the packages: bench/export.py must not shadow export

from clair_detection import GEOMETRIES, covered_rank, fleet, judge, judge_lora  # noqa: E402

# one adapted module per client, of 32 x 128 (64 x 256 for rounds of 40, whose honest updates
# together would fill a smaller input space): each test a few seconds
SMALL = {"modules": ("l.q",), "n": 128, "m": 32}
WIDE = {"modules": ("l.q",)}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_rounds_of_4_from_spread_ranks_flag_at_most_1pct_of_honest_updates(geometry):
    t = judge_lora(40, 3, 4, geometry, None, **SMALL)["reach"]
    assert t["fp"] <= 0.01 * t["honest"], t


def test_judged_whole_the_same_rounds_flag_the_top_ranks():
    # what the test above guards against, on its draws: a rank-32 update among rank-2/3 ones has
    # directions nobody else trains, and judged whole they read as its own sparse block
    t = judge_lora(12, 3, 4, "shared", None, rules=("whole",), **SMALL)["whole"]
    assert t["fp_by_rank"][32] >= 0.25 * t["honest_by_rank"][32], t


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_rounds_of_10_and_40_flag_at_most_1pct_of_honest_updates(geometry):
    honest = fp = 0
    for k, rounds, dims in ((10, 4, SMALL), (40, 1, WIDE)):
        t = judge_lora(rounds, 5, k, geometry, None, **dims)["reach"]
        honest, fp = honest + t["honest"], fp + t["fp"]
    assert fp <= 0.01 * honest, (fp, honest)


@pytest.mark.parametrize("geometry", ["shared", "noniid", "later-noniid"])
@pytest.mark.parametrize("k, rounds", [(4, 40), (10, 4), (40, 1)])
def test_random_off_subspace_updates_in_lora_rounds_are_caught(geometry, k, rounds):
    t = judge_lora(rounds, 7, k, geometry, "random_update", **(WIDE if k == 40 else SMALL))["reach"]
    assert t["tp"] / (t["tp"] + t["fp"]) >= 0.95 and t["tp"] / (t["tp"] + t["fn"]) >= 0.95, t


@pytest.mark.parametrize("seed", [0, 1])
def test_clean_fleets_have_no_honest_client_flagged(seed):
    fp, _, _, _ = judge(25, seed, None)
    assert fp == 0


@pytest.mark.parametrize("attack", ["random_update", "mixed"])
def test_off_subspace_updates_are_caught_at_precision_and_recall_095(attack):
    fp, tp, fn, _ = judge(25, 11, attack)
    assert tp / (tp + fp) >= 0.95 and tp / (tp + fn) >= 0.95, (tp, fp, fn)


def test_a_low_rank_outlier_among_high_ranks_is_caught():
    # one weight for all blocks (from their mean stable rank) let a rank-1 outlier among rank-8
    # clients cost less in the low-rank part than in the sparse one, and pass unseen
    ranks = [8] * 9 + [1]
    ups = fleet(3, ranks, 4, 0.05, 0.0, bad={9})
    assert clair_round(ups, dict.fromkeys(ups, 1.0))["flagged"] == ["c09"]


def test_honest_clients_pointing_their_own_ways_are_not_flagged():
    # the case the agreement check once got wrong: non-IID clients (typical cosine near 0), where
    # a floor of "a share of the typical cosine" fell to "below 0" and flagged about half of them
    for seed in range(5):
        ranks = [random.Random(seed).randint(2, 8) for _ in range(10)]
        ups = fleet(seed, ranks, 8, 0.1, 0.0)
        res = clair_round(ups, dict.fromkeys(ups, 1.0))
        assert res["flagged"] == [], seed
        cos = [s["cosine"] for s in res["scores"].values()]
        assert min(cos) < 0  # some do point away from the others, and are honest


def test_in_subspace_attacks_are_caught_when_the_fleet_agrees():
    rng = random.Random(4)
    for attack in ("sign_flip", "scaled"):
        tp = fn = fp = 0
        for _ in range(12):
            k = rng.choice([8, 10, 16, 24])
            ranks = [rng.randint(1, 8) for _ in range(k)]
            bad = set(rng.sample(range(k), round(0.2 * k)))
            ups = fleet(rng.randrange(2**31), ranks, covered_rank(ranks, rng), rng.choice([0.0, 0.1]), 0.8, bad, attack)
            flagged = set(clair_round(ups, dict.fromkeys(ups, 1.0))["flagged"])
            bad_ids = {f"c{i:02d}" for i in bad}
            tp, fn, fp = tp + len(flagged & bad_ids), fn + len(bad_ids - flagged), fp + len(flagged - bad_ids)
        assert tp / (tp + fn) >= 0.85 and fp <= 1, (attack, tp, fn, fp)


def test_a_sign_flip_among_clients_that_do_not_agree_is_out_of_reach():
    # said plainly: when honest updates point their own ways, a negated one is one more direction
    # among theirs; what catches it would flag honest clients too
    ranks = [4] * 10
    ups = fleet(7, ranks, 8, 0.05, 0.0, bad={2, 5}, attack="sign_flip")
    assert clair_round(ups, dict.fromkeys(ups, 1.0))["flagged"] == []


def test_the_check_needs_a_spread_to_measure():
    # fewer than 8 clients: no robust spread to judge by, so only the decomposition judges
    ups = fleet(1, [4, 4, 4, 4], 4, 0.0, 0.8, bad={0}, attack="sign_flip")
    res = clair_round(ups, dict.fromkeys(ups, 1.0))
    assert res["flagged"] == [] and "cosine" not in res["scores"]["c00"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_many_more_fleets(seed):
    # wider draws reach the edges the default tests avoid (a 4-client fleet whose rank-13 client's
    # noise alone reads as just over half block-sparse): rare, and bounded here
    fp, _, _, honest = judge(100, 100 + seed, None)
    assert fp <= 0.005 * honest, (fp, honest)
    for attack in ("random_update", "mixed"):
        fp, tp, fn, _ = judge(60, 200 + seed, attack)
        assert tp / (tp + fp) >= 0.95 and tp / (tp + fn) >= 0.95, (attack, tp, fp, fn)
