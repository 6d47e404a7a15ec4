"""Adding a method is one module: the method of docs/methods.md, examples/halfstep.py, defined
outside the package with its own settings, runs in `simulate` and over MQTT without a line changed
elsewhere (tests/test_plugins.py runs the page's commands, which load it with --plugin)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora_edge.coordinator.errors import ConfigError
from fedlora_edge.coordinator.methods import unregister

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "halfstep.py"


@pytest.fixture
def halfstep():
    """examples/halfstep.py imported afresh (its @register adds the method), removed afterwards."""
    spec = importlib.util.spec_from_file_location("halfstep_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    unregister("halfstep")
    sys.modules.pop(spec.name, None)


def _cfg(tmp_path, **over):
    from fleets import fleet

    from fedlora_edge.coordinator.config import load_config

    base = {"model": "tiny-llama", "fleet": fleet(tmp_path, ["d1", "d2"]), "rounds": 1, "clients_per_round": 2,
            "train.steps": 2, "train.batch_size": 4, "data.tasks": ["add"], "data.samples_per_client": 8,
            "data.eval_per_domain": 2, "max_new_tokens": 2, "lora.rank": 2, "lora.max_rank": 4}
    return load_config(overrides={**base, **over})


def test_a_method_registered_from_outside_runs_in_simulate_with_its_settings(tmp_path, halfstep):
    from fedlora_edge.coordinator.simulate import Simulation

    with pytest.raises(ConfigError, match="halfstep.server_lr"):
        _cfg(tmp_path, method="halfstep", **{"halfstep.server_lr": 2.0})
    cfg = _cfg(tmp_path, method="halfstep", **{"halfstep.server_lr": 0.25})
    assert cfg.to_dict()["halfstep"] == {"server_lr": 0.25}
    rep = Simulation(cfg, tmp_path / "half").run()
    Simulation(_cfg(tmp_path, method="fedit"), tmp_path / "fedit").run()
    assert rep["rounds"][0]["server_lr"] == 0.25  # its round record, in the report
    half = load_file(str(tmp_path / "half" / "adapter" / "adapter_model.safetensors"))
    full = load_file(str(tmp_path / "fedit" / "adapter" / "adapter_model.safetensors"))
    # B starts at zero and the clients train alike: a quarter of FedIT's step
    for k in (k for k in half if "lora_B" in k):
        assert torch.allclose(half[k], 0.25 * full[k], atol=1e-7) and full[k].abs().sum() > 0


@pytest.mark.integration
def test_a_method_registered_from_outside_runs_over_mqtt(tmp_path, halfstep):
    from fedlora_edge.coordinator.emulate import emulate
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = _cfg(tmp_path, method="halfstep", **{"halfstep.server_lr": 0.25})
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    Simulation(cfg, tmp_path / "sim").run()
    assert rep["rounds"][0]["valid_updates"] == 2 and rep["rounds"][0]["server_lr"] == 0.25
    a = load_file(str(tmp_path / "emu" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "sim" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
