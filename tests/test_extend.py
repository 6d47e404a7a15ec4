"""Adding a method is one module: a throw-away method defined here, outside the package, with its
own settings, runs in `simulate` and over MQTT without a line changed elsewhere (docs/methods.md
walks through the same class)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from coordinator.aggregate import average_components
from coordinator.errors import ConfigError
from coordinator.methods import register, unregister
from edge_client.lora import uniform_plan


@dataclass(frozen=True)
class HalfStepSettings:
    server_lr: float = 0.5   # how far the server moves toward the clients' average

    def __post_init__(self):
        if not 0.0 < self.server_lr <= 1.0:
            raise ConfigError("halfstep.server_lr: must be in (0, 1]")


class HalfStep:
    """FedIT with a server step: every client at rank ``lora.rank``; the global factors move a share
    ``server_lr`` of the way to the clients' weighted average, ``g ← g + η (avg − g)``."""

    name = "halfstep"
    Settings = HalfStepSettings

    def global_rank(self, ctx):
        return ctx.rank

    def plan(self, client, capacity, ctx, round_idx, state=None):
        return uniform_plan(ctx.modules, ctx.rank, ctx.scale) if capacity >= ctx.rank else None

    def aggregate(self, global_factors, contributions, ctx, state):
        avg = average_components(global_factors, contributions, "trainers")
        lr = ctx.settings.server_lr
        return {m: (a + lr * (avg[m][0] - a), b + lr * (avg[m][1] - b)) for m, (a, b) in global_factors.items()}, \
            {"server_lr": lr}


@pytest.fixture
def halfstep():
    register(HalfStep)
    yield
    unregister("halfstep")


def _cfg(tmp_path, **over):
    from fleets import fleet

    from coordinator.config import load_config

    base = {"model": "tiny-llama", "fleet": fleet(tmp_path, ["d1", "d2"]), "rounds": 1, "clients_per_round": 2,
            "train.steps": 2, "train.batch_size": 4, "data.tasks": ["add"], "data.samples_per_client": 8,
            "data.eval_per_domain": 2, "max_new_tokens": 2, "lora.rank": 2, "lora.max_rank": 4}
    return load_config(overrides={**base, **over})


def test_a_method_registered_from_outside_runs_in_simulate_with_its_settings(tmp_path, halfstep):
    from coordinator.simulate import Simulation

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
    from coordinator.emulate import emulate
    from coordinator.simulate import Simulation

    cfg = _cfg(tmp_path, method="halfstep", **{"halfstep.server_lr": 0.25})
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    Simulation(cfg, tmp_path / "sim").run()
    assert rep["rounds"][0]["valid_updates"] == 2 and rep["rounds"][0]["server_lr"] == 0.25
    a = load_file(str(tmp_path / "emu" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "sim" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
