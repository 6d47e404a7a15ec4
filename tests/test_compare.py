"""`fedlora compare`: method specs, one table over several runs, reuse of finished runs."""

import json

import pytest

from fedlora_edge.coordinator import compare as cmp
from fedlora_edge.coordinator.config import ConfigError, load_config

FAST = {"model": "tiny-llama", "rounds": 1, "clients_per_round": 2, "train.steps": 1, "train.batch_size": 2,
        "data.eval_per_domain": 2, "data.samples_per_client": 4, "data.tasks": ["add", "upper"],
        "max_new_tokens": 2, "lora.max_rank": 8, "planner.transfer_budget_s": 0.05}


def test_rank_specs_resolve_to_the_fleets_smallest_and_largest_capacity():
    cfg = load_config(overrides=FAST)
    lo, hi = cmp.fleet_rank_range(cfg)
    assert 1 <= lo < hi <= 8
    es = cmp.entries(cfg, ["fedit@min", "fedit@max", "fedit@3", "hafl"])
    assert [e.label for e in es] == [f"fedit-r{lo}", f"fedit-r{hi}", "fedit-r3", "hafl"]
    assert [e.cfg.lora.rank for e in es[:3]] == [lo, hi, 3] and es[3].cfg.method == "hafl"


@pytest.mark.parametrize("spec,msg", [("fedavg", "unknown method 'fedavg'"), ("fedit@big", "must be a rank"),
                                      ("fedit@99", "lora.rank"), ("hetlora,hetlora", "listed twice")])
def test_bad_specs_fail_before_anything_runs(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        cmp.entries(load_config(overrides=FAST), spec.split(","))


@pytest.mark.integration
def test_compare_writes_one_table_and_reuses_finished_runs(tmp_path, monkeypatch):
    cfg = load_config(overrides=FAST)
    rows = cmp.compare(cfg, ["fedit@min", "fslora"], tmp_path)
    assert [r["run"] for r in rows][1] == "fslora" and len(rows) == 2
    table = (tmp_path / "compare.md").read_text()
    assert "| base model |" in table and "| fslora | fslora |" in table and "add %" in table
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["rows"][1]["mb_up_per_round"] > 0 and (tmp_path / "compare.png").stat().st_size > 0

    def boom(*a, **k):
        raise AssertionError("a finished run with the same settings must be reused")

    monkeypatch.setattr("fedlora_edge.coordinator.simulate.Simulation.run", boom)
    again = cmp.compare(cfg, ["fedit@min", "fslora"], tmp_path)
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
    # another method's settings do not matter to this one's run; its own do
    assert cmp.reusable(tmp_path / "fslora", load_config(overrides={**FAST, "method": "fslora", "clair.threshold": 0.3}))
    assert not cmp.reusable(tmp_path / "fslora", load_config(overrides={**FAST, "method": "fslora", "server.lr": 0.1}))
    # other settings are not the same run
    other = load_config(overrides={**FAST, "seed": 1})
    with pytest.raises(AssertionError, match="reused"):
        cmp.compare(other, ["fslora"], tmp_path)


def test_a_run_saved_before_a_config_field_existed_is_reused_when_the_field_is_at_its_default(tmp_path):
    cfg = load_config(overrides={**FAST, "method": "fedit"})
    saved = json.loads(json.dumps(cfg.to_dict()))
    del saved["train"]["sgd_lr"]  # a field a later version added
    (tmp_path / "report.json").write_text(json.dumps({"config": saved}))
    assert cmp.reusable(tmp_path, cfg)
    assert not cmp.reusable(tmp_path, load_config(overrides={**FAST, "method": "fedit", "train.sgd_lr": 0.2}))


def test_intervals_over_seeds_and_a_paired_bootstrap_in_closed_form():
    from fedlora_edge.coordinator.stats import mean_interval, paired_bootstrap, separated

    m, lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 / 3 ** 0.5) and m - lo == pytest.approx(hi - m)
    assert mean_interval([5.0]) == (5.0, None, None)
    # every prompt of every seed 2 points apart: the interval is the point itself
    assert paired_bootstrap([[2.0] * 10, [2.0] * 7]) == (2.0, 2.0, 2.0)
    mean, lo, hi = paired_bootstrap([[1.0, -1.0] * 20, [1.0, -1.0] * 20])
    assert mean == 0.0 and lo < 0 < hi and not separated(lo, hi) and separated(0.1, 0.4)


@pytest.mark.integration
def test_compare_on_several_seeds_gives_intervals_and_paired_differences(tmp_path):
    cfg = load_config(overrides=FAST)
    cmp.compare(cfg, ["fedit@min", "local"], tmp_path, seeds=2)
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["seeds"] == [0, 1] and {p.name for p in tmp_path.iterdir()} >= {"seed-0", "seed-1"}
    (fedit, local) = saved["intervals"]
    assert fedit["seeds"] == 2 and fedit["loss"]["low"] <= fedit["loss"]["mean"] <= fedit["loss"]["high"]
    per_seed = [next(r for r in saved["per_seed"][s] if r["run"] == fedit["run"])["loss"] for s in ("0", "1")]
    assert fedit["loss"]["mean"] == pytest.approx(sum(per_seed) / 2)
    (pair,) = saved["pairs"]
    assert (pair["a"], pair["b"]) == (fedit["run"], "local") and pair["loss"]["low"] <= pair["loss"]["high"]
    own = [next(r for r in saved["per_seed"][s] if r["run"] == fedit["run"])["own_mix_loss"]
           - next(r for r in saved["per_seed"][s] if r["run"] == "local")["own_mix_loss"] for s in ("0", "1")]
    assert pair["own_mix_loss"]["mean"] == pytest.approx(sum(own) / 2)
    # a client of local that never trained its own model is scored on the base model: the table says how many did
    rep = json.loads((tmp_path / "seed-0" / "local" / "report.json").read_text())["personalised"]
    assert local["own_models"].split(", ")[0] == f"{rep['clients_trained']}/{len(rep['clients'])}"
    assert fedit["own_models"] is None  # one global model: nothing to count
    table = (tmp_path / "compare.md").read_text()
    assert "95 % interval" in table and f"| {fedit['run']} | local |" in table and "own models trained" in table


UNEQUAL = {**FAST, "planner.transfer_budget_s": 0.01}  # fed-plora's rank-8 download leaves pi4-lte out


def test_a_comparison_whose_methods_would_train_on_different_devices_stops_naming_them():
    cfg = load_config(overrides=UNEQUAL)
    with pytest.raises(ConfigError, match=r"fed-plora leaves out 1 device\(s\) that another method trains: pi4-lte"):
        cmp.compare(cfg, ["hetlora", "fed-plora"], "/nonexistent/never-written")
    # the same devices (every method plans the fleet alike): nothing to say
    assert cmp.check_same_devices(cmp.entries(load_config(overrides=FAST), ["hetlora", "fed-plora", "fslora"])) == {}


@pytest.mark.integration
def test_unequal_fleets_run_when_allowed_and_the_table_says_who_was_left_out(tmp_path):
    cfg = load_config(overrides={**UNEQUAL, "clients_per_round": 8})
    rows = cmp.compare(cfg, ["hetlora", "fed-plora"], tmp_path, allow_unequal=True)
    by = {r["run"]: r for r in rows}
    assert "pi4-lte" in by["hetlora"]["devices_trained"] and "pi4-lte" not in by["fed-plora"]["devices_trained"]
    assert "pi4-lte" in by["fed-plora"]["left_out"] and "left_out" not in by["hetlora"]
    table = (tmp_path / "compare.md").read_text()
    assert "(not the same devices)" in table and "fed-plora: trained" in table and "pi4-lte (" in table
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert all("devices_trained" in r for r in saved["rows"])


@pytest.mark.integration
def test_a_grid_shared_over_processes_gives_every_report_and_is_reused(tmp_path, monkeypatch):
    cfg = load_config(overrides=FAST)
    rows = cmp.compare(cfg, ["fedit@min", "hetlora"], tmp_path, jobs=2)
    assert [r["run"] for r in rows] == [f"fedit-r{cmp.fleet_rank_range(cfg)[0]}", "hetlora"]
    assert all((tmp_path / r["run"] / "simulate.log").is_file() for r in rows)

    def boom(*a, **k):
        raise AssertionError("finished runs must be reused")

    monkeypatch.setattr(cmp, "_start", boom)
    again = cmp.compare(cfg, ["fedit@min", "hetlora"], tmp_path, jobs=2)
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]
