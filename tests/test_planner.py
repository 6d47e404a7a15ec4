"""The planner: capacity monotone in memory, devices too small reported, budgets respected."""

from dataclasses import replace

import pytest

from fedlora_edge.coordinator.fleet import load_fleet
from fedlora_edge.coordinator.planner import (
    Footprint,
    ModelShape,
    adapter_bytes,
    device_estimate,
    memory_bytes,
    plan_capacity,
)
from fedlora_edge.core.profile import DeviceProfile, ProfileError

SHAPE = ModelShape(n_params=135_000_000, hidden=576, intermediate=1536, layers=30, heads=9, kv_dim=192,
                   vocab=49152, adapted={f"l{i}.{p}": (576, 576 if p == "q" else 192) for i in range(30) for p in "qv"})
KW = dict(max_rank=32, steps=10, batch=8, seq=64, deadline_s=1800.0, overhead_gb=0.35)


def prof(**kw):
    base = dict(name="d", memory_total_gb=64.0, memory_usable_gb=32.0, compute_gflops=1000.0,
                uplink_mbps=1000.0, downlink_mbps=1000.0)
    base.update(kw)
    return DeviceProfile(**base)


def test_capacity_is_monotone_in_usable_memory():
    caps = [plan_capacity(prof(memory_usable_gb=g), SHAPE, **KW).rank for g in (0.5, 1.0, 1.5, 1.62, 1.7, 4.0, 32.0)]
    assert caps == sorted(caps)
    assert caps[0] == 0 and caps[-1] == 32


def test_memory_grows_with_rank_batch_and_sequence():
    def total(r, b, s):
        return sum(memory_bytes(SHAPE, r, b, s, 0.35).values())
    assert total(1, 8, 64) < total(32, 8, 64) < total(32, 16, 64) < total(32, 16, 128)


def test_device_that_cannot_train_rank_one_is_reported_with_a_reason():
    cap = plan_capacity(prof(memory_usable_gb=0.3, memory_total_gb=0.5), SHAPE, **KW)
    assert cap.rank == 0 and not cap.can_train
    assert "GB usable" in cap.reason
    slow = plan_capacity(prof(compute_gflops=0.01), SHAPE, **KW)
    assert slow.rank == 0 and "deadline" in slow.reason


def test_transfer_budget_binds_rank_on_slow_links():
    fast = plan_capacity(prof(), SHAPE, **KW, transfer_budget_s=10.0)
    slow = plan_capacity(prof(uplink_mbps=2.0, downlink_mbps=30.0), SHAPE, **KW, transfer_budget_s=10.0)
    assert fast.rank == 32
    assert 1 <= slow.rank < 32
    bits = adapter_bytes(SHAPE, slow.rank) * 8
    assert bits / 2e6 + bits / 30e6 <= 10.0
    bits_next = adapter_bytes(SHAPE, slow.rank + 1) * 8
    assert bits_next / 2e6 + bits_next / 30e6 > 10.0


def test_a_full_rank_download_leaves_less_room_on_a_slow_link():
    link = dict(uplink_mbps=2.0, downlink_mbps=30.0)
    own = plan_capacity(prof(**link), SHAPE, **KW, transfer_budget_s=10.0)
    full = plan_capacity(prof(**link), SHAPE, **KW, transfer_budget_s=10.0, footprint=Footprint(down_rank=32))
    assert 1 <= full.rank < own.rank
    assert plan_capacity(prof(), SHAPE, **KW, transfer_budget_s=10.0, footprint=Footprint(down_rank=32)).rank == 32
    none = plan_capacity(prof(uplink_mbps=100.0, downlink_mbps=1.0), SHAPE, **KW, transfer_budget_s=10.0,
                         footprint=Footprint(down_rank=32))
    assert none.rank == 0 and "rank-32 download" in none.reason


def test_held_rank_and_folded_weights_cost_memory_and_time():
    p = prof()
    plain = device_estimate(p, SHAPE, 4, 10, 8, 64, 0.35)
    held = device_estimate(p, SHAPE, 4, 10, 8, 64, 0.35, Footprint(hold_rank=32))
    fold = device_estimate(p, SHAPE, 4, 10, 8, 64, 0.35, Footprint(fold=True))
    assert held[0] > plain[0] and held[1] > plain[1]
    weights = sum(n * m for n, m in SHAPE.adapted.values()) * 4 / 2**30
    assert fold[0] == pytest.approx(plain[0] + weights) and fold[1] == plain[1]


def test_bad_profile_values_name_the_field():
    with pytest.raises(ProfileError, match="compute_gflops"):
        prof(compute_gflops=-1)
    with pytest.raises(ProfileError, match="exceeds"):
        prof(memory_usable_gb=100.0)
    with pytest.raises(ProfileError, match="runtime"):
        replace(prof(), runtime="tflite")
    with pytest.raises(ProfileError, match="field 'trainer'"):  # a profile from before the split
        replace(prof(), runtime="torch")
    with pytest.raises(ProfileError, match="quant '8da4w' is not one onnxruntime runs"):
        replace(prof(), runtime="onnxruntime", quant="8da4w")
    with pytest.raises(ProfileError, match="trainer must be"):
        replace(prof(), trainer="tflite")
    with pytest.raises(ProfileError, match="needs trainer executorch"):
        replace(prof(), trainer_base="int8")
    assert replace(prof(), runtime="executorch", quant="8da4w").export_class == ("executorch", "8da4w")


def test_executorch_trainer_costs_what_sgd_in_its_runtime_costs():
    """The executorch trainer holds no optimiser moments but XNNPACK's workspace, an int8 base is
    about a quarter of the weights, and a step takes EXECUTORCH_STEP_FACTOR torch steps."""
    from fedlora_edge.coordinator.planner import EXECUTORCH_STEP_FACTOR, XNNPACK_WORKSPACE, device_estimate

    torch_p = prof()
    et = replace(torch_p, trainer="executorch")
    et8 = replace(et, trainer_base="int8")
    mt, st, _ = device_estimate(torch_p, SHAPE, 8, 10, 4, 64, 0.35)
    me, se, _ = device_estimate(et, SHAPE, 8, 10, 4, 64, 0.35)
    m8, s8, _ = device_estimate(et8, SHAPE, 8, 10, 4, 64, 0.35)
    assert se == pytest.approx(st * EXECUTORCH_STEP_FACTOR) and s8 == pytest.approx(se)
    emb = SHAPE.vocab * SHAPE.hidden
    assert mt - me == pytest.approx((2 * SHAPE.lora_params(8) - XNNPACK_WORKSPACE * emb) * 4 / 2**30)
    assert me - m8 == pytest.approx(3 * (SHAPE.n_params - emb) / 2**30)


def test_shipped_profiles_and_default_fleet_load():
    fleet = load_fleet("mixed8")
    assert len(fleet) == 8
    assert {d.profile.name for d in fleet} >= {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano",
                                                "jetson-agx-orin", "phone"}
    for d in fleet:
        assert set(d.profile.sources) >= {"memory_total_gb", "memory_usable_gb", "compute_gflops"}


def test_unknown_fleet_lists_the_available_ones():
    with pytest.raises(ProfileError, match="mixed8"):
        load_fleet("no-such-fleet")


def test_the_spread_fleet_mixes_low_and_high_ranks():
    from fedlora_edge.coordinator.compare import fleet_rank_range
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.engine import capacity_for
    from fedlora_edge.coordinator.planner import meta_shape

    cfg = load_config(overrides={"fleet": "spread10"})
    shape = meta_shape(cfg.model, None)
    ranks = sorted(min(capacity_for(cfg, shape, d.profile).rank, 32) for d in load_fleet("spread10"))
    assert fleet_rank_range(cfg) == (2, 32) and len(set(ranks)) >= 5 and ranks.count(32) <= len(ranks) // 2
