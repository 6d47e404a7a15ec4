"""Config loading: presets, YAML, overrides, and errors that name the field."""

import pytest

from fedlora_edge.coordinator.config import ConfigError, load_config, parse_override


def test_defaults_and_quick_preset():
    d = load_config()
    assert d.model == "smollm2-135m" and d.fleet == "mixed8" and d.method == "hetlora"
    q = load_config(preset="quick")
    assert q.rounds < d.rounds and q.train.steps < d.train.steps


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("method: fedit\nrounds: 3\ntrain:\n  lr: 1e-3\ndata:\n  tasks: [add, upper]\n")
    cfg = load_config(p, overrides=dict([parse_override("rounds=7"), parse_override("lora.rank=4")]))
    assert cfg.method == "fedit" and cfg.rounds == 7 and cfg.train.lr == 1e-3
    assert cfg.data.tasks == ("add", "upper") and cfg.lora.rank == 4


@pytest.mark.parametrize("yaml_text,field", [
    ("rounds: 0\n", "rounds"),
    ("rounds: three\n", "rounds"),
    ("train:\n  stepz: 3\n", "train.stepz"),
    ("method: fedprox\n", "method"),
    ("data:\n  tasks: [add, poetry]\n", r"data.tasks\[1\]"),
    ("data:\n  partition: random\n", "data.partition"),
    ("lora:\n  scale: -1\n", "lora.scale"),
    ("data:\n  train_file: /nope.jsonl\n", "data.train_file"),
    ("clients_per_round: 2\nmin_updates: 3\n", "min_updates"),
    ("lora:\n  rank: 16\n  max_rank: 8\n", "lora.rank"),
    ("data:\n  tasks: [add, add]\n", r"data.tasks\[1\]"),
    ("hafl:\n  variant: prune\n", "hafl.variant"),
    ("hafl:\n  beta1: 1.5\n", "hafl.beta1"),
    ("fslora:\n  server_optimizer: adamw\n", "fslora.server_optimizer: moved to server.optimizer"),
    ("server:\n  optimizer: rmsprop\n", "server.optimizer"),
    ("method: local\nserver:\n  optimizer: adamw\n", "server.optimizer"),
])
def test_bad_values_fail_naming_the_field(tmp_path, yaml_text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError, match=f"^{field}"):
        load_config(p)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid methods: .*fedit.*hetlora"):
        load_config(overrides={"method": "nope"})


def test_missing_config_file_and_bad_preset():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("/no/such.yaml")
    with pytest.raises(ConfigError, match="preset"):
        load_config(preset="huge")


def test_examples_run_yaml_lists_every_field_with_its_default():
    import pathlib

    import yaml

    from fedlora_edge.coordinator.config import RunConfig, load_config

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "run.yaml"
    listed = yaml.safe_load(path.read_text())

    def keys(tree, prefix=""):
        out = set()
        for k, v in tree.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}"}
        return out

    assert keys(listed) == keys(RunConfig().to_dict())
    assert load_config(path) == RunConfig()
