"""Buffered asynchronous rounds (``schedule.mode: buffered``) in ``simulate``: reproducible on the
fleet's profile timings, stale updates moved onto the current version and weighed down or refused,
and what is refused before a run starts."""

from __future__ import annotations

import pytest
import torch

from fedlora_edge.coordinator.config import ConfigError, load_config
from fedlora_edge.coordinator.simulate import Simulation

FAST = {"model": "tiny-llama", "fleet": "spread10", "rounds": 4, "clients_per_round": 4, "train.steps": 2,
        "train.batch_size": 4, "data.eval_per_domain": 3, "data.samples_per_client": 12,
        "data.tasks": ["add", "upper"], "max_new_tokens": 4, "lora.max_rank": 8, "lora.rank": 4}


def run(tmp_path, method="fedit", **extra):
    sim = Simulation(load_config(overrides={**FAST, "method": method, **extra}), tmp_path)
    return sim, sim.run()


@pytest.mark.integration
def test_a_buffered_run_is_the_same_for_the_same_seed_and_folds_stale_updates(tmp_path):
    sims = [run(tmp_path / str(i), **{"schedule.mode": "buffered"}) for i in range(2)]
    (s1, r1), (s2, r2) = sims
    g1, g2 = s1.engine.state.global_factors, s2.engine.state.global_factors
    assert all(torch.equal(g1[m][i], g2[m][i]) for m in g1 for i in (0, 1))  # bit for bit
    assert [r["status"] for r in r1["rounds"]] == ["ok"] * 4 and all(r["valid_updates"] == 4 for r in r1["rounds"])
    stale = [c["staleness"] for r in r1["rounds"] for c in r["clients"]]
    assert max(stale) >= 1, "no update arrived stale on a fleet of mixed speeds: the test tests nothing"
    times = [r["virtual_seconds"] for r in r1["rounds"]]
    assert times == sorted(times) and times[0] > 0


@pytest.mark.integration
def test_buffered_versions_come_sooner_than_synchronous_rounds_on_a_fleet_of_mixed_speeds(tmp_path):
    # the same number of updates folded; a synchronous round waits for its slowest device, a buffered
    # version for the first four updates to arrive (on the profiles' predicted times: no wall clock)
    # ("virtual_seconds" is the simulation's clock, the sum of the profiles' predicted round times:
    # arithmetic, the same on any machine, not a timing)
    sim, sync = run(tmp_path / "sync")
    _, buffered = run(tmp_path / "buffered", **{"schedule.mode": "buffered"})
    assert sum(r["valid_updates"] for r in sync["rounds"]) == sum(r["valid_updates"] for r in buffered["rounds"])
    predicted = {c.id: c.capacity.round_s for c in sim.engine.clients}
    clock = 0.0
    for r in sync["rounds"]:  # a synchronous round lasts as long as its slowest device's predicted round
        own = [predicted[c["client"]] for c in r["clients"]]
        clock += max(own)
        assert r["virtual_seconds"] == round(clock, 3)
        assert r["waiting_seconds"] == round(sum(max(own) - t for t in own), 3)
    assert buffered["rounds"][-1]["virtual_seconds"] < sync["rounds"][-1]["virtual_seconds"]
    assert sum(r["waiting_seconds"] for r in sync["rounds"]) > 0


@pytest.mark.integration
def test_an_update_older_than_max_staleness_is_refused_and_the_run_goes_on(tmp_path):
    _, report = run(tmp_path, **{"schedule.mode": "buffered", "schedule.max_staleness": 0})
    reasons = [x["reason"] for r in report["rounds"] for x in r["rejected"]]
    assert reasons and all("past schedule.max_staleness 0" in why for why in reasons)
    assert all(c["staleness"] == 0 for r in report["rounds"] for c in r["clients"])
    assert [r["status"] for r in report["rounds"]] == ["ok"] * 4


def test_a_stale_update_is_its_change_added_to_the_plans_start_now():
    from fedlora_edge.coordinator.aggregate import Contribution
    from fedlora_edge.coordinator.buffered import moved
    from fedlora_edge.core.lora import ClientPlan, ModulePlan, peft_key

    plan = ClientPlan({"m": ModulePlan((1, 3))}, 2, 2.0)
    g = torch.Generator().manual_seed(0)

    def start():  # a hold plan's start: all four global components
        return {peft_key("m", "A"): torch.randn(4, 8, generator=g), peft_key("m", "B"): torch.randn(8, 4, generator=g)}

    old, now = start(), start()
    trained = (old[peft_key("m", "A")][[1, 3]] + 0.5, old[peft_key("m", "B")][:, [1, 3]] - 0.25)
    shifted = moved(Contribution("d", plan, {"m": trained}, 1.0), old, now)
    a, b = shifted.factors["m"]
    assert torch.allclose(a, now[peft_key("m", "A")][[1, 3]] + 0.5)
    assert torch.allclose(b, now[peft_key("m", "B")][:, [1, 3]] - 0.25)
    # two versions old: its change counts 1 / (1 + sqrt(2)) of itself
    half = moved(Contribution("d", plan, {"m": trained}, 1.0), old, now, 1 / (1 + 2 ** 0.5))
    assert torch.allclose(half.factors["m"][0], now[peft_key("m", "A")][[1, 3]] + 0.5 / (1 + 2 ** 0.5))
    assert half.weight == 1.0
    with pytest.raises(ValueError, match="does not fit its plan's start now"):
        moved(Contribution("d", plan, {"m": trained}, 1.0), old,
              {peft_key("m", "A"): torch.zeros(4, 9), peft_key("m", "B"): torch.zeros(8, 4)})


def test_what_buffered_rounds_cannot_run_is_refused_before_the_run():
    with pytest.raises(ConfigError, match="flexlora cannot run in buffered rounds"):
        load_config(overrides={"method": "flexlora", "schedule.mode": "buffered"})
    with pytest.raises(ConfigError, match="norm-bound cannot run in buffered rounds.*its bound is the median"):
        load_config(overrides={"method": "norm-bound", "schedule.mode": "buffered"})
    with pytest.raises(ConfigError, match="min_updates.*schedule.buffer"):
        load_config(overrides={"method": "fedit", "schedule.mode": "buffered", "schedule.buffer": 2, "min_updates": 3})
    with pytest.raises(ConfigError, match="contamination.attack scaled_under"):
        load_config(overrides={"method": "fedit", "schedule.mode": "buffered", "contamination.attack": "scaled_under",
                               "contamination.fraction": 0.2})
    with pytest.raises(ConfigError, match="schedule.mode.*privacy.dp"):
        load_config(overrides={"method": "fedit", "schedule.mode": "buffered", "privacy.dp.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="schedule.mode"):
        load_config(overrides={"schedule.mode": "async"})


@pytest.mark.integration
def test_the_staleness_weight_changes_what_a_stale_update_counts_for(tmp_path):
    sims = {w: run(tmp_path / w, **{"schedule.mode": "buffered", "schedule.staleness_weight": w})[0]
            for w in ("sqrt", "none")}
    a, b = (sims[w].engine.state.global_factors for w in ("sqrt", "none"))
    assert any(not torch.equal(a[m][i], b[m][i]) for m in a for i in (0, 1))


@pytest.mark.integration
def test_a_run_whose_every_update_is_refused_still_ends_after_its_rounds(tmp_path):
    # every update non-finite: each version closes, failed, once no device is left to try
    _, report = run(tmp_path, **{"schedule.mode": "buffered", "train.lr": 1e30, "rounds": 2})
    assert [r["status"] for r in report["rounds"]] == ["failed", "failed"]
    assert all(r["rejected"] for r in report["rounds"])


@pytest.mark.integration
def test_a_buffer_larger_than_the_fleet_folds_what_the_fleet_has_every_version(tmp_path):
    _, report = run(tmp_path, **{"schedule.mode": "buffered", "schedule.buffer": 12, "schedule.concurrency": 12})
    assert [r["status"] for r in report["rounds"]] == ["ok"] * 4  # 10 devices: versions of 10, not one and stop
    assert all(r["valid_updates"] == 10 for r in report["rounds"])


@pytest.mark.integration
@pytest.mark.parametrize("method", ["fed-plora", "hafl", "hetlora", "fslora"])
def test_the_heterogeneous_methods_run_buffered_with_stale_updates(tmp_path, method):
    # Fed-PLoRA and HAFL hold or fold all R components and send the few they train: a stale one is moved
    # onto the current version in those components
    sim, report = run(tmp_path, method=method, **{"schedule.mode": "buffered", "transport.compression": "int8"})
    assert [r["status"] for r in report["rounds"]] == ["ok"] * 4
    assert report["totals"]["rejected_updates"] == 0
    assert max(c["staleness"] for r in report["rounds"] for c in r["clients"]) >= 1
