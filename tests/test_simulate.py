"""`simulate` end to end on tiny-llama: every method, the report, the saved adapter, determinism."""

import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from fedlora_edge.coordinator.config import load_config
from fedlora_edge.coordinator.methods import method_names
from fedlora_edge.coordinator.simulate import Simulation
from fedlora_edge.core.models import load_model

pytestmark = pytest.mark.integration

ROW_KEYS = {"client", "rank", "uplink_bytes", "downlink_bytes", "local_seconds", "loss_first", "loss_last"}

FAST = {"model": "tiny-llama", "rounds": 2, "clients_per_round": 3, "train.steps": 2, "train.batch_size": 4,
        "data.eval_per_domain": 3, "data.samples_per_client": 12, "data.tasks": ["add", "upper"],
        "max_new_tokens": 4, "lora.max_rank": 8, "lora.rank": 4}


def run(tmp_path, method, **extra):
    cfg = load_config(overrides={**FAST, "method": method, **extra})
    sim = Simulation(cfg, tmp_path)
    return sim, sim.run()


@pytest.mark.parametrize("method", method_names())
def test_every_method_runs_and_writes_a_loadable_adapter(tmp_path, method):
    sim, report = run(tmp_path, method, **({"fedlease.warmup_rounds": 1} if method == "fedlease" else {}))
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["method"] == method and len(saved["rounds"]) == 2
    assert set(saved["final_accuracy"]) >= {"overall", "per_domain"}
    assert set(saved["final_accuracy"]["per_domain"]) == {"add", "upper"}
    for r in saved["rounds"]:
        # the global adapter is scored per round where the method has one
        assert r["status"] == "ok" and ("accuracy" in r) == sim.engine.method.global_model
        for c in r["clients"]:
            assert ROW_KEYS <= set(c)
            if method != "centralized":
                assert c["uplink_bytes"] > 0 and c["downlink_bytes"] > 0
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "bytes.png").stat().st_size > 0
    if method == "fedlease":  # each client's model (experts and router) reloads as the engine evaluated it
        from fedlora_edge.edge_client.experts import load_mixture

        cid = sorted(p.name for p in (tmp_path / "clients").iterdir())[0]
        plan, tensors, meta = load_mixture(tmp_path / "clients" / cid / "model")
        want, want_tensors, _ = sim.engine.method.personal_model(cid, sim.engine.ctx, sim.engine.state.method_state)
        assert plan == want and all(torch.equal(tensors[k], want_tensors[k]) for k in want_tensors)
        return
    folder = tmp_path / "adapter"
    if method == "local":
        folder = next((tmp_path / "clients").iterdir()) / "adapter"
    # stock peft loads it onto a fresh base and gives the in-process logits
    base, _ = load_model("tiny-llama")
    loaded = PeftModel.from_pretrained(base, str(folder)).eval()
    ids = torch.tensor([[5, 9, 13, 17, 21, 25]])
    if method == "local":
        from fedlora_edge.core.lora import install_adapter, uniform_plan
        personal = sim.engine.state.method_state["personal"][folder.parent.name]
        rank = next(iter(personal.values()))[0].shape[0]
        install_adapter(sim.engine.model, "personal", uniform_plan(sim.engine.dims, rank, sim.engine.cfg.lora.scale), personal, sim.engine.targets)
    else:
        sim.engine._install_global()
    with torch.no_grad():
        expected = sim.engine.model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_trained_adapter_is_not_the_initial_one(tmp_path):
    sim, _ = run(tmp_path, "fedit")
    b = next(iter(sim.engine.state.global_factors.values()))[1]
    assert b.abs().sum() > 0  # B starts at zero


def test_same_seed_same_adapter_other_seed_differs(tmp_path):
    s1, r1 = run(tmp_path / "a", "hetlora")
    s2, r2 = run(tmp_path / "b", "hetlora")
    s3, _ = run(tmp_path / "c", "hetlora", seed=1)
    for m in s1.engine.state.global_factors:
        assert torch.equal(s1.engine.state.global_factors[m][0], s2.engine.state.global_factors[m][0])
        assert torch.equal(s1.engine.state.global_factors[m][1], s2.engine.state.global_factors[m][1])
    assert r1["rounds"][-1]["accuracy"] == r2["rounds"][-1]["accuracy"]
    assert any(not torch.equal(s1.engine.state.global_factors[m][1], s3.engine.state.global_factors[m][1])
               for m in s1.engine.state.global_factors)


def test_bytes_are_the_safetensors_payloads_of_the_planned_ranks(tmp_path):
    from fedlora_edge.core.lora import slice_factors, to_state_dict, uniform_plan
    from fedlora_edge.core.wire import encode_tensors

    sim, report = run(tmp_path, "hetlora", fleet="mixed8")
    for r in report["rounds"]:
        for c in r["clients"]:
            plan = uniform_plan(sim.engine.dims, c["rank"], sim.engine.cfg.lora.scale)
            down = len(encode_tensors(to_state_dict(slice_factors(sim.engine.state.global_factors, plan))))
            assert c["downlink_bytes"] == down
            # the update carries the same tensors back: the same bytes
            assert c["uplink_bytes"] == down


def test_heterogeneous_fleet_gets_heterogeneous_ranks_and_zero_capacity_devices_are_skipped(tmp_path):
    # a tight transfer budget makes link speed bind the rank even for the tiny model
    sim, report = run(tmp_path, "hetlora", fleet="mixed10-with-zero", clients_per_round=10,
                      **{"planner.transfer_budget_s": 0.05})
    caps = {f["client"]: f["capacity"] for f in report["fleet"]}
    assert caps["pi-zero-1"] == 0 and caps["agx-orin"] == 8 and 0 < caps["phone-1"] < 8
    zero = [f for f in report["fleet"] if f["capacity"] == 0]
    assert {f["client"] for f in zero} == {"pi-zero-1", "pi-zero-2"}
    assert all(not f["eligible"] and "GB usable" in f["reason"] for f in zero)
    trained = {c["client"] for r in report["rounds"] for c in r["clients"]}
    assert trained == set(caps) - {"pi-zero-1", "pi-zero-2"}  # the 8 that can train, every round
    ranks = {c["client"]: c["rank"] for c in report["rounds"][0]["clients"]}
    assert ranks["phone-1"] == caps["phone-1"]


def test_rejected_update_is_reported_and_round_goes_on(tmp_path, monkeypatch):
    import fedlora_edge.coordinator.simulate as simmod

    real = simmod.Simulation.carry_out

    def poisoned(self, a):
        ret = real(self, a)
        if a.client == "pi5":
            from fedlora_edge.core.wire import decode_tensors, encode_tensors
            t = decode_tensors(ret.update)
            k = sorted(t)[0]
            t[k] = t[k].clone()
            t[k].view(-1)[0] = float("nan")
            ret = simmod.Returned(a, encode_tensors(t), ret.report)
        return ret

    monkeypatch.setattr(simmod.Simulation, "carry_out", poisoned)
    sim, report = run(tmp_path, "fedit", clients_per_round=8, rounds=1)
    rej = report["rounds"][0]["rejected"]
    assert [r["client"] for r in rej] == ["pi5"] and "NaN" in rej[0]["reason"]
    assert report["rounds"][0]["status"] == "ok" and report["rounds"][0]["valid_updates"] == 7
    assert all(torch.isfinite(b).all() for _, b in sim.engine.state.global_factors.values())


@pytest.mark.parametrize("corrupt,reason", [("negative", "negative"), ("short", "shape"), ("missing", "missing")])
def test_bad_importance_scores_are_rejected_and_the_round_goes_on(tmp_path, monkeypatch, corrupt, reason):
    import fedlora_edge.coordinator.simulate as simmod
    from fedlora_edge.core.wire import decode_tensors, encode_tensors

    real = simmod.Simulation.carry_out

    def bad(self, a):
        ret = real(self, a)
        if a.client != "pi5":
            return ret
        t = decode_tensors(ret.update)
        k = sorted(x for x in t if x.startswith("importance."))[0]
        if corrupt == "negative":
            t[k] = -t[k] - 1.0
        elif corrupt == "short":
            t[k] = t[k][:-1].clone()
        else:
            del t[k]
        return simmod.Returned(a, encode_tensors(t), ret.report)

    monkeypatch.setattr(simmod.Simulation, "carry_out", bad)
    _, report = run(tmp_path, "hafl", clients_per_round=8, rounds=1)
    rej = report["rounds"][0]["rejected"]
    assert [r["client"] for r in rej] == ["pi5"] and reason in rej[0]["reason"]
    assert report["rounds"][0]["valid_updates"] == 7


def test_a_report_that_is_not_a_mapping_is_rejected_not_a_crash(tmp_path, monkeypatch):
    import fedlora_edge.coordinator.simulate as simmod

    real = simmod.Simulation.carry_out

    def junk(self, a):
        ret = real(self, a)
        return simmod.Returned(a, ret.update, ["not", "a", "report"]) if a.client == "pi5" else ret

    monkeypatch.setattr(simmod.Simulation, "carry_out", junk)
    _, report = run(tmp_path, "fedit", clients_per_round=8, rounds=1)
    rej = report["rounds"][0]["rejected"]
    assert [r["client"] for r in rej] == ["pi5"] and "report is not a JSON object" in rej[0]["reason"]


def test_below_min_updates_the_global_adapter_is_kept(tmp_path, monkeypatch):
    import fedlora_edge.coordinator.engine as engmod

    monkeypatch.setattr(engmod, "validate_update", lambda *a: (_ for _ in ()).throw(engmod.UpdateRejected("x")))
    sim, report = run(tmp_path, "fedit", rounds=1)
    assert report["rounds"][0]["status"] == "failed"
    assert all(torch.all(b == 0) for _, b in sim.engine.state.global_factors.values())


def test_user_jsonl_data(tmp_path):
    from fedlora_edge.core.data import Example, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", [Example(f"say {w}", w, d) for w, d in
                                           [("cat", "animals"), ("dog", "animals"), ("red", "colours"), ("blue", "colours")] * 3])
    write_jsonl(tmp_path / "eval.jsonl", [Example("say cow", "cow", "animals"), Example("say tan", "tan", "colours")])
    sim, report = run(tmp_path / "out", "fedit", **{"data.train_file": str(tmp_path / "train.jsonl"),
                                                     "data.eval_file": str(tmp_path / "eval.jsonl")})
    assert set(report["final_accuracy"]["per_domain"]) == {"animals", "colours"}


def test_unreachable_min_updates_fails_before_training(tmp_path):
    from fedlora_edge.coordinator.config import ConfigError

    cfg = load_config(overrides={**FAST, "method": "centralized", "min_updates": 2})
    with pytest.raises(ConfigError, match="min_updates: 2 valid updates per round cannot be reached"):
        Simulation(cfg, tmp_path)


def test_local_scores_every_client_including_untrained_ones(tmp_path):
    sim, report = run(tmp_path, "local", rounds=1, clients_per_round=2)
    pers = report["personalised"]
    assert len(pers["clients"]) == 8 and pers["clients_trained"] == 2
    untrained = [v for v in pers["clients"].values() if not v["trained"]]
    assert all(v["overall"] == report["base_accuracy"]["overall"] for v in untrained)


def test_local_writes_client_adapters_and_no_global_one(tmp_path):
    run(tmp_path, "local", rounds=1)
    assert not (tmp_path / "adapter").exists()
    assert len(list((tmp_path / "clients").glob("*/adapter/adapter_model.safetensors"))) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_with_the_same_report_shape(tmp_path):
    sim, report = run(tmp_path, "hetlora", device="cuda")
    assert report["device"] == "cuda" and report["rounds"][-1]["status"] == "ok"


def test_the_weight_is_the_coordinators_grant_never_what_a_device_declares(tmp_path):
    sim, _ = run(tmp_path, "fedit", rounds=1)
    e = sim.engine
    c = e.participants[0]
    (a, *_), _ = e.open_round(2)
    report = {"round": 2, "num_examples": 10_000, "steps": 1, "first_loss": 1.0, "last_loss": 1.0, "seconds": 0.1}
    assert e.accept(a, a.start, report).weight == len(c.train)  # simulation: capped by its data
    e.set_profile(c.id, c.device.profile, examples=10**9)  # a hello that declares a billion examples
    assert e.accept(a, a.start, report).weight == len(c.train)  # buys nothing
    c.max_examples = 5  # what the coordinator granted it at enrolment
    assert e.accept(a, a.start, report).weight == 5.0
    e.cfg = dataclasses.replace(e.cfg, weights=dataclasses.replace(e.cfg.weights, policy="equal"))
    assert e.accept(a, a.start, report).weight == 1.0
