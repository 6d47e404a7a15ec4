"""HAFL, FSLoRA and Fed-PLoRA: closed-form aggregation, Select-N-Fold exactness, sketch
unbiasedness, importance scores, and bytes counted from what is actually sent."""

import random

import pytest
import torch

from fedlora_edge.coordinator.aggregate import Contribution
from fedlora_edge.coordinator.config import load_config
from fedlora_edge.coordinator.methods import MethodContext, get_method
from fedlora_edge.coordinator.methods.fslora import sketch_product
from fedlora_edge.coordinator.methods.hafl import HaflSettings, top_components
from fedlora_edge.core.lora import ClientPlan, ModulePlan, install_adapter, slice_factors, uniform_plan
from fedlora_edge.core.wire import decode_tensors
from fedlora_edge.edge_client.partial import PartialTraining, folded

M = "layer.q"
DIMS = {M: (3, 2)}  # in 3, out 2


def fac(a, b):
    return {M: (torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))}


def plan_of(components, scale=1.0, **extra):
    return ClientPlan({M: ModulePlan(tuple(components))}, scale, len(components), extra)


def global4():
    a = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10
    b = -torch.arange(8, dtype=torch.float32).reshape(2, 4) / 10
    return {M: (a, b)}


def comps(a_rows, b_cols):
    """Client factors whose component i is (A row a_rows[i], B column b_cols[i])."""
    return fac(a_rows, [list(x) for x in zip(*b_cols)])


# ------------------------------------------------------------------------------------ Fed-PLoRA


def test_fed_plora_averages_each_index_over_its_trainers_and_keeps_untrained_ones():
    g = global4()
    ca = Contribution("a", plan_of([0, 2]), comps([[1, 1, 1], [2, 2, 2]], [[1, 1], [2, 2]]), 1.0)
    cb = Contribution("b", plan_of([2, 3]), comps([[5, 5, 5], [7, 7, 7]], [[5, 5], [7, 7]]), 3.0)
    ctx = MethodContext(DIMS, 1.0, 1, 4)
    a, b = get_method("fed-plora").aggregate(g, [ca, cb], ctx, {})[0][M]
    assert torch.equal(a[0], torch.tensor([1.0, 1, 1]))           # only a trained 0
    assert torch.equal(a[1], g[M][0][1])                           # nobody trained 1
    assert torch.allclose(a[2], torch.tensor([4.25, 4.25, 4.25]))  # (1·2 + 3·5) / 4
    assert torch.equal(a[3], torch.tensor([7.0, 7, 7]))
    assert torch.allclose(b[:, 2], torch.tensor([4.25, 4.25])) and torch.equal(b[:, 1], g[M][1][:, 1])


def test_fed_plora_plan_selects_r_of_R_at_random_per_round_and_sends_all_R():
    m = get_method("fed-plora")
    ctx = MethodContext({M: (3, 2), "layer.v": (3, 4)}, 2.0, 1, 8, seed=5)
    p1, p2 = m.plan("a", 3, ctx, 1), m.plan("a", 3, ctx, 2)
    assert p1.rank == 3 and p1.extra == {"hold": 8, "frozen": "fold"} and p1.scale == 2.0
    assert all(len(mp.components) == 3 and max(mp.components) < 8 for mp in p1.modules.values())
    assert p1.to_json() == m.plan("a", 3, ctx, 1).to_json()  # reproducible from the seed
    assert p1.to_json() != p2.to_json()                        # redrawn per round
    assert m.plan("a", 50, ctx, 1).rank == 8 and m.plan("a", 0, ctx, 1) is None
    g = {k: (torch.randn(8, 3), torch.randn(d[1], 8)) for k, d in ctx.modules.items()}
    start = m.start_factors("a", g, p1, {})
    assert all(start[k][0].shape[0] == 8 for k in g)


@pytest.fixture(scope="module")
def tiny():
    from peft import get_peft_model

    from fedlora_edge.core.lora import adapted_modules, lora_config
    from fedlora_edge.core.models import load_model

    model, tok = load_model("tiny-llama")
    dims = adapted_modules(model, ["q_proj", "v_proj"])
    peft_model = get_peft_model(model, lora_config(uniform_plan(dims, 4, 2.0), ["q_proj", "v_proj"]),
                                adapter_name="client")
    return peft_model, dims


def test_select_n_fold_starts_exactly_at_the_global_model(tiny):
    peft_model, dims = tiny
    gen = torch.Generator().manual_seed(0)
    R, scale = 6, 2.0
    g = {m: (torch.randn(R, n, generator=gen) * 0.3, torch.randn(o, R, generator=gen) * 0.3)
         for m, (n, o) in dims.items()}
    ids = torch.tensor([[3, 8, 1, 22, 9, 14, 2]])
    install_adapter(peft_model, "client", uniform_plan(dims, R, scale), g, ["q_proj", "v_proj"])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
    w0 = {m: peft_model.base_model.model.get_submodule(m).base_layer.weight.clone() for m in dims}
    rng = random.Random(1)
    plan = ClientPlan({m: ModulePlan(tuple(sorted(rng.sample(range(R), 2)))) for m in dims}, scale, 2,
                      {"hold": R, "frozen": "fold"})
    with folded(peft_model, g, plan):
        install_adapter(peft_model, "client", plan, slice_factors(g, plan), ["q_proj", "v_proj"])
        with torch.no_grad():
            got = peft_model(input_ids=ids).logits
        assert not torch.equal(peft_model.base_model.model.get_submodule(next(iter(dims))).base_layer.weight,
                               w0[next(iter(dims))])
    assert (want - got).abs().max() < 1e-5
    for m in dims:  # the base is restored bit for bit
        assert torch.equal(peft_model.base_model.model.get_submodule(m).base_layer.weight, w0[m])


# --------------------------------------------------------------------------------------- FSLoRA


def test_fslora_plan_scales_by_R_over_k_and_redraws_the_sketch():
    m = get_method("fslora")
    ctx = MethodContext(DIMS, 2.0, 1, 8, seed=1)
    p = m.plan("a", 2, ctx, 1)
    assert p.rank == 2 and p.scale == pytest.approx(2.0 * 8 / 2) and p.extra["sketch"] == 2
    assert "hold" not in p.extra  # only the sketched components go down
    draws = {m.plan("a", 2, ctx, r).modules[M].components for r in range(1, 30)}
    assert len(draws) > 5
    assert m.plan("a", 99, ctx, 1).scale == pytest.approx(2.0)  # k = R: the plain adapter


def test_sketched_product_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    R, k = 8, 3
    a, b = torch.randn(R, 5, generator=gen), torch.randn(4, R, generator=gen)
    m = get_method("fslora")
    ctx = MethodContext({M: (5, 4)}, 1.0, 1, R, seed=0)
    draws = 4000
    mean = sum(sketch_product(a, b, m.plan(f"c{i}", k, ctx, 1).modules[M].components, R)
               for i in range(draws)) / draws
    full = b @ a
    # one draw is far off; the mean over many draws converges to the full product
    one = sketch_product(a, b, m.plan("c0", k, ctx, 1).modules[M].components, R)
    assert (one - full).norm() / full.norm() > 0.3
    assert (mean - full).norm() / full.norm() < 0.05


def test_fslora_averages_deltas_over_all_sampled_clients():
    g = global4()
    ca = Contribution("a", plan_of([0, 2]), comps([[1, 1, 1], [2, 2, 2]], [[1, 1], [2, 2]]), 1.0)
    cb = Contribution("b", plan_of([2, 3]), comps([[5, 5, 5], [7, 7, 7]], [[5, 5], [7, 7]]), 3.0)
    a, _ = get_method("fslora").aggregate(g, [ca, cb], MethodContext(DIMS, 1.0, 1, 4), {})[0][M]
    ga = g[M][0]
    assert torch.allclose(a[0], ga[0] + 0.25 * (1 - ga[0]))
    assert torch.allclose(a[2], ga[2] + 0.25 * (2 - ga[2]) + 0.75 * (5 - ga[2]))
    assert torch.allclose(a[3], ga[3] + 0.75 * (7 - ga[3]))
    assert torch.equal(a[1], ga[1])


@pytest.mark.parametrize("method", ["fslora", "hetlora", "fedit"])
def test_the_server_adam_step_takes_a_sign_step_first_and_keeps_its_moments(method):
    from fedlora_edge.coordinator.aggregate import server_step
    from fedlora_edge.coordinator.config import ServerSettings

    g = global4()
    ca = Contribution("a", plan_of([0, 1, 2, 3]), comps([[9, 9, 9]] * 4, [[9, 9]] * 4), 1.0)
    ctx = MethodContext(DIMS, 1.0, 4, 4)
    state: dict = {}
    agg = get_method(method).aggregate(g, [ca], ctx, state)[0]
    a, b = server_step(g, agg, ServerSettings(optimizer="adamw", lr=0.01), state)[M]
    # first bias-corrected Adam step: p - lr * sign(pseudo-gradient); the delta is towards 9
    assert torch.allclose(a, g[M][0] + 0.01, atol=1e-6) and torch.allclose(b, g[M][1] + 0.01, atol=1e-6)
    assert state["server_step"] == 1 and f"server.m.{M}.A" in state["tensors"]
    a2, _ = server_step(g, agg, ServerSettings(optimizer="sgd", lr=0.5), {})[M]
    assert torch.allclose(a2, g[M][0] + 0.5 * (9 - g[M][0]))  # half way to the aggregate
    assert server_step(g, agg, ServerSettings(), {}) is agg  # none: the aggregate as it is


# ----------------------------------------------------------------------------------------- HAFL


def test_top_components_by_score_with_ties_to_the_lower_index():
    assert top_components([0.1, 0.5, 0.3, 0.5], 2) == (1, 3)
    assert top_components([0.0] * 5, 3) == (0, 1, 2)


def test_hafl_aggregates_per_component_and_plans_from_reported_importance():
    m = get_method("hafl")
    ctx = MethodContext(DIMS, 1.0, 1, 4, settings=HaflSettings(variant="truncate", explore=False))
    state: dict = {}
    p = m.plan("a", 2, ctx, 1, state)
    assert p.modules[M].components == (0, 1) and "hold" not in p.extra  # no scores yet: the first r
    g = global4()
    ca = Contribution("a", plan_of([0, 1]), comps([[1, 1, 1], [2, 2, 2]], [[1, 1], [2, 2]]), 1.0,
                      {M: torch.tensor([0.1, 0.2])})
    cb = Contribution("b", plan_of([1, 3]), comps([[4, 4, 4], [6, 6, 6]], [[4, 4], [6, 6]]), 1.0,
                      {M: torch.tensor([0.4, 0.9])})
    a, b = m.aggregate(g, [ca, cb], ctx, state)[0][M]
    assert torch.equal(a[0], torch.tensor([1.0, 1, 1])) and torch.equal(a[3], torch.tensor([6.0, 6, 6]))
    assert torch.allclose(a[1], torch.tensor([3.0, 3, 3]))  # mean over its two trainers, not diluted
    assert torch.equal(a[2], g[M][0][2])
    imp = state["importance"]
    assert imp["global"][M] == pytest.approx([0.1, 0.3, 0.0, 0.9])
    assert imp["clients"]["a"][M] == pytest.approx({"0": 0.1, "1": 0.2})  # only what it scored
    # next round: b ranks by its own scores, a new client by the fleet's, and a by its own where it
    # scored and by the fleet's elsewhere (component 3, which only b trained, outranks a's own 0)
    assert m.plan("b", 2, ctx, 2, state).modules[M].components == (1, 3)
    assert m.plan("c", 1, ctx, 2, state).modules[M].components == (3,)
    assert m.plan("a", 2, ctx, 2, state).modules[M].components == (1, 3)


def test_hafl_freeze_holds_all_R_and_scores_them_all():
    m = get_method("hafl")
    ctx = MethodContext(DIMS, 1.0, 1, 4, settings=HaflSettings(explore=False))
    p = m.plan("a", 2, ctx, 1, {})
    assert p.extra["hold"] == 4 and p.extra["frozen"] == "forward"
    g = global4()
    assert m.start_factors("a", g, p, {})[M][0].shape == (4, 3)
    c = Contribution("a", p, comps([[1, 1, 1], [2, 2, 2]], [[1, 1], [2, 2]]), 1.0,
                     {M: torch.tensor([0.1, 0.2, 0.7, 0.05])})
    state: dict = {}
    m.aggregate(g, [c], ctx, state)
    assert state["importance"]["global"][M] == pytest.approx([0.1, 0.2, 0.7, 0.05])
    assert m.plan("a", 2, ctx, 2, state).modules[M].components == (1, 2)


def _hafl_round(m, ctx, state, clients, r, round_idx):
    """Plan ``clients`` at rank ``r``, give each trained component a score (1 + its index), aggregate."""
    g = global4()
    cs = []
    for client in clients:
        p = m.plan(client, r, ctx, round_idx, state)
        comps_ = p.modules[M].components
        cs.append(Contribution(client, p, comps([[1.0] * 3] * len(comps_), [[1.0] * 2] * len(comps_)), 1.0,
                               {M: torch.tensor([1.0 + j for j in comps_])}))
    m.aggregate(g, cs, ctx, state)
    return [c.plan.modules[M].components for c in cs]


def test_hafl_trains_every_component_before_importance_ranks_them():
    # a fleet without a rank-R client: without exploration it locks onto round 1's components
    m = get_method("hafl")
    locked = MethodContext(DIMS, 1.0, 1, 4, settings=HaflSettings(variant="truncate", explore=False))
    state: dict = {}
    picks = [_hafl_round(m, locked, state, ["a", "b"], 1, k) for k in (1, 2, 3)]
    assert {c for rnd in picks for p in rnd for c in p} == {0}  # component 0 only, for ever
    ctx = MethodContext(DIMS, 1.0, 1, 4, settings=HaflSettings(variant="truncate"))
    state = {}
    seen: set[int] = set()
    for k in range(1, 5):  # each round trains at least one component nobody had: R rounds at most
        picks = _hafl_round(m, ctx, state, ["a", "b"], 1, k)
        assert not set(c for p in picks for c in p) <= seen or len(seen) == 4
        seen |= {c for p in picks for c in p}
    assert seen == {0, 1, 2, 3} and state["importance"]["trained"][M] == [0, 1, 2, 3]
    # then importance ranks them: the highest score (component 3) for everyone
    assert _hafl_round(m, ctx, state, ["a", "b"], 1, 5) == [(3,), (3,)]
    # clients start from places of their own: these two cover R = 4 in two rounds
    state = {}
    assert {c for k in (1, 2) for p in _hafl_round(m, ctx, state, ["a", "f"], 1, k) for c in p} == {0, 1, 2, 3}


def test_hafl_zero_pad_control_divides_by_every_client():
    m = get_method("hafl")
    g = global4()
    ca = Contribution("a", plan_of([0, 1]), comps([[1, 1, 1], [2, 2, 2]], [[1, 1], [2, 2]]), 1.0, {M: torch.ones(2)})
    cb = Contribution("b", plan_of([1, 3]), comps([[4, 4, 4], [6, 6, 6]], [[4, 4], [6, 6]]), 1.0, {M: torch.ones(2)})
    zp = MethodContext(DIMS, 1.0, 1, 4, settings=HaflSettings(variant="truncate", aggregation="zero_pad"))
    a, _ = m.aggregate(g, [ca, cb], zp, {})[0][M]
    a_het, _ = get_method("hetlora").aggregate(g, [ca, cb], zp, {})[0][M]
    assert torch.allclose(a, a_het)  # the same rule as HetLoRA's zero-padding for the same selection
    assert torch.allclose(a[0], g[M][0][0] + 0.5 * (1 - g[M][0][0]))  # diluted by the client that did not train it


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.q_proj(x)


def test_importance_is_monotone_in_w_times_grad():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Toy(), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"]), adapter_name="c")
    layer = model.base_model.model.q_proj
    a, b = layer.lora_A["c"].weight, layer.lora_B["c"].weight
    with torch.no_grad():
        a.fill_(1.0)
        b.fill_(1.0)
    plan = ClientPlan({"q_proj": ModulePlan((0, 1, 2, 3))}, 1.0, 4)
    hooks = PartialTraining(model, "c", plan, False, (0.85, 0.85))
    strength = torch.tensor([0.5, 3.0, 1.0, 2.0])  # |w·grad| per component
    for step in range(6):
        noise = 1.0 + 0.5 * (step % 2)  # varying gradients so the uncertainty term is not zero
        a.grad = strength[:, None].expand(4, 4) * noise
        b.grad = strength[None, :].expand(3, 4) * noise
        hooks.after_backward()
    s = hooks.scores()["importance.q_proj"]
    assert s.shape == (4,) and torch.equal(torch.argsort(s), torch.argsort(strength))


def test_forward_freeze_trains_only_the_selected_components(tiny):
    peft_model, dims = tiny
    R = 4
    g = {m: (torch.randn(R, n) * 0.1, torch.randn(o, R) * 0.1) for m, (n, o) in dims.items()}
    plan = ClientPlan({m: ModulePlan((1, 3)) for m in dims}, 2.0, 2, {"hold": R, "frozen": "forward"})
    install_adapter(peft_model, "client", uniform_plan(dims, R, 2.0), g, ["q_proj", "v_proj"])
    hooks = PartialTraining(peft_model, "client", plan, True, (0.85, 0.85))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        peft_model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), labels=torch.tensor([[1, 2, 3, 4, 5]])).loss.backward()
        hooks.after_backward()
        opt.step()
        opt.zero_grad()
        hooks.after_step()
    for m in dims:
        layer = peft_model.base_model.model.get_submodule(m)
        a = layer.lora_A["client"].weight
        assert torch.equal(a[[0, 2]], g[m][0][[0, 2]])  # frozen, weight decay notwithstanding
        assert not torch.equal(a[[1, 3]], g[m][0][[1, 3]])
    s = hooks.scores()
    assert all(v.shape == (R,) for v in s.values()) and any(float(v[0]) > 0 for v in s.values())


# ------------------------------------------------------------------------- bytes, through the engine

FAST = {"model": "tiny-llama", "rounds": 1, "clients_per_round": 8, "train.steps": 1, "train.batch_size": 2,
        "data.eval_per_domain": 2, "data.samples_per_client": 4, "data.tasks": ["add"], "max_new_tokens": 2,
        "lora.max_rank": 8, "planner.transfer_budget_s": 0.05}


@pytest.mark.integration
@pytest.mark.parametrize("method,variant", [("fed-plora", None), ("fslora", None), ("hafl", "freeze"),
                                            ("hafl", "truncate")])
def test_bytes_up_and_down_match_the_closed_form(tmp_path, method, variant):
    from fedlora_edge.coordinator.simulate import Simulation

    extra = {"hafl.variant": variant} if variant else {}
    sim = Simulation(load_config(overrides={**FAST, "method": method, **extra}), tmp_path)
    e = sim.engine
    per_rank = sum(n + o for n, o in e.dims.values())  # floats per component over all adapted matrices
    R, n_mod = e.R, len(e.dims)
    assignments, _ = e.open_round(1)
    ranks = {a.plan.rank for a in assignments}
    assert len(ranks) > 1, "the fleet should get heterogeneous knobs under this transfer budget"
    for a in assignments:
        r = a.plan.rank
        down = sum(t.numel() for t in decode_tensors(a.start).values())
        ret = sim.carry_out(a)
        sent = decode_tensors(ret.update)
        up = sum(t.numel() for k, t in sent.items() if not k.startswith("importance."))
        scores = sum(t.numel() for k, t in sent.items() if k.startswith("importance."))
        full_down = method == "fed-plora" or variant == "freeze"
        assert down == (R if full_down else r) * per_rank, a.client
        assert up == r * per_rank, a.client
        assert scores == (0 if method != "hafl" else (R if variant == "freeze" else r) * n_mod)
        assert 4 * (down) == a.start_tensor_bytes
        # what the report counts is the bytes actually sent: the payload plus its safetensors header
        assert len(ret.update) - 4 * (up + scores) < 200 * len(sent)
    rec = e.close_round(1, [sim.carry_out(a) for a in assignments], [], 0.0)
    assert rec["valid_updates"] == len(assignments) and not rec["rejected"]
