"""The standard defences (median, trimmed mean, Multi-Krum, norm bounding) in closed form on 2-4
clients, their update view under heterogeneous ranks, and their settings.  The conformance tests
every method passes (equal in, same out; NaN rejected; deterministic; runs in simulate; streaming
order) pick them up from the registry."""

import pytest
import torch

from fedlora_edge.coordinator.aggregate import Contribution
from fedlora_edge.coordinator.config import ConfigError, load_config
from fedlora_edge.coordinator.methods import MethodContext, get_method
from fedlora_edge.coordinator.robust import delta_factors, squared_distances, update_norms
from fedlora_edge.core.lora import ClientPlan, ModulePlan

M = "layer.q"
DIMS = {M: (3, 2)}  # in 3, out 2
U_B, U_A = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0, -1.0]])  # U = U_B U_A, rank 1


def plan(*comps):
    return ClientPlan({M: ModulePlan(tuple(comps))}, scale=1.0, rank=len(comps))


def scaled(name: str, c: float, weight: float = 1.0) -> Contribution:
    """A rank-1 client whose update, from a zero global B, is ``c · U``."""
    return Contribution(name, plan(0), {M: (U_A.clone(), c * U_B)}, weight)


ZERO = {M: (U_A.clone(), torch.zeros(2, 1))}  # global rank 1: A = U_A, B = 0, so G = 0
U = U_B @ U_A


def run(method: str, contribs, **settings):
    m = get_method(method)
    st = m.Settings(**settings) if m.Settings else None
    out, record = m.aggregate(ZERO, contribs, MethodContext(DIMS, 1.0, 1, 1, settings=st), {})
    a, b = out[M]
    return b @ a, record


def test_median_takes_the_middle_update_per_coordinate():
    got, _ = run("median", [scaled("a", 1.0), scaled("b", 2.0), scaled("c", 100.0)])
    assert torch.allclose(got, 2.0 * U, atol=1e-5)
    got, _ = run("median", [scaled("a", 1.0), scaled("b", 2.0), scaled("c", 4.0), scaled("d", 100.0)])
    assert torch.allclose(got, 3.0 * U, atol=1e-5)  # an even count: the mean of the two middle values


def test_trimmed_mean_drops_each_extreme_then_averages():
    four = [scaled("a", 1.0), scaled("b", 2.0), scaled("c", 3.0), scaled("d", 100.0)]
    got, record = run("trimmed-mean", four, trim=0.25)
    assert torch.allclose(got, 2.5 * U, atol=1e-5) and record["trimmed"] == {"per_side": 1, "of": 4}
    got, _ = run("trimmed-mean", four, trim=0.0)
    assert torch.allclose(got, 26.5 * U, atol=1e-4)  # nothing trimmed: the plain mean


def test_multi_krum_leaves_out_the_far_update_and_krum_keeps_the_most_central():
    four = [scaled("a", 1.0), scaled("b", 1.2), scaled("c", 0.8, weight=2.0), scaled("d", 50.0)]
    got, record = run("multi-krum", four, byzantine=1)
    assert record["krum"]["kept"] == ["a", "b", "c"] and record["krum"]["neighbours"] == 1
    assert torch.allclose(got, (1.0 + 1.2 + 2 * 0.8) / 4 * U, atol=1e-5)  # data-size weights over the kept
    got, record = run("multi-krum", four, byzantine=1, keep=1)
    assert record["krum"]["kept"] == ["a"] and torch.allclose(got, U, atol=1e-5)
    assert record["krum"]["guarantee"] is False  # 4 clients cannot carry f = 1 (needs K > 2f + 2)


def test_norm_bound_clips_to_the_median_norm():
    got, record = run("norm-bound", [scaled("a", 1.0), scaled("b", 2.0), scaled("c", 10.0)])
    norm_u = float(U.norm())
    assert record["norm_bound"]["threshold"] == pytest.approx(2.0 * norm_u)
    assert record["norm_bound"]["clipped"] == {"c": pytest.approx(0.2)}
    assert torch.allclose(got, (1.0 + 2.0 + 2.0) / 3 * U, atol=1e-5)
    got, record = run("norm-bound", [scaled("a", 1.0), scaled("b", 2.0), scaled("c", 10.0)], max_norm=norm_u)
    assert torch.allclose(got, U, atol=1e-5)  # the absolute cap is smaller: every update clipped to ‖U‖


def test_a_lower_rank_client_is_judged_on_what_it_changed():
    # global rank 2; the client trained only component 0, so its update is against that component alone
    torch.manual_seed(0)
    ga, gb = torch.randn(2, 3), torch.randn(2, 2)
    a0, b0 = torch.randn(1, 3), torch.randn(2, 1)
    c = Contribution("x", plan(0), {M: (a0, b0)}, 1.0)
    db, da = delta_factors({M: (ga, gb)}, c, M)
    assert torch.allclose((db @ da).float(), b0 @ a0 - gb[:, :1] @ ga[:1], atol=1e-6)
    for method in ("median", "trimmed-mean", "multi-krum", "norm-bound"):
        m = get_method(method)
        out, _ = m.aggregate({M: (ga, gb)}, [c], MethodContext(DIMS, 1.0, 2, 2), {})
        a, b = out[M]  # one client: the global product moves by exactly its update
        assert torch.allclose(b @ a, b0 @ a0 + gb[:, 1:] @ ga[1:], atol=1e-5), method


def test_distances_and_norms_from_factors_equal_the_dense_ones():
    torch.manual_seed(1)
    dims = {M: (5, 4), "layer.v": (5, 3)}
    g = {m: (torch.randn(3, i), torch.randn(o, 3)) for m, (i, o) in dims.items()}
    contribs = []
    for k, r in enumerate((1, 2, 3, 2)):
        p = ClientPlan({m: ModulePlan(tuple(range(r))) for m in dims}, 1.0, r)
        contribs.append(Contribution(f"c{k}", p, {m: (torch.randn(r, i), torch.randn(o, r)) for m, (i, o) in dims.items()},
                                     1.0))
    deltas = [{m: delta_factors(g, c, m) for m in dims} for c in contribs]
    dense = [torch.cat([(d[m][0] @ d[m][1]).flatten() for m in dims]) for d in deltas]
    want = torch.stack([torch.stack([(x - y).pow(2).sum() for y in dense]) for x in dense])
    assert torch.allclose(squared_distances(deltas), want, rtol=1e-9, atol=1e-9)
    assert update_norms(deltas) == pytest.approx([float(x.norm()) for x in dense])


@pytest.mark.parametrize("field, value, match", [
    ("trimmed_mean.trim", 0.5, "trimmed_mean.trim"),
    ("multi_krum.byzantine", -1, "multi_krum.byzantine"),
    ("multi_krum.keep", -2, "multi_krum.keep"),
    ("norm_bound.scale", 0.0, "norm_bound.scale"),
    ("norm_bound.max_norm", -1.0, "norm_bound.max_norm"),
])
def test_bad_settings_fail_before_anything_starts_naming_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides={"method": field.split(".")[0].replace("_", "-"), field: value})
