"""Aggregation rules: closed forms on 2-3 clients, invariance, boundaries, and every registered
method against NaN updates and for determinism."""

import pytest
import torch

from fedlora_edge.coordinator.aggregate import Contribution, average_components, svd_factors
from fedlora_edge.coordinator.methods import MethodContext, get_method, method_names
from fedlora_edge.coordinator.validate import UpdateRejected, capped_weight, validate_update
from fedlora_edge.core.lora import ClientPlan, ModulePlan, expected_shapes, to_state_dict, uniform_plan

M = "layer.q"
DIMS = {M: (3, 2)}  # in 3, out 2


def fac(a_rows, b_cols):
    return {M: (torch.tensor(a_rows, dtype=torch.float32), torch.tensor(b_cols, dtype=torch.float32).T.contiguous())}


def plan(*comps):
    return ClientPlan({M: ModulePlan(tuple(comps))}, scale=1.0, rank=len(comps))


def test_fedit_is_data_weighted_average_of_factors():
    # Prepare: global rank 1; two clients with weights 1 and 3
    g = fac([[0, 0, 0]], [[0, 0]])
    c1 = Contribution("a", plan(0), fac([[1, 2, 3]], [[4, 8]]), 1.0)
    c2 = Contribution("b", plan(0), fac([[5, 6, 7]], [[0, 4]]), 3.0)
    # Execute
    out, _ = get_method("fedit").aggregate(g, [c1, c2], MethodContext(DIMS, 1.0, 1, 1), {})
    # Assert: A = (1*[1,2,3] + 3*[5,6,7]) / 4, B likewise
    a, b = out[M]
    assert torch.allclose(a, torch.tensor([[4.0, 5.0, 6.0]]))
    assert torch.allclose(b, torch.tensor([[1.0], [5.0]]))


def test_hetlora_zero_padding_dilutes_components_few_clients_trained():
    # Prepare: global rank 2 at zero; client a (w=1) trains both components, b (w=1) only the first
    g = fac([[0, 0, 0], [0, 0, 0]], [[0, 0], [0, 0]])
    ca = Contribution("a", plan(0, 1), fac([[2, 2, 2], [4, 4, 4]], [[2, 2], [4, 4]]), 1.0)
    cb = Contribution("b", plan(0), fac([[6, 6, 6]], [[6, 6]]), 1.0)
    out, _ = get_method("hetlora").aggregate(g, [ca, cb], MethodContext(DIMS, 1.0, 1, 2), {})
    a, b = out[M]
    # component 0: (2 + 6) / 2 = 4; component 1: only a trained it, zero-padded: (4 + 0) / 2 = 2
    assert torch.allclose(a, torch.tensor([[4.0] * 3, [2.0] * 3]))
    assert torch.allclose(b, torch.tensor([[4.0, 2.0], [4.0, 2.0]]))


def test_per_component_mean_over_trainers_and_untrained_components_keep_their_value():
    g = fac([[1, 1, 1], [9, 9, 9]], [[1, 1], [9, 9]])
    ca = Contribution("a", plan(0), fac([[3, 3, 3]], [[3, 3]]), 1.0)
    cb = Contribution("b", plan(0), fac([[5, 5, 5]], [[5, 5]]), 1.0)
    a, b = average_components(g, [ca, cb], "trainers")[M]
    assert torch.allclose(a[0], torch.tensor([4.0] * 3)) and torch.allclose(a[1], torch.tensor([9.0] * 3))
    assert torch.allclose(b[:, 1], torch.tensor([9.0, 9.0]))


def test_no_contribution_leaves_global_unchanged():
    g = fac([[1, 2, 3]], [[4, 5]])
    for how in ("trainers", "all"):
        a, b = average_components(g, [], how)[M]
        assert torch.equal(a, g[M][0]) and torch.equal(b, g[M][1])


def test_flexlora_averages_products_then_redistributes_by_svd():
    # Prepare: two rank-1 clients with orthogonal updates of different size
    ca = Contribution("a", plan(0), fac([[1, 0, 0]], [[3, 0]]), 1.0)   # ΔW_a = 3 e1 e1ᵀ
    cb = Contribution("b", plan(0), fac([[0, 1, 0]], [[0, 1]]), 1.0)   # ΔW_b = 1 e2 e2ᵀ
    g = fac([[0, 0, 0], [0, 0, 0]], [[0, 0], [0, 0]])
    out, _ = get_method("flexlora").aggregate(g, [ca, cb], MethodContext(DIMS, 1.0, 1, 2), {})
    a, b = out[M]
    expected = torch.tensor([[1.5, 0, 0], [0, 0.5, 0]])  # (ΔW_a + ΔW_b) / 2
    assert torch.allclose(b @ a, expected, atol=1e-6)
    # the first component alone is the best rank-1 approximation: the larger singular value
    assert torch.allclose(b[:, :1] @ a[:1], torch.tensor([[1.5, 0, 0], [0, 0, 0]]), atol=1e-6)


def test_svd_factors_pads_past_the_rank_of_delta_w():
    a, b = svd_factors(torch.ones(2, 3), 3)
    assert a.shape == (3, 3) and b.shape == (2, 3)
    assert torch.allclose(b @ a, torch.ones(2, 3), atol=1e-5)
    assert torch.all(b[:, 2] == 0)


@pytest.mark.parametrize("name", [n for n in method_names()])
def test_all_clients_equal_in_same_out(name):
    m = get_method(name)
    if not m.equal_in_same_out:  # a server step: the result also depends on the previous global adapter
        pytest.skip(f"{name} declares equal_in_same_out = False")
    ctx = MethodContext(DIMS, 1.0, 2, 2)
    torch.manual_seed(0)
    same = fac(torch.randn(2, 3).tolist(), torch.randn(2, 2).tolist())
    g = fac(torch.randn(2, 3).tolist(), torch.randn(2, 2).tolist())
    contribs = [Contribution(c, m.plan(c, 2, ctx, 1), same, w) for c, w in (("a", 1.0), ("b", 2.0), ("c", 5.0))]
    state: dict = {}
    out, _ = m.aggregate(g, contribs, ctx, state)
    if m.personalised:  # each client's own adapter is its (identical) update, up to refactoring
        for c in "abc":
            pa, pb = state["personal"][c][M]
            assert torch.allclose(pb @ pa, same[M][1] @ same[M][0], atol=1e-5)
        return
    a, b = out[M]
    assert torch.allclose(b @ a, same[M][1] @ same[M][0], atol=1e-5)


@pytest.mark.parametrize("name", [n for n in method_names()])
def test_every_method_plans_validatable_updates_and_nan_is_rejected(name):
    m = get_method(name)
    ctx = MethodContext({M: (3, 2), "layer.v": (3, 4)}, 2.0, 2, 4)
    p = m.plan("a", 3, ctx, 1)
    assert p is not None
    shapes = expected_shapes(ctx.modules, p)
    good = {k: torch.zeros(s) for k, s in shapes.items()}
    validate_update("a", good, shapes)
    bad = dict(good)
    key = sorted(bad)[0]
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = float("nan")
    with pytest.raises(UpdateRejected, match="NaN"):
        validate_update("a", bad, shapes)


@pytest.mark.parametrize("name", [n for n in method_names()])
def test_every_method_is_deterministic(name):
    m = get_method(name)
    ctx = MethodContext(DIMS, 1.0, 2, 2)

    def once():
        torch.manual_seed(3)
        g = fac(torch.randn(2, 3).tolist(), torch.randn(2, 2).tolist())
        cs = [Contribution(c, m.plan(c, 2, ctx, 1), fac(torch.randn(2, 3).tolist(), torch.randn(2, 2).tolist()), 1.0)
              for c in "ab"]
        return m.aggregate(g, cs, ctx, {})[0][M]

    (a1, b1), (a2, b2) = once(), once()
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_validation_names_the_client_and_the_problem():
    shapes = expected_shapes(DIMS, plan(0, 1))
    good = {k: torch.zeros(s) for k, s in shapes.items()}
    with pytest.raises(UpdateRejected, match="client x: .*shape"):
        validate_update("x", {k: torch.zeros(1, 1) for k in shapes}, shapes)
    with pytest.raises(UpdateRejected, match="missing"):
        validate_update("x", dict(list(good.items())[:1]), shapes)
    with pytest.raises(UpdateRejected, match="unexpected"):
        validate_update("x", {**good, "base_model.model.other.lora_A.weight": torch.zeros(1)}, shapes)
    with pytest.raises(UpdateRejected, match="dtype"):
        validate_update("x", {k: v.double() for k, v in good.items()}, shapes)
    with pytest.raises(UpdateRejected, match="Inf"):
        validate_update("x", {k: torch.full_like(v, float("inf")) for k, v in good.items()}, shapes)


def test_claimed_example_count_is_capped():
    assert capped_weight(10_000, 64) == 64
    assert capped_weight(5, 64) == 5
    with pytest.raises(UpdateRejected):
        capped_weight(0, 64)


def test_uniform_plan_state_dict_keys_are_peft_keys():
    p = uniform_plan(DIMS, 2, 1.0)
    keys = set(expected_shapes(DIMS, p))
    assert keys == set(to_state_dict({M: (torch.zeros(2, 3), torch.zeros(2, 2))}))
    assert "base_model.model.layer.q.lora_A.weight" in keys


def test_flexlora_keeps_components_past_min_dims_trainable():
    # a 2x3 ΔW has at most 2 singular directions; a rank-3 global keeps its third A row
    prev_a = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    a, b = svd_factors(torch.randn(2, 3), 3, fill_a=prev_a)
    assert torch.equal(a[2], prev_a[2]) and torch.all(b[:, 2] == 0)


def test_plans_with_repeated_or_out_of_range_components_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        ModulePlan((1, 1))
    g = fac([[0, 0, 0]], [[0, 0]])
    c = Contribution("a", plan(3), fac([[1, 1, 1]], [[1, 1]]), 1.0)
    with pytest.raises(ValueError, match="client a: plan trains component 3"):
        average_components(g, [c], "trainers")


def test_absurd_values_are_rejected():
    shapes = expected_shapes(DIMS, plan(0))
    with pytest.raises(UpdateRejected, match="not a trained LoRA factor"):
        validate_update("x", {k: torch.full(s, 1e30) for k, s in shapes.items()}, shapes)


@pytest.mark.parametrize("seed", range(6))
def test_the_factored_svd_is_the_dense_one_without_forming_the_product(seed):
    from fedlora_edge.coordinator.aggregate import (
        product_svd_factors,
        stacked_factors,
        svd_factors,
        weighted_delta_w,
    )

    gen = torch.Generator().manual_seed(seed)
    m, n = [(48, 48), (64, 24), (20, 70)][seed % 3]
    ranks = [1 + int(x) for x in torch.randint(0, 6, (2 + seed % 4,), generator=gen)]
    plan = lambda r: ClientPlan({"w": ModulePlan(tuple(range(r)))}, 1.0)  # noqa: E731
    contribs = [Contribution(f"c{i}", plan(r), {"w": (torch.randn(r, n, generator=gen),
                                                      torch.randn(m, r, generator=gen) * 0.1)}, float(i + 1))
                for i, r in enumerate(ranks)]
    rank = sum(ranks) + 3  # past the stacks' width: the extra components are B = 0, A orthonormal
    fill = torch.randn(rank, n, generator=gen)
    ref_a, ref_b = svd_factors(weighted_delta_w(contribs, "w").double(), rank)
    a, b = product_svd_factors(*stacked_factors(contribs, "w"), rank, fill_a=fill)
    scale = (ref_b @ ref_a).abs().max()
    for r in range(1, sum(ranks) + 1):  # every truncation: the best rank-r approximation
        got = (b[:, :r] @ a[:r]).double()
        assert (got - ref_b[:, :r] @ ref_a[:r]).abs().max() <= 1e-5 * scale
    assert torch.all(b[:, sum(ranks):] == 0)
    assert torch.allclose(a @ a.T, torch.eye(rank), atol=1e-5)
