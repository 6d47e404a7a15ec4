"""The rank-1 view on a real peft model: apply a plan, read it back, scaling, state-dict keys."""

import copy

import pytest
import torch
from peft import get_peft_model

from fedlora_edge.core.lora import (
    ClientPlan,
    ModulePlan,
    adapted_modules,
    from_state_dict,
    get_factors,
    init_global_factors,
    install_adapter,
    lora_config,
    slice_factors,
    uniform_plan,
)


@pytest.fixture
def peft_tiny(tiny):
    model, tok = tiny
    base = copy.deepcopy(model)
    dims = adapted_modules(base, ["q_proj", "v_proj"])
    pm = get_peft_model(base, lora_config(uniform_plan(dims, 4, 2.0), ["q_proj", "v_proj"]), adapter_name="global")
    return pm, dims, tok


def test_plan_apply_extract_round_trip_with_mixed_ranks(peft_tiny):
    pm, dims, _ = peft_tiny
    g = init_global_factors(dims, 6, seed=0)
    g = {m: (a, torch.randn(b.shape)) for m, (a, b) in g.items()}
    mods = sorted(dims)
    plan = ClientPlan({m: ModulePlan((5, 0, 2) if i % 2 else (1,)) for i, m in enumerate(mods)}, 2.0, 3)
    start = slice_factors(g, plan)
    install_adapter(pm, "client", plan, start, ["q_proj", "v_proj"])
    back = get_factors(pm, "client")
    for i, m in enumerate(mods):
        comps = (5, 0, 2) if i % 2 else (1,)
        assert torch.equal(back[m][0], g[m][0][list(comps)])
        assert torch.equal(back[m][1], g[m][1][:, list(comps)])


def test_scale_is_the_same_for_every_rank(peft_tiny):
    pm, dims, _ = peft_tiny
    mods = sorted(dims)
    plan = ClientPlan({m: ModulePlan(tuple(range(1 + i))) for i, m in enumerate(mods)}, 2.0, 0)
    install_adapter(pm, "client", plan, slice_factors(init_global_factors(dims, 8, 0), plan), ["q_proj", "v_proj"])
    scalings = {n: mod.scaling["client"] for n, mod in pm.named_modules() if isinstance(getattr(mod, "scaling", None), dict) and "client" in mod.scaling}
    assert len(scalings) == len(mods)
    assert all(abs(s - 2.0) < 1e-12 for s in scalings.values())


def test_adapter_output_is_s_times_BA(peft_tiny):
    # a single component with known B and A changes one projection by exactly s·B A x
    pm, dims, tok = peft_tiny
    m0 = sorted(dims)[0]
    plan = uniform_plan(dims, 1, 2.0)
    f = {m: (torch.zeros(1, i), torch.zeros(o, 1)) for m, (i, o) in dims.items()}
    a = torch.randn(1, dims[m0][0])
    b = torch.randn(dims[m0][1], 1)
    f[m0] = (a, b)
    install_adapter(pm, "client", plan, f, ["q_proj", "v_proj"])
    layer = pm.get_submodule("base_model.model." + m0)
    x = torch.randn(2, dims[m0][0])
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
    assert torch.allclose(got, 2.0 * x @ (b @ a).T, atol=1e-5)


def test_get_factors_returns_copies_not_live_parameters(peft_tiny):
    pm, dims, _ = peft_tiny
    plan = uniform_plan(dims, 2, 2.0)
    install_adapter(pm, "client", plan, slice_factors(init_global_factors(dims, 2, 0), plan), ["q_proj", "v_proj"])
    f = get_factors(pm, "client")
    m0 = sorted(dims)[0]
    before = f[m0][0].clone()
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert torch.equal(f[m0][0], before)


def test_from_state_dict_rejects_foreign_keys():
    with pytest.raises(ValueError, match="not a LoRA factor key"):
        from_state_dict({"model.embed_tokens.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="lora_B missing"):
        from_state_dict({"base_model.model.x.q_proj.lora_A.weight": torch.zeros(1)})


def test_plan_json_round_trip():
    p = ClientPlan({"a": ModulePlan((3, 1)), "b": ModulePlan((0,))}, 2.0, 2, {"k": 1})
    assert ClientPlan.from_json(p.to_json()) == p


def test_setting_factors_that_miss_a_module_fails(peft_tiny):
    from fedlora_edge.core.lora import set_factors

    pm, dims, _ = peft_tiny
    plan = uniform_plan(dims, 2, 2.0)
    f = slice_factors(init_global_factors(dims, 2, 0), plan)
    install_adapter(pm, "client", plan, f, ["q_proj", "v_proj"])
    f.pop(sorted(f)[0])
    with pytest.raises(ValueError, match="missing"):
        set_factors(pm, "client", f)
