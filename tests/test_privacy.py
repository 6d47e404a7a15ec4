"""Device-level DP's method-independent pieces: the clip holds, the noise has the standard deviation
it claims, Poisson sampling samples at its rate, and the accountant agrees with an independent one."""

from __future__ import annotations

import math
import random

import pytest
import torch

from fedlora_edge.coordinator.privacy import (
    Accountant,
    DPSettings,
    PrivacyError,
    adaptive_clip,
    epsilon_for,
    gaussian_noise,
    no_amplification_epsilon,
    poisson_sample,
)
from fedlora_edge.core.clip import clip_update, update_norm


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


def test_poisson_sampling_samples_at_its_rate_from_a_draw_the_seed_cannot_replay():
    ids = [f"d{i:04d}" for i in range(2000)]
    counts = [len(poisson_sample(ids, 0.1)) for _ in range(20)]
    mean = sum(counts) / len(counts)
    assert abs(mean - 200) < 4 * math.sqrt(2000 * 0.1 * 0.9 / len(counts))
    assert len(set(counts)) > 1  # the number taking part is random, not fixed
    assert poisson_sample(ids, 0.1) != poisson_sample(ids, 0.1)  # the OS's randomness, not a seed
    assert poisson_sample(list(reversed(ids)), 0.1, random.Random(5)) == poisson_sample(ids, 0.1, random.Random(5))
    with pytest.raises(PrivacyError, match="sampling rate"):
        poisson_sample(ids, 0.0)


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
    s = DPSettings(noise_multiplier=1.0, adaptive_clipping=True, clipped_count_stddev=0.0)
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


# ------------------------------------------------------------------ a run under privacy.dp (tiny-llama)

FAST = {"model": "tiny-llama", "rounds": 2, "clients_per_round": 6, "train.steps": 2, "train.batch_size": 4,
        "data.eval_per_domain": 2, "data.samples_per_client": 8, "data.tasks": ["add", "upper"],
        "max_new_tokens": 2, "lora.max_rank": 4, "lora.rank": 4}


def _fleet(tmp_path, n: int) -> str:
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n" + "".join(f"  - {{id: d{i:03d}, profile: jetson-agx-orin}}\n" for i in range(n)))
    return str(path)


def _sim(tmp_path, **extra):
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={**FAST, "fleet": _fleet(tmp_path, 12), **extra})
    return Simulation(cfg, tmp_path / "out")


@pytest.mark.integration
@pytest.mark.parametrize("method", ["fedit", "hetlora", "fed-plora"])
def test_a_run_under_dp_clips_every_update_and_reports_the_epsilon_it_spent(tmp_path, method):
    sim = _sim(tmp_path, method=method, **{"privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.05})
    report = sim.run()
    e = sim.engine
    assert e.dp_rate == pytest.approx(0.5) and e.dp_delta == pytest.approx(1 / 12)
    spent = [r["privacy"]["epsilon"] for r in report["rounds"]]
    assert spent == sorted(spent) and spent[-1] == pytest.approx(epsilon_for(1.0, 0.5, 2, 1 / 12))
    p = report["privacy"]
    assert p["epsilon"] == pytest.approx(spent[-1]) and p["sampling"] == "poisson" and p["stopped"] is None
    assert p["epsilon_without_amplification"] > p["epsilon"]
    for r in report["rounds"]:
        assert not r["rejected"], r["rejected"]  # every device clipped what it sent
    # the global adapter moved by at most the noise plus the clipped changes (a norm-100 update cannot)
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in e.state.global_factors.values())


@pytest.mark.integration
def test_an_update_over_the_clip_is_rejected_by_the_coordinator(tmp_path):
    from fedlora_edge.coordinator.validate import UpdateRejected
    from fedlora_edge.core.lora import to_state_dict
    from fedlora_edge.core.wire import encode_tensors

    sim = _sim(tmp_path, method="fedit", **{"privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.05})
    e = sim.engine
    a = None
    while a is None:  # Poisson sampling may pick nobody
        assignments, _ = e.open_round(1)
        a = assignments[0] if assignments else None
    big = {m: (ga[list(a.plan.modules[m].components)] + 1.0, gb[:, list(a.plan.modules[m].components)] + 1.0)
           for m, (ga, gb) in e.state.global_factors.items()}
    report = {"round": 1, "num_examples": 8, "steps": 2, "first_loss": 1.0, "last_loss": 1.0, "seconds": 0.1,
              "losses": [1.0, 1.0]}
    with pytest.raises(UpdateRejected, match="over privacy.dp's clip"):
        e.accept(a, encode_tensors(to_state_dict(big)), report)


@pytest.mark.integration
def test_the_run_stops_before_a_round_would_spend_past_the_budget(tmp_path):
    budget = (epsilon_for(1.0, 0.5, 1, 1 / 12) + epsilon_for(1.0, 0.5, 2, 1 / 12)) / 2  # room for one round
    sim = _sim(tmp_path, method="fedit", rounds=3,
               **{"privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.05, "privacy.dp.max_epsilon": budget})
    report = sim.run()
    assert len(report["rounds"]) == 1
    assert "privacy budget" in report["privacy"]["stopped"] and report["privacy"]["epsilon"] <= budget
    assert (tmp_path / "out" / "adapter").is_dir()  # the outputs of the rounds that ran are written


@pytest.mark.parametrize("method", ["flexlora", "median", "clair", "fedlease"])
def test_methods_whose_aggregate_is_not_a_clipped_sum_are_refused_before_the_run(method):
    from fedlora_edge.coordinator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"privacy.dp: method {method} has no device-level DP variant"):
        load_config(overrides={"method": method, "privacy.dp.noise_multiplier": 1.0})


def test_the_device_sends_its_start_plus_the_clipped_change():
    from fedlora_edge.core.clip import clip_to_start

    start = {"w": torch.zeros(10)}
    sent, norm = clip_to_start({"w": torch.full((10,), 10.0)}, start, 2.0)
    assert norm == pytest.approx(math.sqrt(1000)) and update_norm({"w": sent["w"] - start["w"]}) == pytest.approx(2.0)


def test_adaptive_clipping_pays_for_its_count_out_of_the_same_budget():
    from fedlora_edge.coordinator.privacy import update_noise_multiplier

    fixed = DPSettings(noise_multiplier=1.0)
    assert update_noise_multiplier(fixed, 100) == 1.0
    adaptive = DPSettings(noise_multiplier=1.0, adaptive_clipping=True)  # sigma_b = 100 / 20 = 5
    z_update = update_noise_multiplier(adaptive, 100)
    assert z_update > 1.0 and (z_update ** -2 + 10.0 ** -2) == pytest.approx(1.0)  # together: z = 1
    with pytest.raises(PrivacyError, match="clipped_count_stddev"):
        update_noise_multiplier(adaptive, 6)  # sigma_b 0.3 <= z / 2


@pytest.mark.integration
def test_a_run_with_adaptive_clipping_moves_its_clip_and_records_it(tmp_path):
    sim = _sim(tmp_path, method="fedit", **{"privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.05,
                                            "privacy.dp.adaptive_clipping": True,
                                            "privacy.dp.clipped_count_stddev": 1.0})
    report = sim.run()
    clips = [r["privacy"]["clip_norm"] for r in report["rounds"]]
    assert clips[0] == 0.05 and clips[1] == pytest.approx(report["rounds"][0]["privacy"]["next_clip_norm"])
    assert clips[1] != clips[0]


@pytest.mark.integration
def test_the_command_line_shows_logs_and_exits_on_the_budget(tmp_path, capsys):
    import json

    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedlora_edge.coordinator.cli import main

    budget = (epsilon_for(1.0, 0.5, 1, 1 / 12) + epsilon_for(1.0, 0.5, 2, 1 / 12)) / 2
    cfg = {**{k: v for k, v in FAST.items()}, "fleet": _fleet(tmp_path, 12), "method": "fedit", "rounds": 3,
           "privacy": {"dp": {"noise_multiplier": 1.0, "clip_norm": 0.05, "max_epsilon": budget}}}
    cfg = {**{k: v for k, v in cfg.items() if "." not in k}, "train": {"steps": 2, "batch_size": 4},
           "data": {"eval_per_domain": 2, "samples_per_client": 8, "tasks": ["add", "upper"]},
           "lora": {"max_rank": 4, "rank": 4}}
    path = tmp_path / "dp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert main(["simulate", "--config", str(path), "--out", str(out), "--log", "tensorboard"]) == 7
    err = capsys.readouterr()
    assert "privacy: epsilon" in err.out + err.err and "exit status 7" in err.err
    report = json.loads((out / "report.json").read_text())
    assert len(report["rounds"]) == 1 and report["privacy"]["stopped"]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    (point,) = acc.Scalars("privacy/epsilon")
    assert point.step == 1 and point.value == pytest.approx(report["privacy"]["epsilon"], rel=1e-5)


@pytest.mark.integration
def test_over_mqtt_devices_clip_and_the_coordinator_accounts_as_in_simulate(tmp_path):
    from mqttkit import config

    from fedlora_edge.coordinator.emulate import emulate

    cfg = config(tmp_path, ["d1", "d2", "d3"], method="hetlora", rounds=2, clients_per_round=3,
                 **{"privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.05})
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    assert all(d["exit_code"] == 0 for d in rep["devices"].values())
    for r in rep["rounds"]:  # every device took part (q = 1), clipped what it sent, and was accepted
        assert r["status"] == "ok" and r["valid_updates"] == 3 and not r["rejected"]
        assert r["privacy"]["sample_rate"] == 1.0
    assert rep["privacy"]["epsilon"] == pytest.approx(epsilon_for(1.0, 1.0, 2, 1 / 3))


# ------------------------------------------------------------------ HAFL: its importance scores under DP

@pytest.mark.integration
@pytest.mark.parametrize("variant", ["freeze", "truncate"])
def test_hafl_under_dp_ranks_by_noised_fleet_scores_and_pays_for_them(tmp_path, variant):
    sim = _sim(tmp_path, method="hafl", **{"privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.05,
                                           "hafl.variant": variant, "lora.rank": 2})
    report = sim.run()
    e = sim.engine
    for r in report["rounds"]:
        assert not r["rejected"], r["rejected"]  # factors clipped, scores of norm 1
    # two noised sums a round (the updates', the scores'), each at sqrt(2) z: together they cost z
    assert report["privacy"]["noised_sums"] == ["updates", "importance"]
    assert e.dp_update_z == pytest.approx(math.sqrt(2.0))
    assert report["privacy"]["epsilon"] == pytest.approx(epsilon_for(1.0, 0.5, 2, 1 / 12))
    imp = e.state.method_state["importance"]
    assert imp["clients"] == {}  # no device's own scores are kept: plans rank by the noised fleet scores
    assert any(v < 0 for scores in imp["global"].values() for v in scores)  # the noise shows (scores are >= 0)
    assert imp["trained"] and all(imp["trained"].values())


def test_the_device_sends_its_importance_scores_at_norm_1_beside_its_clipped_factors():
    from fedlora_edge.edge_client.work import _finish

    class Res:
        num_examples, steps, first_loss, last_loss, seconds, losses = 8, 2, 1.0, 0.5, 0.1, [1.0, 0.5]

    start = {"a": torch.zeros(4, 3), "b": torch.zeros(5, 4)}
    sent = {"a": torch.full((4, 3), 3.0), "b": torch.full((5, 4), -2.0),
            "importance.m1": torch.tensor([3e-9, 0.0, 0.0, 0.0]), "importance.m2": torch.tensor([0.0, 4e-9])}
    blob, report = _finish({"round": 1, "privacy": {"clip_norm": 0.5}}, sent, Res(), start=start)
    from fedlora_edge.core.wire import decode_tensors

    out = decode_tensors(blob)
    assert update_norm({k: out[k] for k in ("a", "b")}) == pytest.approx(0.5, rel=1e-5) and not report["dp_unclipped"]
    scores = {k: v for k, v in out.items() if k.startswith("importance.")}
    assert update_norm(scores) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(scores["importance.m1"], torch.tensor([0.6, 0.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(scores["importance.m2"], torch.tensor([0.0, 0.8]), atol=1e-6)  # one vector, its ranking kept


def test_the_noised_scores_are_their_sum_plus_gaussian_noise_over_the_expected_scorers():
    from fedlora_edge.coordinator.aggregate import Contribution
    from fedlora_edge.coordinator.privacy import NoisedSum
    from fedlora_edge.core.lora import ClientPlan, DeviceSteps, ModulePlan

    g = {"m": (torch.zeros(4, 3), torch.zeros(5, 4))}
    truncate = ClientPlan({"m": ModulePlan((1, 3))}, 1.0, 2, DeviceSteps(importance=(0.85, 0.85)).to_extra())
    got = {}
    expected = {"m": torch.tensor([0.0, 2.0, 0.0, 2.0])}
    acc = NoisedSum(g, expected, 0.0, torch.Generator().manual_seed(0), scorers={"m": torch.tensor([0.0, 2.0, 0.0, 2.0])},
                    score_std=0.0, then=lambda noised, e: got.update(noised=noised, e=e))
    zeros = (torch.zeros(2, 3), torch.zeros(5, 2))
    acc.add(Contribution("x", truncate, {"m": zeros}, 1.0, {"m": torch.tensor([0.6, 0.8])}))
    acc.add(Contribution("y", truncate, {"m": zeros}, 1.0, {"m": torch.tensor([0.0, 1.0])}))
    acc.finish()
    noised = got["noised"]["m"]
    assert torch.isnan(noised[0]) and torch.isnan(noised[2])  # nobody was expected to score them: not released
    assert noised[1].item() == pytest.approx(0.3) and noised[3].item() == pytest.approx(0.9)
    # with noise: the released scores spread as score_std / expected scorers
    draws = []
    for seed in range(400):
        acc = NoisedSum(g, expected, 0.0, torch.Generator().manual_seed(seed), scorers={"m": torch.full((4,), 2.0)},
                        score_std=1.5, then=lambda noised, e: draws.append(noised["m"]))
        acc.finish()
    assert torch.stack(draws).std().item() == pytest.approx(0.75, rel=0.08)


@pytest.mark.integration
def test_importance_scores_over_norm_1_are_rejected_under_dp(tmp_path):
    from fedlora_edge.coordinator.validate import UpdateRejected
    from fedlora_edge.core.lora import to_state_dict
    from fedlora_edge.core.wire import encode_tensors

    sim = _sim(tmp_path, method="hafl", **{"privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.05,
                                           "hafl.variant": "truncate", "lora.rank": 2})
    e = sim.engine
    a = None
    while a is None:  # Poisson sampling may pick nobody
        assignments, _ = e.open_round(1)
        a = assignments[0] if assignments else None
    same = {m: (ga[list(mp.components)].clone(), gb[:, list(mp.components)].clone())
            for m, mp in a.plan.modules.items() for ga, gb in [e.state.global_factors[m]]}
    report = {"round": 1, "num_examples": 8, "steps": 2, "first_loss": 1.0, "last_loss": 1.0, "seconds": 0.1,
              "losses": [1.0, 1.0]}
    unit = {f"importance.{m}": torch.full((mp.rank,), 1.0) for m, mp in a.plan.modules.items()}
    with pytest.raises(UpdateRejected, match="importance scores' norm"):
        e.accept(a, encode_tensors({**to_state_dict(same), **unit}), report)
    n = math.sqrt(sum(t.numel() for t in unit.values()))
    e.accept(a, encode_tensors({**to_state_dict(same), **{k: v / n for k, v in unit.items()}}), report)


def test_two_noised_sums_a_round_each_get_sqrt_2_times_the_multiplier():
    from fedlora_edge.coordinator.privacy import update_noise_multiplier

    assert update_noise_multiplier(DPSettings(noise_multiplier=1.3), 100, sums=2) == pytest.approx(1.3 * math.sqrt(2))
    adaptive = DPSettings(noise_multiplier=1.0, adaptive_clipping=True)  # sigma_b = 100 / 20 = 5
    z_s = update_noise_multiplier(adaptive, 100, sums=2)
    assert 2 * z_s ** -2 + 10.0 ** -2 == pytest.approx(1.0)  # the two sums and the count together: z = 1


def test_a_hafl_freeze_device_below_the_global_rank_clips_its_trained_components_against_their_start():
    # it holds all R components but sends only its r: its clip must compare like with like
    from fedlora_edge.core.data import generate_task
    from fedlora_edge.core.lora import (
        ClientPlan,
        DeviceSteps,
        ModulePlan,
        adapted_modules,
        init_global_factors,
        to_state_dict,
    )
    from fedlora_edge.core.models import load_model
    from fedlora_edge.core.wire import decode_tensors, encode_tensors
    from fedlora_edge.edge_client.trainer import TrainSettings
    from fedlora_edge.edge_client.work import assignment_meta, run_assignment, wrap

    model, tok = load_model("tiny-llama")
    dims = adapted_modules(model, ["q_proj", "v_proj"])
    steps = DeviceSteps(hold=4, frozen="forward", importance=(0.85, 0.85)).to_extra()
    plan = ClientPlan({m: ModulePlan((0, 2)) for m in dims}, 2.0, 2, {**steps, "variant": "freeze"})
    meta = assignment_meta(round_idx=1, plan=plan, seed=0, settings=TrainSettings(steps=2, batch_size=2, lr=0.05),
                           targets=["q_proj", "v_proj"], dropout=0.0, model="tiny-llama", clip_norm=0.01)
    start = init_global_factors(dims, 4, 0)
    blob, report = run_assignment(wrap(model, meta), tok, generate_task("add", 4, 0), meta,
                                  encode_tensors(to_state_dict(start)))
    sent = decode_tensors(blob)
    change = {}
    for m, (a, b) in start.items():
        key_a = next(k for k in sent if m in k and "lora_A" in k)
        key_b = next(k for k in sent if m in k and "lora_B" in k)
        change[key_a], change[key_b] = sent[key_a] - a[[0, 2]], sent[key_b] - b[:, [0, 2]]
    assert update_norm(change) <= 0.01 * (1 + 1e-4) and not report["dp_unclipped"]
    scores = {k: v for k, v in sent.items() if k.startswith("importance.")}
    assert all(v.shape == (4,) for v in scores.values()) and update_norm(scores) == pytest.approx(1.0, rel=1e-5)
