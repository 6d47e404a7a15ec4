"""Device-level DP's method-independent pieces: the clip holds, the noise has the standard deviation
it claims, Poisson sampling samples at its rate, and the accountant agrees with an independent one."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedlora_edge.coordinator.privacy import (
    Accountant,
    DPSettings,
    PrivacyError,
    adaptive_clip,
    clip_update,
    epsilon_for,
    gaussian_noise,
    no_amplification_epsilon,
    poisson_sample,
    update_norm,
)


def test_an_update_of_norm_100_moves_the_sum_by_at_most_the_clip():
    torch.manual_seed(0)
    delta = {"a": torch.randn(64, 8), "b": torch.randn(8, 32)}
    scale = 100.0 / update_norm(delta)
    big = {k: v * scale for k, v in delta.items()}
    assert update_norm(big) == pytest.approx(100.0, rel=1e-5)
    clipped, before = clip_update(big, 0.5)
    assert before == pytest.approx(100.0, rel=1e-5)
    assert update_norm(clipped) <= 0.5 * (1 + 1e-6)
    # the direction is kept: the clipped update is the original scaled
    assert torch.allclose(clipped["a"] / clipped["a"].norm(), big["a"] / big["a"].norm(), atol=1e-6)
    small = {"a": torch.full((2,), 0.01)}
    same, _ = clip_update(small, 0.5)
    assert torch.equal(same["a"], small["a"])  # within the bound: unchanged


def test_the_noise_has_the_standard_deviation_it_claims():
    g = torch.Generator().manual_seed(1)
    x = gaussian_noise((400, 500), 0.37, g).double()
    assert x.mean().abs() < 0.37 * 5 / math.sqrt(x.numel())
    assert x.std().item() == pytest.approx(0.37, rel=0.01)


def test_poisson_sampling_samples_at_its_rate_and_each_draw_is_the_devices_own():
    ids = [f"d{i:04d}" for i in range(2000)]
    counts = [len(poisson_sample(ids, 0.1, seed=3, round_idx=r)) for r in range(1, 21)]
    mean = sum(counts) / len(counts)
    assert abs(mean - 200) < 3 * math.sqrt(2000 * 0.1 * 0.9 / len(counts))
    assert len(set(counts)) > 1  # the number taking part is random, not fixed
    chosen = poisson_sample(ids, 0.1, seed=3, round_idx=1)
    assert poisson_sample(list(reversed(ids)), 0.1, seed=3, round_idx=1) == chosen
    half = set(poisson_sample(ids[:1000], 0.1, seed=3, round_idx=1))
    assert half == {d for d in chosen if d in set(ids[:1000])}  # others' eligibility changes nothing
    with pytest.raises(PrivacyError, match="sampling rate"):
        poisson_sample(ids, 0.0, 0, 1)


def test_the_accountant_agrees_with_an_independent_accountant():
    # 1000 devices, 100 a round (q = 0.1), 200 rounds, z = 1, delta = 1/N: Google's dp-accounting
    # gives 8.2 (RDP) and 7.1 (PLD) for Poisson sampling, and 150.7 counted without amplification
    assert epsilon_for(1.0, 0.1, 200, 1e-3, "rdp") == pytest.approx(8.2, abs=0.05)
    assert epsilon_for(1.0, 0.1, 200, 1e-3, "prv") == pytest.approx(7.1, abs=0.1)
    assert no_amplification_epsilon(1.0, 200, 1e-3) == pytest.approx(150.7, abs=0.1)


def test_the_accountant_steps_round_by_round_and_checks_the_next_round_ahead():
    acc = Accountant("rdp")
    assert acc.epsilon(1e-3) == 0.0
    for _ in range(199):
        acc.step(1.0, 0.1)
    ahead = acc.epsilon_after_next(1.0, 0.1, 1e-3)
    acc.step(1.0, 0.1)
    assert acc.rounds == 200 and acc.history == [(1.0, 0.1, 200)]
    assert acc.epsilon(1e-3) == pytest.approx(ahead) == pytest.approx(epsilon_for(1.0, 0.1, 200, 1e-3))


def test_adaptive_clipping_moves_towards_the_target_quantile():
    s = dataclasses.replace(DPSettings(noise_multiplier=1.0, adaptive_clipping=True, clipped_count_stddev=0.0),
                            expected_participants=100)
    g = torch.Generator().manual_seed(0)
    assert adaptive_clip(1.0, 90, 100, s, g) < 1.0   # most updates fit: the clip shrinks
    assert adaptive_clip(1.0, 10, 100, s, g) > 1.0   # most were clipped: it grows
    assert adaptive_clip(1.0, 50, 100, s, g) == pytest.approx(1.0)
    assert adaptive_clip(1.0, 100, 100, s, g) == pytest.approx(math.exp(-0.2 * 0.5))


@pytest.mark.parametrize("field, value, needle", [
    ("noise_multiplier", -1.0, "noise_multiplier"), ("clip_norm", 0.0, "clip_norm"),
    ("target_delta", 1.5, "target_delta"), ("max_epsilon", 0.0, "max_epsilon"),
    ("accountant", "moments", "accountant"), ("target_quantile", 1.0, "target_quantile"),
])
def test_a_bad_setting_names_itself(field, value, needle):
    with pytest.raises(PrivacyError, match=f"privacy.dp.{needle}"):
        DPSettings(**{field: value})
