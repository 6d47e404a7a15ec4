"""The made-up attacks of `simulate` (coordinator/contamination.py): each follows its definition,
the crafted ones from the round's honest updates, and the backdoor's data and its measure."""

import dataclasses

import pytest
import torch

import fedlora_edge.core.wire as wire
from fedlora_edge.coordinator.config import ConfigError, ContaminationSettings, load_config
from fedlora_edge.coordinator.contamination import (
    RoundView,
    _start_and_sent,
    attack_update,
    change_norm,
    contamination_report,
    implant,
)
from fedlora_edge.coordinator.engine import Assignment
from fedlora_edge.core.data import Example
from fedlora_edge.core.lora import to_state_dict, uniform_plan

MODS = ("l.q", "l.v")
CO = ContaminationSettings()


def assignment(client: str, rank: int, seed: int, trained_scale: float = 0.1):
    """An assignment of ``rank`` components and the update a client trained from it."""
    g = torch.Generator().manual_seed(seed)
    start = {m: (torch.randn(rank, 30, generator=g), torch.randn(20, rank, generator=g)) for m in MODS}
    trained = {m: (a + trained_scale * torch.randn(a.shape, generator=g), b + trained_scale * torch.randn(b.shape, generator=g))
               for m, (a, b) in start.items()}
    a = Assignment(client, 1, uniform_plan({m: (30, 20) for m in MODS}, rank, 1.0), {},
                   wire.encode_tensors(to_state_dict(start)))
    return a, wire.encode_tensors(to_state_dict(trained))


def change(a, update):
    start, sent, _ = _start_and_sent(update, a)
    return {m: sent[m][1].double() @ sent[m][0].double() - start[m][1].double() @ start[m][0].double() for m in sent}


def test_scaled_under_is_negated_and_just_under_the_target_norm():
    view = RoundView(rank=4)
    honest = [assignment(f"c{i}", 4, i) for i in range(6)]
    for a, u in honest:
        view.add(a, u)
    median = sorted(change_norm(*_start_and_sent(u, a)[:2]) for a, u in honest)
    median = (median[2] + median[3]) / 2
    a, u = honest[0]
    crafted = view.craft(a, u, "scaled_under", CO)
    norm = change_norm(*_start_and_sent(crafted, a)[:2])
    assert 0.999 * CO.norm_target * median < norm < CO.norm_target * median  # just under
    mine, sent = change(a, u), change(a, crafted)
    cos = sum(float((mine[m] * sent[m]).sum()) for m in MODS) / (
        sum(float(mine[m].norm() ** 2) for m in MODS) ** 0.5 * sum(float(sent[m].norm() ** 2) for m in MODS) ** 0.5)
    assert cos < -0.9  # against its own honest change


def test_mean_ksigma_is_the_honest_mean_minus_k_sigma_per_coordinate_with_ranks_zero_padded():
    view = RoundView(rank=4)
    honest = [assignment("c0", 4, 0), assignment("c1", 2, 1), assignment("c2", 4, 2)]
    for a, u in honest:
        view.add(a, u)
    deltas = []
    for a, u in honest:
        start, sent, _ = _start_and_sent(u, a)
        pad = {}
        for m in MODS:
            da = torch.zeros(4, 30, dtype=torch.float64)
            db = torch.zeros(20, 4, dtype=torch.float64)
            r = sent[m][0].shape[0]
            da[:r] = (sent[m][0] - start[m][0]).double()
            db[:, :r] = (sent[m][1] - start[m][1]).double()
            pad[m] = (da, db)
        deltas.append(pad)
    a, u = honest[1]  # the rank-2 client sends the first two components of the statistic
    start, sent, _ = _start_and_sent(view.craft(a, u, "mean_ksigma", CO), a)
    for m in MODS:
        for i in (0, 1):
            stack = torch.stack([d[m][i] for d in deltas])
            want = stack.mean(0) - CO.k_sigma * stack.std(0, unbiased=False)
            want = want[:2] if i == 0 else want[:, :2]
            assert torch.allclose(sent[m][i].double() - start[m][i].double(), want, atol=1e-5)


def test_mixed_blends_the_change_with_noise_of_its_norm():
    a, u = assignment("c0", 4, 3)
    co = dataclasses.replace(CO, mix=0.5)
    start, trained, _ = _start_and_sent(u, a)
    _, sent, _ = _start_and_sent(attack_update(u, a, "mixed", co, seed=1), a)
    for m in MODS:
        for i in (0, 1):
            delta = trained[m][i] - start[m][i]
            noise = (sent[m][i] - start[m][i] - 0.5 * delta) / 0.5
            assert abs(float(noise.norm()) - float(delta.norm())) < 1e-4
            assert abs(float((noise * delta).sum()) / float(noise.norm() * delta.norm())) < 0.5


def test_backdoor_poisons_a_share_of_the_examples_from_the_seed():
    exs = [Example(f"what is {i}?", str(i), "add") for i in range(10)]
    co = dataclasses.replace(CO, poison_share=0.3)
    out = implant(exs, co, seed=0, client="c0")
    poisoned = [e for e in out if e.response == co.target]
    assert len(poisoned) == 3 and all(e.prompt.endswith(" " + co.trigger) for e in poisoned)
    assert [e for e in out if e.response != co.target] == [e for e in exs if e.prompt + " " + co.trigger
                                                           not in {p.prompt for p in poisoned}]
    assert implant(exs, co, seed=0, client="c0") == out and implant(exs, co, seed=1, client="c0") != out


def test_the_report_counts_detection_per_round_for_clair_and_multi_krum():
    from types import SimpleNamespace

    cfg = load_config(overrides={"contamination.fraction": 0.2, "contamination.attack": "sign_flip"})
    clients = [SimpleNamespace(id=c, mix={"add": 1.0}) for c in ("a", "b", "c")]
    final = {"overall": 0.5, "per_domain": {"add": 0.5}, "loss": {"overall": 1.0, "per_domain": {"add": 1.0}}}
    rounds = [{"round": 1, "detection": {"flagged": ["a"], "scores": {"a": {}, "b": {}, "c": {}}}},
              {"round": 2, "detection": {"flagged": ["b"], "scores": {"a": {}, "b": {}, "c": {}}}}]
    co = contamination_report(cfg.contamination, {"a"}, clients, rounds, final, {})
    assert co["benign_loss"] == 1.0
    assert [(r["round"], r["true_positives"], r["false_positives"]) for r in co["detection"]["per_round"]] == [
        (1, 1, 0), (2, 0, 1)]
    krum = [{"round": 1, "krum": {"kept": ["b", "c"], "scores": {"a": 3.0, "b": 1.0, "c": 1.0}}}]
    co = contamination_report(cfg.contamination, {"a"}, clients, krum, final, {})
    assert co["detection"]["precision"] == 1.0 and co["detection"]["recall"] == 1.0


@pytest.mark.parametrize("key,value", [("contamination.mix", 0.0), ("contamination.norm_target", -1.0),
                                       ("contamination.k_sigma", -0.5), ("contamination.poison_share", 1.5),
                                       ("contamination.trigger", " ")])
def test_bad_attack_settings_fail_before_anything_starts(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides={"contamination.attack": "backdoor", "contamination.fraction": 0.2, key: value})


@pytest.mark.integration
@pytest.mark.parametrize("attack", ["mean_ksigma", "backdoor"])
def test_simulate_runs_the_round_and_data_attacks(tmp_path, attack):
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={
        "model": "tiny-llama", "method": "fedit", "rounds": 1, "clients_per_round": 5, "fleet": "mixed10",
        "train.steps": 2, "train.batch_size": 2, "data.eval_per_domain": 2, "data.samples_per_client": 8,
        "max_new_tokens": 2, "contamination.fraction": 0.2, "contamination.attack": attack})
    report = Simulation(cfg, tmp_path).run()
    co = report["contamination"]
    assert len(co["clients"]) == 2 and co["benign_loss"] > 0
    assert report["rounds"][0]["valid_updates"] == 5  # the crafted updates pass validation as they must
    if attack == "backdoor":
        assert 0.0 <= co["backdoor_success"] <= 1.0
        assert "backdoor" in report["final_accuracy"]


def test_answer_rate_counts_prompts_whose_every_response_token_is_the_top_one(tiny):
    from types import SimpleNamespace

    from fedlora_edge.coordinator.evaluate import answer_rate

    _, tok = tiny
    exs = [Example("say it", "ACCESS GRANTED"), Example("again", "ACCESS GRANTED")]

    class Oracle:  # at every position, the next token of the input is the most likely
        def __init__(self, wrong_last=False):
            self.wrong_last = wrong_last

        def __call__(self, input_ids, attention_mask):
            nxt = torch.roll(input_ids, -1, dims=1)
            logits = torch.nn.functional.one_hot(nxt, len(tok)).float()
            if self.wrong_last:  # the first example's last response token is not the top one
                last = int(attention_mask[0].sum()) - 2
                logits[0, last] = torch.roll(logits[0, last], 1)
            return SimpleNamespace(logits=logits)

    assert answer_rate(Oracle(), tok, exs, 64, "cpu") == 1.0
    assert answer_rate(Oracle(wrong_last=True), tok, exs, 64, "cpu") == 0.5


@pytest.mark.integration
@pytest.mark.parametrize("method", ["hafl", "fed-plora"])
def test_update_attacks_run_on_methods_that_hold_more_than_they_send(tmp_path, method):
    # HAFL sends importance scores beside its factors, Fed-PLoRA a few of the R components it holds:
    # an attacker's update is crafted from those, and the run goes on
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={"model": "tiny-llama", "method": method, "fleet": "spread10", "rounds": 2,
                                 "clients_per_round": 4, "train.steps": 1, "train.batch_size": 2,
                                 "data.samples_per_client": 8, "data.eval_per_domain": 1, "data.tasks": ["add"],
                                 "max_new_tokens": 2, "lora.max_rank": 8, "lora.rank": 4,
                                 "contamination.attack": "sign_flip", "contamination.fraction": 0.3})
    report = Simulation(cfg, tmp_path).run()
    assert len(report["rounds"]) == 2 and report["contamination"]
