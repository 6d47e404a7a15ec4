"""FedLEASE: clustering by B, the top-M router's invariants, per-cluster aggregation, the
warm-up -> experts phases, the personalised model on disk, and a run on tiny-llama."""

import copy

import pytest
import torch
from peft import get_peft_model

from fedlora_edge.coordinator.aggregate import Contribution
from fedlora_edge.coordinator.config import ConfigError, load_config
from fedlora_edge.coordinator.methods import MethodContext, get_method
from fedlora_edge.coordinator.methods.fedlease import (
    CLUSTER_ROUTER,
    FedleaseSettings,
    adjusted_rand_index,
    average_linkage,
    b_distance,
    choose_experts,
    distance_matrix,
    silhouette,
)
from fedlora_edge.core.lora import adapted_modules, install_adapter, lora_config, uniform_plan
from fedlora_edge.core.wire import decode_tensors
from fedlora_edge.edge_client.experts import (
    RoutedLoRA,
    expert_key,
    load_mixture,
    mixture_model,
    route,
    router_key,
    save_mixture,
    slot_map,
)
from fedlora_edge.edge_client.partial import update_shapes

TARGETS = ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------------- clustering


def synthetic_bs(groups: list[int], modules=("l0", "l1", "l2"), noise=0.3, seed=0):
    """One B per module per client: its group's prototype plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    protos = {(g, m): torch.randn(16, 4, generator=gen) for g in set(groups) for m in modules}
    return [{m: protos[(g, m)] + noise * torch.randn(16, 4, generator=gen) for m in modules} for g in groups]


@pytest.mark.parametrize("groups", [[0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 0, 1, 0, 1, 0, 1], [2, 0, 1, 3, 0, 1, 2, 3, 3]])
def test_clustering_recovers_the_groups_and_their_number(groups):
    dist = distance_matrix(synthetic_bs(groups))
    labels, m, scores = choose_experts(dist, max_experts=6)
    assert m == len(set(groups))
    assert adjusted_rand_index(labels, groups) == pytest.approx(1.0)
    assert max(scores, key=scores.get) == m
    assert set(scores) == set(range(2, 7))


def test_distance_is_mean_over_layers_of_one_minus_cosine():
    x = {"a": torch.tensor([[1.0, 0.0]]), "b": torch.tensor([[1.0, 1.0]])}
    y = {"a": torch.tensor([[0.0, 2.0]]), "b": torch.tensor([[2.0, 2.0]])}
    assert b_distance(x, y) == pytest.approx((1.0 + 0.0) / 2)
    assert b_distance(x, {"a": torch.zeros(1, 2), "b": -x["b"]}) == pytest.approx((1.0 + 2.0) / 2)


def test_average_linkage_and_silhouette_on_a_hand_case():
    # points on a line at 0, 1, 10, 11: two obvious pairs
    pts = torch.tensor([0.0, 1.0, 10.0, 11.0])
    dist = (pts[:, None] - pts[None, :]).abs().numpy()
    assert average_linkage(dist, 2) == [0, 0, 1, 1]
    # a = 1, b = mean(10, 11) = 10.5 for the outer points, mean(9, 10) = 9.5 for the inner ones
    want = ((10.5 - 1) / 10.5 * 2 + (9.5 - 1) / 9.5 * 2) / 4
    assert silhouette(dist, [0, 0, 1, 1]) == pytest.approx(want)


def test_linkage_silhouette_and_ari_agree_with_scikit_learn():
    sk = pytest.importorskip("sklearn")  # installed with the export extra; not a dependency of the method
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    assert sk
    rng = torch.Generator().manual_seed(3)
    for trial in range(20):
        pts = torch.randn(9, 3, generator=rng)
        dist = torch.cdist(pts, pts).double().numpy()
        for k in range(2, 8):
            ours = average_linkage(dist, k)
            theirs = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit_predict(dist)
            assert adjusted_rand_score(ours, theirs) == pytest.approx(1.0), (trial, k)
            assert silhouette(dist, ours) == pytest.approx(silhouette_score(dist, ours, metric="precomputed"))
            assert adjusted_rand_index(ours, list(theirs)) == pytest.approx(adjusted_rand_score(ours, theirs))


def test_too_few_clients_give_one_expert():
    labels, m, scores = choose_experts(distance_matrix(synthetic_bs([0, 1])), 4)
    assert (labels, m, scores) == ([0, 0], 1, {})


def test_adjusted_rand_index():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0


# ----------------------------------------------------------------------------------------- router


@pytest.mark.parametrize("m,own", [(1, 0), (2, 1), (3, 0), (4, 2)])
def test_router_keeps_the_own_expert_and_uses_1_to_m_experts(m, own):
    gen = torch.Generator().manual_seed(m)
    logits = torch.randn(500, 2 * m - 1, generator=gen) * 3
    gate = route(logits, slot_map(m, own), m)
    assert gate.shape == (500, m)
    assert torch.allclose(gate.sum(-1), torch.ones(500))
    assert bool((gate[:, own] > 0).all())
    used = (gate > 0).sum(-1)
    assert int(used.min()) >= 1 and int(used.max()) <= m
    if m > 1:  # both extremes occur on random logits: the own expert alone, and all M
        assert int(used.min()) == 1 and int(used.max()) == m


def test_router_weights_are_the_renormalised_top_m_summed_per_expert():
    logits = torch.log(torch.tensor([[0.4, 0.1, 0.3, 0.2, 0.0001]]))  # M = 3, own = 2: slots 3, 4 -> expert 2
    gate = route(logits, slot_map(3, 2), 3)
    top = torch.tensor([0.4, 0.3, 0.2]) / 0.9  # slots 0, 2, 3
    assert torch.allclose(gate[0], torch.tensor([top[0], 0.0, top[1] + top[2]]), atol=1e-5)


@pytest.fixture
def peft_tiny(tiny):
    model, tok = tiny
    base = copy.deepcopy(model)
    dims = adapted_modules(base, TARGETS)
    pm = get_peft_model(base, lora_config(uniform_plan(dims, 4, 2.0), TARGETS), adapter_name="client")
    return pm, dims


def random_experts(dims, m, r, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{mod: (torch.randn(r, n, generator=gen) * 0.2, torch.randn(o, r, generator=gen) * 0.2)
             for mod, (n, o) in dims.items()} for _ in range(m)]


def payload(dims, experts, own, router_seed=1):
    gen = torch.Generator().manual_seed(router_seed)
    m = len(experts)
    out = {}
    for mod, (n, _) in dims.items():
        out[f"base_model.model.{mod}.lora_A.weight"], out[f"base_model.model.{mod}.lora_B.weight"] = experts[own][mod]
        for j in range(m):
            if j != own:
                out[expert_key(j, mod, "A")], out[expert_key(j, mod, "B")] = experts[j][mod]
        out[router_key(mod)] = torch.randn(2 * m - 1, n, generator=gen)
    return out


def test_one_expert_is_plain_lora(peft_tiny):
    pm, dims = peft_tiny
    ids = torch.tensor([[3, 8, 1, 22, 9, 14]])
    experts = random_experts(dims, 1, 4)
    install_adapter(pm, "client", uniform_plan(dims, 4, 2.0), experts[0], TARGETS)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    plan = uniform_plan(dims, 4, 2.0, experts={"count": 1, "own": 0})
    with mixture_model(pm, "client", plan, payload(dims, experts, 0), TARGETS), torch.no_grad():
        assert isinstance(pm.base_model.model.get_submodule(next(iter(dims))), RoutedLoRA)
        got = pm(input_ids=ids).logits
    assert (want - got).abs().max() < 1e-5
    assert not isinstance(pm.base_model.model.get_submodule(next(iter(dims))), RoutedLoRA)  # put back


def test_routed_layer_is_the_gated_sum_of_experts(peft_tiny):
    pm, dims = peft_tiny
    experts = random_experts(dims, 3, 4)
    plan = uniform_plan(dims, 4, 2.0, experts={"count": 3, "own": 1})
    mod = next(iter(dims))
    x = torch.randn(2, 5, dims[mod][0])
    with mixture_model(pm, "client", plan, payload(dims, experts, 1), TARGETS), torch.no_grad():
        layer = pm.base_model.model.get_submodule(mod)
        got = layer(x)
        gate = layer.gate(x)
        want = layer.layer.base_layer(x) + sum(
            2.0 * gate[..., j:j + 1] * (x @ experts[j][mod][0].T @ experts[j][mod][1].T) for j in range(3))
    assert (want - got).abs().max() < 1e-5


# ------------------------------------------------------------------------------- method and state


def ctx_for(dims, rank=2, max_experts=4):
    return MethodContext(dims, 1.0, rank, 8, seed=0, settings=FedleaseSettings(warmup_rounds=1,
                                                                             max_experts=max_experts))


def test_per_cluster_aggregation_in_closed_form():
    dims = {"m": (3, 2)}
    ctx = ctx_for(dims)
    method = get_method("fedlease")
    state = {"fedlease": {"clusters": {"a": 0, "b": 0, "c": 1}, "experts": 3},
             "tensors": {expert_key(j, "m", w): torch.full((2, 3) if w == "A" else (2, 2), float(j))
                         for j in range(3) for w in "AB"}}
    for j in range(3):
        state["tensors"][f"{CLUSTER_ROUTER}{j}.m"] = torch.full((5, 3), float(j))

    def contrib(cid, own, v, weight):
        plan = uniform_plan(dims, 2, 1.0, experts={"count": 3, "own": own})
        return Contribution(cid, plan, {"m": (torch.full((2, 3), v), torch.full((2, 2), -v))}, weight,
                            extras={router_key("m"): torch.full((5, 3), 10 * v)})

    # uniform means within the cluster, whatever the data sizes; expert 2 had no member and keeps its value
    method.aggregate({}, [contrib("a", 0, 1.0, 1.0), contrib("b", 0, 3.0, 9.0), contrib("c", 1, 5.0, 1.0)],
                     ctx, state)
    t = state["tensors"]
    assert torch.equal(t[expert_key(0, "m", "A")], torch.full((2, 3), 2.0))
    assert torch.equal(t[expert_key(0, "m", "B")], torch.full((2, 2), -2.0))
    assert torch.equal(t[f"{CLUSTER_ROUTER}0.m"], torch.full((5, 3), 20.0))
    assert torch.equal(t[expert_key(1, "m", "A")], torch.full((2, 3), 5.0))
    assert torch.equal(t[f"{CLUSTER_ROUTER}1.m"], torch.full((5, 3), 50.0))
    assert torch.equal(t[expert_key(2, "m", "A")], torch.full((2, 3), 2.0))
    assert torch.equal(t[f"{CLUSTER_ROUTER}2.m"], torch.full((5, 3), 2.0))


def test_warm_up_then_allocation_then_experts():
    dims = {"l0": (4, 16), "l1": (4, 16)}
    ctx = ctx_for(dims, rank=4)
    method = get_method("fedlease")
    state: dict = {}
    groups = {"a": 0, "b": 0, "c": 1, "d": 1, "e": 1}
    bs = synthetic_bs(list(groups.values()), modules=dims, noise=0.1)
    plans = {cid: method.plan(cid, 8, ctx, 1, state) for cid in groups}
    assert all("experts" not in p.extra and p.extra["cluster_after"] for p in plans.values())
    assert method.plan("x", 3, ctx, 1, state) is None  # below the expert rank
    warm = [Contribution(cid, plans[cid], {m: (torch.full((4, 4), float(i)), bs[i][m]) for m in dims}, 1.0)
            for i, cid in enumerate(groups)]
    _, record = method.aggregate({}, warm, ctx, state)
    st = state["fedlease"]
    assert st["experts"] == 2 and adjusted_rand_index(list(st["clusters"].values()), list(groups.values())) == 1.0
    assert record["allocation"]["experts"] == 2
    own = st["clusters"]["c"]
    # Eq. 3: each expert starts as its cluster's mean warm-up LoRA
    assert torch.allclose(state["tensors"][expert_key(own, "l0", "A")], torch.full((4, 4), 3.0))
    assert torch.allclose(state["tensors"][expert_key(own, "l1", "B")], (bs[2]["l1"] + bs[3]["l1"] + bs[4]["l1"]) / 3)
    plan = method.plan("c", 8, ctx, 2, state)
    assert plan.extra["experts"] == {"count": 2, "own": own}
    start = method.start_factors("c", {}, plan, state)
    extras = method.start_extras("c", plan, state)
    assert torch.equal(start["l0"][0], state["tensors"][expert_key(own, "l0", "A")])
    assert set(extras) == {expert_key(1 - own, m, w) for m in dims for w in "AB"} | {router_key(m) for m in dims}
    assert extras[router_key("l0")].shape == (3, 4)
    assert update_shapes(dims, plan)[router_key("l1")] == (3, 4)
    # a client first seen after the allocation warms up, then joins the nearest expert
    late = method.plan("f", 8, ctx, 2, state)
    assert "experts" not in late.extra and "cluster_after" not in late.extra
    b_like_a = {m: bs[0][m] * 1.01 for m in dims}
    _, record = method.aggregate({}, [Contribution("f", late, {m: (torch.zeros(4, 4), b_like_a[m]) for m in dims},
                                                   1.0)], ctx, state)
    assert st["clusters"]["f"] == st["clusters"]["a"] == record["joined"]["f"]


def test_a_device_trains_its_own_expert_and_router_and_sends_only_those(peft_tiny, tiny):
    from fedlora_edge.core.data import generate_task
    from fedlora_edge.core.wire import encode_tensors
    from fedlora_edge.edge_client.trainer import TrainSettings
    from fedlora_edge.edge_client.work import assignment_meta, run_assignment

    pm, dims = peft_tiny
    _, tok = tiny
    experts = random_experts(dims, 3, 4)
    plan = uniform_plan(dims, 4, 2.0, experts={"count": 3, "own": 2})
    start = payload(dims, experts, 2)
    meta = assignment_meta(round_idx=1, plan=plan, seed=0, settings=TrainSettings(steps=3, batch_size=2, lr=0.01),
                           targets=TARGETS, dropout=0.0, model="tiny-llama")
    up, report = run_assignment(pm, tok, generate_task("add", 8, 0), meta, encode_tensors(start))
    sent = decode_tensors(up)
    assert set(sent) == set(update_shapes(dims, plan))  # own expert and routers, nothing of the others
    assert all(tuple(sent[k].shape) == shape for k, shape in update_shapes(dims, plan).items())
    assert all(not torch.equal(sent[k], start[k]) for k in sent)  # every sent tensor was trained
    assert report["steps"] == 3
    assert not any(isinstance(m, RoutedLoRA) for m in pm.modules())  # the peft layers are back


def test_personal_model_saves_and_reloads(peft_tiny, tmp_path):
    pm, dims = peft_tiny
    experts = random_experts(dims, 2, 4)
    plan = uniform_plan(dims, 4, 2.0, experts={"count": 2, "own": 1})
    tensors = payload(dims, experts, 1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with mixture_model(pm, "client", plan, tensors, TARGETS), torch.no_grad():
        want = pm(input_ids=ids).logits
    save_mixture(tmp_path / "model", plan, tensors, "tiny-llama", TARGETS)
    plan2, tensors2, meta = load_mixture(tmp_path / "model")
    assert plan2 == plan and meta["base_model"] == "tiny-llama"
    with mixture_model(pm, "client", plan2, tensors2, meta["targets"]), torch.no_grad():
        got = pm(input_ids=ids).logits
    assert torch.equal(want, got)
    with pytest.raises(ValueError, match="not a model written by save_mixture"):
        load_mixture(tmp_path)


def test_warmup_must_leave_rounds_for_the_experts():
    with pytest.raises(ConfigError, match="fedlease.warmup_rounds"):
        load_config(overrides={"method": "fedlease", "rounds": 2, "fedlease.warmup_rounds": 2})
    with pytest.raises(ConfigError, match="fedlease.max_experts"):
        load_config(overrides={"fedlease.max_experts": 1})


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.integration
def test_simulate_fedlease_on_tiny_llama(tmp_path):
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={"model": "tiny-llama", "method": "fedlease", "rounds": 3, "clients_per_round": 8,
                                 "fleet": "mixed10", "train.steps": 2, "train.batch_size": 2,
                                 "data.eval_per_domain": 2, "data.samples_per_client": 8, "max_new_tokens": 2,
                                 "fedlease.warmup_rounds": 1})
    sim = Simulation(cfg, tmp_path)
    report = sim.run()
    summary = report["method_summary"]
    # ten clients: the silhouette picks between 2 and max_experts (4) experts
    assert 2 <= summary["experts"] <= 4
    trained = {c["client"] for x in report["rounds"] for c in x["clients"]}
    assert set(summary["clusters"]) == trained
    assert report["rounds"][0]["allocation"]["experts"] == summary["experts"]
    e = sim.engine
    per_rank = sum(n + o for n, o in e.dims.values())
    m = summary["experts"]
    for x in report["rounds"][1:]:
        for row in x["clients"]:
            if row["client"] in report["rounds"][0]["allocation"]["clusters"]:
                # down: all M experts and the router; up: the own expert and the router
                router = (2 * m - 1) * sum(n for n, _ in e.dims.values())
                assert row["downlink_tensor_bytes"] == 4 * (m * 8 * per_rank + router)
                assert row["tensor_bytes"] == 4 * (8 * per_rank + router)
    assert report["final_accuracy"]["evaluated"] == "each client's own adapter"
    some = sorted(summary["clusters"])[0]
    plan, tensors, _ = load_mixture(tmp_path / "clients" / some / "model")
    assert plan.extra["experts"]["own"] == summary["clusters"][some]
    n_mod = len(e.dims)
    assert len(tensors) == 2 * n_mod * m + n_mod  # all M experts and the cluster's router
    # what a device of that cluster is sent next is exactly that model
    nxt = [a for a in e.open_round(4)[0] if summary["clusters"].get(a.client) == summary["clusters"][some]]
    for a in nxt:
        sent = decode_tensors(a.start)
        assert set(sent) == set(tensors) and all(torch.equal(sent[k], tensors[k]) for k in sent)
    for x in report["rounds"]:
        assert not x["rejected"] and x["status"] == "ok"


@pytest.mark.integration
def test_the_coordinator_resumes_after_the_allocation(tmp_path):
    # the clusters, experts and routers survive save_state/load_state: the next round sends the same
    from fedlora_edge.coordinator.engine import Engine
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={"model": "tiny-llama", "method": "fedlease", "rounds": 3, "clients_per_round": 4,
                                 "train.steps": 1, "train.batch_size": 2, "data.eval_per_domain": 1,
                                 "data.samples_per_client": 4, "max_new_tokens": 1, "fedlease.warmup_rounds": 1})
    sim = Simulation(cfg, tmp_path)
    sim.engine.begin()
    for r in (1, 2):
        sim.run_round(r)
    sim.engine.save_state()
    want, _ = sim.engine.open_round(3)
    again = Engine(cfg, tmp_path)
    assert again.load_state() == 2
    got, _ = again.open_round(3)
    assert [a.client for a in got] == [a.client for a in want]
    assert any("experts" in a.plan.extra for a in got)
    for a, b in zip(got, want):
        assert a.plan == b.plan
        x, y = decode_tensors(a.start), decode_tensors(b.start)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
