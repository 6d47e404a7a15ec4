"""CLAIR: subspace recovery and detection on synthetic updates, plain averaging when nobody is
contaminated, and a contaminated run through `simulate`."""

import pytest
import torch

from fedlora_edge.coordinator.aggregate import Contribution, weighted_delta_w
from fedlora_edge.coordinator.config import ConfigError, load_config
from fedlora_edge.coordinator.methods import MethodContext, get_method
from fedlora_edge.coordinator.methods.clair import (
    alone_at_top_rank,
    block_lambda,
    clair_round,
    compress,
    outlier_pursuit,
    unshared_bases,
)
from fedlora_edge.core.lora import uniform_plan

M, M2 = "l.q", "l.v"


def principal_sines(basis: torch.Tensor, true_rows: torch.Tensor) -> torch.Tensor:
    """Sines of the principal angles between span(basis) (orthonormal columns) and the row space
    of ``true_rows``."""
    q, _ = torch.linalg.qr(true_rows.T.to(torch.float64))
    cos = torch.linalg.svdvals(basis.T @ q).clamp(max=1.0)
    return torch.sqrt(1 - cos ** 2)


def synthetic(k=8, bad=(2, 5), m=20, n=30, r=3, noise=0.0, seed=0, correlated=False):
    """Benign updates ``B_k (C_k V)``: a shared row space ``V`` (rank r); corrupted ones have a
    random row space of their own and the same norm.  ``correlated``: ``B_k`` and ``C_k`` are
    perturbations of common ones, so benign updates also point the same way (as real clients'
    updates from one starting adapter do)."""
    g = torch.Generator().manual_seed(seed)
    v = {mod: torch.randn(r, n, generator=g, dtype=torch.float64) for mod in (M, M2)}
    b0 = {mod: torch.randn(m, r, generator=g, dtype=torch.float64) for mod in (M, M2)}
    ups = {}
    for i in range(k):
        f = {}
        for mod in (M, M2):
            if correlated:
                b = b0[mod] + 0.3 * torch.randn(m, r, generator=g, dtype=torch.float64)
                mix = torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(r, r, generator=g, dtype=torch.float64)
            else:
                b = torch.randn(m, r, generator=g, dtype=torch.float64)
                mix = torch.randn(r, r, generator=g, dtype=torch.float64)
            a = mix @ v[mod]
            if i in bad:
                a_bad = torch.randn(r, n, generator=g, dtype=torch.float64)
                a = a_bad * (a.norm() / a_bad.norm())
            if noise:
                e = torch.randn(r, n, generator=g, dtype=torch.float64)
                a = a + noise * e * (a.norm() / e.norm())
            f[mod] = (a, b)
        ups[f"c{i}"] = f
    return ups, v


def test_compressed_blocks_keep_norms_and_column_space():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 30, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
    c, d = compress(a, b), b @ a
    assert c.shape == (20, 4)
    assert torch.allclose(c.norm(), d.norm()) and torch.allclose(torch.linalg.matrix_norm(c, "nuc"),
                                                                   torch.linalg.matrix_norm(d, "nuc"))


def test_noiseless_case_recovers_the_subspace_and_flags_exactly_the_corrupted():
    ups, v = synthetic()
    res = clair_round(ups, dict.fromkeys(ups, 1.0), consistency=False)
    assert res["flagged"] == ["c2", "c5"]
    for mod in (M, M2):
        basis = res["subspace"][mod]
        assert basis.shape[1] == 3
        assert float(principal_sines(basis, v[mod]).max()) < 1e-4
    assert max(res["scores"][c]["sparse_share"] for c in res["benign"]) < 1e-3
    assert min(res["scores"][c]["sparse_share"] for c in res["flagged"]) > 0.75  # threshold 0.5


def test_with_noise_at_five_percent_detection_stays_exact():
    # separation stated: benign updates carry noise of 5% of their norm off the shared subspace;
    # a corrupted update lies wholly off it, at the same norm
    for seed in range(3):
        ups, v = synthetic(noise=0.05, seed=seed)
        res = clair_round(ups, dict.fromkeys(ups, 1.0), consistency=False)
        assert res["flagged"] == ["c2", "c5"], seed
        sines = principal_sines(res["subspace"][M][:, :3], v[M])
        assert float(sines.max()) < 0.1


def test_low_rank_plus_block_sparse_is_exact_on_the_blocks():
    ups, _ = synthetic()
    # the shared subspace is the row space of B A: the blocks of (B A)ᵀ = Aᵀ Bᵀ
    blocks = [compress(b.T, a.T) for a, b in (ups[c][M] for c in sorted(ups))]
    low, sp = outlier_pursuit(blocks, block_lambda(blocks, 0.75))
    for y, lo, s in zip(blocks, low, sp):
        assert torch.allclose(lo + s, y, atol=1e-5)
    benign = [lo for i, lo in enumerate(low) if i not in (2, 5)]
    sv = torch.linalg.svdvals(torch.cat(benign, 1))
    assert int((sv > 1e-6 * sv[0]).sum()) == 3  # the benign part of L has the shared rank
    assert [i for i, x in enumerate(sp) if float(x.norm()) > 0] == [2, 5]  # S is zero outside the outliers


def test_in_subspace_attacks_are_caught_by_the_consistency_check():
    ups, _ = synthetic(bad=(), correlated=True)
    ups["c1"] = {mod: (a, -b) for mod, (a, b) in ups["c1"].items()}        # sign-flipped
    ups["c6"] = {mod: (a, 10 * b) for mod, (a, b) in ups["c6"].items()}    # scaled
    plain = clair_round(ups, dict.fromkeys(ups, 1.0), consistency=False)
    assert "c1" not in plain["flagged"]  # in the subspace: the decomposition alone cannot see a sign flip
    res = clair_round(ups, dict.fromkeys(ups, 1.0))
    assert res["flagged"] == ["c1", "c6"]
    assert res["scores"]["c1"]["cosine"] < 0 and res["scores"]["c6"]["norm_ratio"] > 3


def rows(*idx, n=6):
    """Unit rows e_i of R^n (0-based), one per index."""
    return torch.eye(n, dtype=torch.float64)[list(idx)]


def test_the_directions_only_one_client_reaches_are_its_unshared_ones():
    bases = {"top": rows(0, 1, 2, 3).T, "mid": rows(0, 1).T, "low": rows(0).T}
    un = unshared_bases(bases)
    assert un["top"].shape[1] == 2 and torch.allclose(un["top"] @ un["top"].T, rows(2, 3).T @ rows(2, 3))
    assert un["mid"].shape[1] == 0 and un["low"].shape[1] == 0  # each is covered by "top"


def lone_top_rank_round(step=0.0):
    """Three clients on R^6 (input) -> R^4: ``top`` (rank 4, started from A = e0..e3, B = I: equal
    energy on e0..e3) and two rank-1 clients started from e0; only ``top`` reaches e1..e3.  With
    ``step``, each A row also moved ``step`` along e4, the direction of their inputs: the one part
    of the updates off their own rows, common to all three."""
    e0, e4 = rows(0), rows(4)
    ups = {"top": {M: (rows(0, 1, 2, 3) + step * e4, torch.eye(4, dtype=torch.float64))},
           "low1": {M: (e0 + step * e4, torch.tensor([[1.0], [0.5], [0.0], [0.0]], dtype=torch.float64))},
           "low2": {M: (e0 + step * e4, torch.tensor([[0.8], [0.0], [0.6], [0.0]], dtype=torch.float64))}}
    reach = {"top": {M: rows(0, 1, 2, 3)}, "low1": {M: e0}, "low2": {M: e0}}
    return ups, reach


def test_a_client_alone_at_the_top_rank_is_judged_off_its_own_rows():
    ups, reach = lone_top_rank_round()
    whole = clair_round(ups, dict.fromkeys(ups, 1.0))
    assert whole["flagged"] == ["top"]  # judged whole, e1..e3 have no company and read as sparse
    res = clair_round(ups, dict.fromkeys(ups, 1.0), reach=reach)
    assert res["flagged"] == []
    top = res["scores"]["top"]
    assert top["sparse_share"] == 0.0 and top["in_reach"] == pytest.approx(1.0)
    assert top["unshared"] == pytest.approx((3 / 4) ** 0.5)  # 3 of its 4 equal directions: its own
    assert res["scores"]["low1"]["unshared"] == 0.0


def test_an_update_off_its_own_rows_is_flagged():
    ups, reach = lone_top_rank_round(step=0.1)
    # a rank-1 client that started from e0 but sends a change along e5, where nobody's rows or
    # steps go
    ups["bad"] = {M: (rows(5), torch.tensor([[1.0], [0.5], [0.0], [0.0]], dtype=torch.float64))}
    reach["bad"] = {M: rows(0)}
    res = clair_round(ups, dict.fromkeys(ups, 1.0), reach=reach)
    assert res["flagged"] == ["bad"]
    assert res["scores"]["bad"]["in_reach"] == 0.0
    assert max(res["scores"][c]["sparse_share"] for c in ("top", "low1", "low2")) < 0.05


def test_clair_reach_is_validated():
    from fedlora_edge.coordinator.methods.clair import ClairSettings

    assert ClairSettings().reach is True
    with pytest.raises(ConfigError, match="clair.reach"):
        ClairSettings(reach="no")


def test_nobody_contaminated_nobody_flagged_and_the_global_is_plain_averaging():
    ups, _ = synthetic(bad=(), correlated=True, noise=0.05)
    ctx = MethodContext({M: (30, 20), M2: (30, 20)}, 1.0, 3, 3)
    plan = uniform_plan(ctx.modules, 3, 1.0)
    contribs = [Contribution(c, plan, {m: (a.float(), b.float()) for m, (a, b) in f.items()}, float(1 + i))
                for i, (c, f) in enumerate(sorted(ups.items()))]
    g = {m: (torch.zeros(3, 30), torch.zeros(20, 3)) for m in (M, M2)}
    state: dict = {}
    out, record = get_method("clair").aggregate(g, contribs, ctx, state)
    assert record["detection"]["flagged"] == []
    plain, _ = get_method("flexlora").aggregate(g, contribs, ctx, {})  # Σ p_k B_k A_k refactored to rank R
    for m in (M, M2):
        a, b = out[m]
        pa, pb = plain[m]
        assert torch.allclose(b @ a, pb @ pa, atol=1e-4 * float((pb @ pa).abs().max()))
    assert set(state["personal"]) == set(ups)


def test_flagged_clients_do_not_touch_the_global_adapter():
    ups, _ = synthetic(correlated=True)
    ctx = MethodContext({M: (30, 20), M2: (30, 20)}, 1.0, 3, 3)
    plan = uniform_plan(ctx.modules, 3, 1.0)
    contribs = [Contribution(c, plan, {m: (a.float(), b.float()) for m, (a, b) in f.items()}, 1.0)
                for c, f in sorted(ups.items())]
    g = {m: (torch.zeros(3, 30), torch.zeros(20, 3)) for m in (M, M2)}
    state: dict = {}
    out, record = get_method("clair").aggregate(g, contribs, ctx, state)
    assert record["detection"]["flagged"] == ["c2", "c5"]
    benign = [c for c in contribs if c.client not in ("c2", "c5")]
    a, b = out[M]
    assert torch.allclose(b @ a, weighted_delta_w(benign, M), atol=1e-4)
    assert "c2" not in state["personal"] and "c0" in state["personal"]


def test_contamination_is_simulate_only_and_validated():
    from fedlora_edge.coordinator.service import Coordinator

    cfg = load_config(overrides={"model": "tiny-llama", "contamination.attack": "sign_flip",
                                 "contamination.fraction": 0.25})
    with pytest.raises(ConfigError, match="contamination"):
        Coordinator(cfg, "/tmp/unused", None, None)
    with pytest.raises(ConfigError, match="contamination.attack"):
        load_config(overrides={"contamination.attack": "bribe"})
    with pytest.raises(ConfigError, match="contamination.fraction"):
        load_config(overrides={"contamination.fraction": 0.2})



@pytest.mark.parametrize("attack", ["random_update", "sign_flip", "scaled"])
def test_update_attacks_follow_their_definition_whatever_the_key_order(monkeypatch, attack):
    """A blob's keys come back in no fixed order; the attack must not depend on it (a random update
    drawn in key order once made the same seed give different updates from one process to the next)."""
    import fedlora_edge.core.wire as wire
    from fedlora_edge.coordinator.config import ContaminationSettings
    from fedlora_edge.coordinator.contamination import attack_update
    from fedlora_edge.coordinator.engine import Assignment
    from fedlora_edge.core.lora import to_state_dict

    g = torch.Generator().manual_seed(3)
    start = {mod: (torch.randn(3, 30, generator=g), torch.randn(20, 3, generator=g)) for mod in (M, M2, "l.k")}
    trained = {mod: (a + 0.1 * torch.randn(a.shape, generator=g), b + 0.1 * torch.randn(b.shape, generator=g))
               for mod, (a, b) in start.items()}
    sd0, sd1 = to_state_dict(start), to_state_dict(trained)
    a = Assignment("c0", 1, uniform_plan({mod: (30, 20) for mod in start}, 3, 1.0), {}, wire.encode_tensors(sd0))
    sent = [wire.decode_tensors(attack_update(wire.encode_tensors(sd1), a, attack, ContaminationSettings(scale=10.0), seed=7))]
    decode = wire.decode_tensors
    monkeypatch.setattr(wire, "decode_tensors", lambda blob, *args: dict(reversed(decode(blob, *args).items())))
    sent.append(wire.decode_tensors(attack_update(wire.encode_tensors(sd1), a, attack, ContaminationSettings(scale=10.0), seed=7)))
    for key, f0 in sd0.items():
        delta = sd1[key] - f0
        assert torch.equal(sent[0][key], sent[1][key]), key
        got = sent[0][key] - f0
        if attack == "sign_flip":
            assert torch.allclose(got, -delta, atol=1e-6)
        elif attack == "scaled":
            assert torch.allclose(got, 10.0 * delta, atol=1e-5)
        else:
            assert abs(float(got.norm()) - float(delta.norm())) < 1e-4
            assert abs(float((got * delta).sum()) / float(got.norm() * delta.norm())) < 0.5

@pytest.mark.integration
@pytest.mark.parametrize("attack", ["random_update", "sign_flip", "scaled"])
def test_simulate_with_two_of_eight_contaminated(tmp_path, attack):
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={
        "model": "tiny-llama", "method": "clair", "rounds": 2, "clients_per_round": 8, "train.steps": 3,
        "train.batch_size": 4, "data.eval_per_domain": 2, "data.samples_per_client": 12, "max_new_tokens": 2,
        "lora.max_rank": 8, "contamination.fraction": 0.25, "contamination.attack": attack})
    report = Simulation(cfg, tmp_path).run()
    co = report["contamination"]
    assert len(co["clients"]) == 2 and co["attack"] == attack
    bad = co["clients"]
    for rec in report["rounds"]:
        det = rec["detection"]
        assert set(det["scores"]) == {c["client"] for c in rec["clients"]}
        assert set(det["flagged"]) <= set(bad)  # no honest client flagged
        # the two contaminated updates agree least with the others: random ones are unrelated to
        # them, negated ones point away (scaled ones point the same way, but are far larger)
        if attack != "scaled":
            assert sorted(det["scores"], key=lambda c: det["scores"][c]["cosine"])[:2] == sorted(
                bad, key=lambda c: det["scores"][c]["cosine"])
    det = co["detection"]
    assert det["false_positives"] == 0
    if attack == "scaled":  # ten times the norm: flagged every round
        assert det["recall"] == 1.0
    if attack == "sign_flip":  # caught while the honest clients still agree (round 1 here)
        assert det["per_round"][0]["recall"] == 1.0
    # a random update moves B, not the shared A: it lies in the input subspace, and its cosine
    # (near 0) is within the honest clients' spread on this tiny fleet, so it is not flagged
    # here; see docs/results.md for what SmolLM2 runs catch
    assert co["benign_accuracy"] is not None


def test_a_flagged_client_alone_at_the_top_rank_gets_a_caution():
    ranks = {"d1": 4, "d2": 1, "d3": 2}
    msg = alone_at_top_rank(ranks, ["d1"])
    assert "d1 holds rank 4" in msg and "at most 2" in msg
    assert alone_at_top_rank(ranks, ["d3"]) is None                  # flagged, but not alone at the top
    assert alone_at_top_rank(ranks, []) is None
    assert alone_at_top_rank({"d1": 4, "d2": 4, "d3": 1}, ["d1"]) is None  # company at its rank


@pytest.mark.integration
@pytest.mark.parametrize("reach", [True, False])
def test_simulate_judges_a_client_alone_at_the_top_rank_off_its_own_rows(tmp_path, reach):
    # slow links hold d2 and d3 to ranks 1 and 2; d1, benign, is alone at rank 4.  Judged whole
    # (clair.reach false, the old rule), it was flagged for the directions only it trains, and the
    # record and console line said why; judged off its own A rows (the default), it is not flagged
    # and the record says how much of its update only it reaches
    import io

    from fleets import fleet
    from rich.console import Console

    from fedlora_edge.coordinator.console import ConsoleReporter
    from fedlora_edge.coordinator.simulate import Simulation

    slow = {"d2": {"uplink_mbps": 1.0, "downlink_mbps": 1.0}, "d3": {"uplink_mbps": 2.0, "downlink_mbps": 2.0}}
    cfg = load_config(overrides={
        "model": "tiny-llama", "method": "clair", "fleet": fleet(tmp_path, ["d1", "d2", "d3"], **slow),
        "rounds": 1, "clients_per_round": 3, "train.steps": 3, "train.batch_size": 4, "data.tasks": ["add"],
        "data.samples_per_client": 8, "data.eval_per_domain": 2, "max_new_tokens": 3, "lora.rank": 2,
        "lora.max_rank": 4, "planner.transfer_budget_s": 0.05, "clair.reach": reach})
    out = io.StringIO()
    rec = Simulation(cfg, tmp_path / "run", ConsoleReporter(Console(file=out, width=1000))).run()["rounds"][0]
    assert {c["client"]: c["rank"] for c in rec["clients"]} == {"d1": 4, "d2": 1, "d3": 2}
    det = rec["detection"]
    if reach:
        assert det["flagged"] == [] and det["judged"] == "off own reach" and "caution" not in det
        d1 = det["scores"]["d1"]
        assert d1["in_reach"] > 0.99 and d1["unshared"] > 0.5 and d1["sparse_share"] < 0.1
        assert det["scores"]["d2"]["unshared"] == 0.0
        assert not any("flagged" in line for line in out.getvalue().splitlines())
    else:
        assert det["flagged"] == ["d1"] and det["judged"] == "whole update" and "d1 holds rank 4" in det["caution"]
        assert any("flagged: d1" in line and "d1 holds rank 4" in line for line in out.getvalue().splitlines())
