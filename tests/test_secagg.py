"""Secure aggregation (SecAgg+): the coordinator gets the sum within the encoding's bound and nothing
that shows one device's vector; fewer than ``t`` colluders cannot unmask a device; dropouts before
and after masking are unmasked from the survivors' shares; a round below the threshold fails and
says why; a simulated run gives the plain run's adapter within the quantisation bound."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora_edge.core.secagg import (
    DeviceSecAgg,
    Params,
    SecAggError,
    ServerSecAgg,
    decode_sum,
    encode,
    neighbours,
    quantisation_bound,
    run_round,
)

CTX = b"0123456789abcdef0123456789abcdef|1"


def _fleet(n: int, length: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {f"d{i:02d}": rng.normal(0, 0.05, length) for i in range(n)}


def _exchanged(ids, p: Params, length: int, relay: bool = True):
    """(server, agents) after stages 1 and 2 (with ``relay``, each device holding its inbox)."""
    agents = {u: DeviceSecAgg(u, CTX) for u in ids}
    server = ServerSecAgg(sorted(ids), CTX, p, length)
    for u, a in agents.items():
        server.keys(u, a.keys())
    for u, roster in server.rosters().items():
        server.shares(u, agents[u].share(roster, p))
    if relay:
        for v, inbox in server.relay().items():
            agents[v].receive(inbox)
    return server, agents


@pytest.mark.parametrize("n, before, after", [(5, [], []), (12, ["d03"], ["d07"]), (30, ["d01", "d02", "d09"], ["d20", "d21"])])
def test_the_sum_is_the_survivors_plain_sum_within_the_quantisation_bound(n, before, after):
    xs = _fleet(n)
    p = Params.for_round(n)
    words, survivors, _ = run_round({u: encode(x, p) for u, x in xs.items()}, CTX, p, before, after)
    assert survivors == sorted(set(xs) - set(before))  # a device that vanished after masking is still summed
    got = decode_sum(words, len(survivors), p)
    want = sum(xs[u] for u in survivors)
    assert np.abs(got - want).max() <= quantisation_bound(len(survivors), p)


def test_the_encoding_is_unbiased_and_zero_is_exact():
    p = Params.for_round(10, clip_range=1.0)
    x = np.full(20000, 0.3e-6)  # a tenth of a step
    assert decode_sum(encode(x, p), 1, p).mean() == pytest.approx(0.3e-6, rel=0.1)
    assert np.array_equal(decode_sum(encode(np.zeros(8), p) * 3, 3, p), np.zeros(8))  # untrained stays 0


def test_the_coordinator_sees_no_device_vector_in_the_clear():
    xs = _fleet(8, length=256)
    p = Params.for_round(8)
    server = ServerSecAgg(sorted(xs), CTX, p, 256)
    agents = {u: DeviceSecAgg(u, CTX) for u in xs}
    seen = []  # everything the coordinator receives
    for u, a in agents.items():
        k = a.keys()
        seen.append(repr(k))
        server.keys(u, k)
    for u, roster in server.rosters().items():
        cts = agents[u].share(roster, p)
        seen.append(repr(cts))
        server.shares(u, cts)
    for v, inbox in server.relay().items():
        agents[v].receive(inbox)
    words = {u: encode(x, p) for u, x in xs.items()}
    for u in xs:
        masked = agents[u].mask(words[u])
        # a masked vector shares no more words with its plain one than chance (2^-32 each)
        assert np.count_nonzero(masked == words[u]) <= 1
        for w in words.values():
            assert w.tobytes() not in masked.tobytes()
        server.masked(u, masked)
    alive, dropped = server.request()
    for u in alive:
        server.unmasking(u, agents[u].unmask(alive, dropped))
    total, _ = server.result()
    assert np.abs(decode_sum(total, 8, p) - sum(xs.values())).max() <= quantisation_bound(8, p)
    for w in words.values():  # no key, share or vector it holds contains a device's encoded vector
        assert w.tobytes() not in server.total.tobytes() and all(w.tobytes() not in s.encode() for s in seen)


def test_t_minus_1_colluders_and_the_coordinator_cannot_unmask_one_device():
    from fedlora_edge.core.secagg import _combine, prg

    xs = _fleet(9, length=128)
    p = Params.for_round(9)  # everyone a neighbour: degree 8, threshold 5
    server, agents = _exchanged(xs, p, 128)
    victim = "d00"
    masked = agents[victim].mask(encode(xs[victim], p))
    colluders = [u for u in sorted(xs) if u != victim][: p.threshold - 1]
    b_shares = [(agents[c].held[victim][0], agents[c].held[victim][2]) for c in colluders]
    s_shares = [(agents[c].held[victim][0], agents[c].held[victim][1]) for c in colluders]
    # their t - 1 shares rebuild neither of the victim's secrets ...
    assert _combine(b_shares) != agents[victim]._b
    assert _combine(s_shares) != agents[victim]._s.private_bytes_raw()
    # ... so removing the masks they can compute leaves noise, not the victim's vector
    guess = masked - prg(_combine(b_shares), 128)
    assert np.abs(decode_sum(guess, 1, p) - xs[victim]).max() > 1.0
    # one more honest share (t in all) does rebuild it: the threshold is what protects
    extra = next(u for u in sorted(xs) if u not in colluders and u != victim)
    assert _combine(b_shares + [(agents[extra].held[victim][0], agents[extra].held[victim][2])]) == agents[victim]._b


def test_a_device_never_reveals_both_shares_of_one_peer():
    xs = _fleet(5)
    p = Params.for_round(5)
    _, agents = _exchanged(xs, p, 64)
    me = agents["d00"]
    with pytest.raises(SecAggError, match=r"named both survived and dropped"):
        me.unmask(["d00", "d01", "d02"], ["d02", "d03"])
    first = me.unmask(["d00", "d01", "d02", "d04"], ["d03"])
    assert set(first["b"]) == {"d01", "d02", "d04"} and set(first["s"]) == {"d03"}
    # a coordinator that asks again, now saying d01 dropped, would get d01's mask key too: refused
    with pytest.raises(SecAggError, match="twice with different survivors"):
        me.unmask(["d00", "d02", "d04"], ["d01", "d03"])


def test_too_many_dropouts_fail_the_round_and_say_why():
    xs = _fleet(5)
    p = Params.for_round(5)  # degree 4, threshold 3
    with pytest.raises(SecAggError, match=r"2 shares of d\d\d's self mask came back; 3 are needed"):
        run_round({u: encode(x, p) for u, x in xs.items()}, CTX, p, ["d00"], ["d03"])


def test_a_share_tampered_with_on_the_way_is_refused():
    xs = _fleet(4)
    p = Params.for_round(4)
    server, agents = _exchanged(xs, p, 64, relay=False)
    inbox = server.relay()["d01"]
    import base64

    raw = bytearray(base64.b64decode(inbox["d00"]))
    raw[20] ^= 1
    with pytest.raises(SecAggError, match="d00's share to d01 does not decrypt"):
        agents["d01"].receive({**inbox, "d00": base64.b64encode(bytes(raw)).decode()})
    # and a share relayed to the wrong device does not decrypt for it either
    with pytest.raises(SecAggError, match="does not decrypt"):
        agents["d02"].receive({"d00": inbox["d00"]})


def test_the_neighbour_graph_is_sparse_symmetric_and_sized_for_the_dropouts():
    from fedlora_edge.core.secagg import _short

    ids = [f"d{i:04d}" for i in range(1000)]
    p = Params.for_round(1000, dropout=0.1)
    g = neighbours(ids, p.degree, CTX)
    assert p.degree == 30 and p.threshold == 16
    # sized so that some device keeps fewer than t answering neighbours with chance <= 1e-3, and no smaller
    for dropout in (0.1, 0.3):
        q = Params.for_round(1000, dropout=dropout)
        assert 1000 * _short(q.degree, q.threshold, dropout) <= 1e-3
        if q.degree > 30:  # above the 3 log2 n floor, it is the smallest that holds
            assert 1000 * _short(q.degree - 2, (q.degree - 2) // 2 + 1, dropout) > 1e-3
    assert all(len(vs) == p.degree for vs in g.values())
    assert all(u in g[v] for u, vs in g.items() for v in vs) and all(u not in vs for u, vs in g.items())
    assert neighbours(ids[:10], Params.for_round(10).degree, CTX)["d0000"] == ids[1:10]  # small: everyone


@pytest.mark.parametrize("n, needle", [(2, "at least 3 devices")])
def test_parameters_that_cannot_protect_are_refused(n, needle):
    with pytest.raises(SecAggError, match=needle):
        Params.for_round(n)
    with pytest.raises(SecAggError, match="one neighbour alone"):
        Params.for_round(6, threshold=1)


# ------------------------------------------------------------------------------ in a run

FAST = {"model": "tiny-llama", "rounds": 2, "clients_per_round": 6, "train.steps": 2, "train.batch_size": 4,
        "data.eval_per_domain": 2, "data.samples_per_client": 8, "data.tasks": ["add", "upper"],
        "max_new_tokens": 2, "lora.max_rank": 4, "lora.rank": 4}


def _sim(tmp_path, name, **extra):
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.simulate import Simulation

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("devices:\n" + "".join(f"  - {{id: d{i:03d}, profile: jetson-agx-orin}}\n" for i in range(6)))
    return Simulation(load_config(overrides={**FAST, "fleet": str(fleet), **extra}), tmp_path / name)


@pytest.mark.integration
@pytest.mark.parametrize("method, extra", [("fedit", {}), ("hetlora", {}), ("hafl", {"lora.rank": 2})])
def test_a_secure_run_gives_the_plain_runs_adapter_within_the_encodings_bound(tmp_path, method, extra):
    secure = _sim(tmp_path, "secure", method=method, **{"privacy.secure_aggregation.enabled": True, **extra})
    report = secure.run()
    for r in report["rounds"]:
        assert r["status"] == "ok" and r["valid_updates"] == 6 and r["secure_aggregation"]["survivors"] == 6
    plain = _sim(tmp_path, "plain", method=method, **extra)
    plain.run()
    for m, (a, b) in secure.engine.state.global_factors.items():
        pa, pb = plain.engine.state.global_factors[m]
        assert (a - pa).abs().max() < 1e-4 and (b - pb).abs().max() < 1e-4
    if method == "hafl":  # the coordinator kept the fleet's summed scores, no device's own
        assert secure.engine.state.method_state["importance"]["clients"] == {}


@pytest.mark.integration
def test_a_secure_run_survives_dropouts_and_fails_a_round_below_the_threshold(tmp_path):
    sim = _sim(tmp_path, "drop", method="fedit", rounds=1, **{"privacy.secure_aggregation.enabled": True})
    sim.drop_before_masking, sim.drop_after_masking = {"d001"}, {"d004"}
    report = sim.run()
    (r,) = report["rounds"]
    assert r["status"] == "ok" and r["valid_updates"] == 5  # d004's vector is unmasked from the others' shares
    assert r["secure_aggregation"]["dropped_before_masking"] == ["d001"]
    assert [f["client"] for f in r["failed"]] == ["d001"]
    sim = _sim(tmp_path, "fail", method="fedit", rounds=1, **{"privacy.secure_aggregation.enabled": True})
    sim.drop_before_masking, sim.drop_after_masking = {"d000", "d001"}, {"d002", "d003"}
    (r,) = sim.run()["rounds"]
    assert r["status"] == "failed" and r["valid_updates"] == 0
    assert all("are needed to unmask the round" in f["reason"] for f in r["failed"] if f["client"] not in ("d000", "d001"))


@pytest.mark.parametrize("overrides, needle", [
    ({"method": "flexlora"}, "method flexlora cannot run with secure aggregation"),
    ({"method": "norm-bound"}, "set norm_bound.max_norm"),
    ({"clients_per_round": 2}, "at least 3 devices a round"),
])
def test_what_secure_aggregation_cannot_carry_is_refused_before_the_run(overrides, needle):
    from fedlora_edge.coordinator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=needle):
        load_config(overrides={"privacy.secure_aggregation.enabled": True, **overrides})


# ------------------------------------------------------------------------------ over MQTT

@pytest.mark.integration
def test_over_mqtt_the_coordinator_sums_masked_vectors_and_unmasks_past_dropouts(tmp_path):
    """Six hand-driven devices run the four stages against a real coordinator and broker: d3 fails
    after sharing its keys (before its masked vector), d4 never answers the unmasking.  The round
    sums d0, d1, d2, d4 and d5 within the encoding's bound, and nothing the coordinator wrote to
    disk holds a device's vector in the clear."""
    import json as _json
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import torch
    from mqttkit import CoordThread, FakeDevice, config, coordinator, deployment

    from fedlora_edge.core.lora import from_state_dict
    from fedlora_edge.core.wire import decode_tensors
    from fedlora_edge.edge_client.work import secure_vector

    ids = [f"d{i}" for i in range(6)]
    dep = deployment("embedded", tmp_path)
    try:
        cfg = config(tmp_path, ids, **{"privacy.secure_aggregation.enabled": True, "transport.round_timeout_s": 120,
                                       "transport.secagg_unmask_s": 5})
        creds = dep.enrol(*ids, max_examples=8)
        coord = coordinator(dep, cfg, tmp_path / "out")
        th = CoordThread(coord)
        th.start()
        devs = {i: FakeDevice(dep, cfg.transport.run_id, i, creds=creds[i]) for i in ids}
        plans = {i: d.next_plan() for i, d in devs.items()}
        start = {i: decode_tensors(p.data) for i, p in plans.items()}
        agents = {}
        for i, d in devs.items():
            meta = plans[i].meta
            agents[i] = DeviceSecAgg(i, meta["secagg"]["context"].encode())
            d.event(type="secagg", round=1, stage="keys", keys=agents[i].keys())
        for i, d in devs.items():
            body = _json.loads(d.next_plan().data)  # the roster
            d.event(type="secagg", round=1, stage="shares", shares=agents[i].share(body["roster"], body["params"]))
        plain = {}
        for k, (i, d) in enumerate(devs.items()):
            agents[i].receive(_json.loads(d.next_plan().data)["inbox"])
            if i == "d3":
                d.event(type="failure", round=1, reason="dropped out")
                continue
            trained = {key: v + 0.01 * (k + 1) for key, v in start[i].items()}
            plain[i] = secure_vector(plans[i].meta, trained, start[i])
            masked = agents[i].mask(np.frombuffer(plain[i], dtype="<u4").astype(np.uint32))
            assert d.wait_ack(d.send(1, masked.astype("<u4").tobytes()))["status"] == "accepted"
        for i, d in devs.items():
            if i in ("d3", "d4"):
                continue
            body = _json.loads(d.next_plan().data)
            assert body["survivors"] == ["d0", "d1", "d2", "d4", "d5"] and body["dropped"] == ["d3"]
            d.event(type="secagg", round=1, stage="unmask", response=agents[i].unmask(body["survivors"], body["dropped"]))
        report = th.result()
    finally:
        for d in locals().get("devs", {}).values():
            d.close()
        dep.close()
    (r,) = report["rounds"]
    assert r["status"] == "ok" and r["valid_updates"] == 5, (r["failed"], r["rejected"])
    assert [f["client"] for f in r["failed"]] == ["d3"]
    g0 = from_state_dict(start["d0"])
    got = coord.engine.state.global_factors
    shift = 0.01 * (1 + 2 + 3 + 5 + 6) / 5  # the survivors' mean change (equal weights)
    for m, (a, b) in got.items():
        assert torch.allclose(a, g0[m][0] + shift, atol=1e-4) and torch.allclose(b, g0[m][1] + shift, atol=1e-4)
    kept = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    for words in plain.values():  # no file of the coordinator's holds a device's vector (any 64-byte piece of it)
        for at in range(0, len(words) - 64, len(words) // 7):
            assert words[at:at + 64] not in kept


@pytest.mark.integration
def test_a_coordinator_stopped_mid_secure_round_fails_that_round_on_resume_and_goes_on(tmp_path):
    """Stopped between the shares and their relay in round 2 (real client processes): resumed, it
    fails round 2 saying why (the key exchange is not kept on disk) and runs round 3 securely."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from fleets import FAST_PROFILE
    from mqttkit import CoordThread, config, coordinator, deployment, spawn

    from fedlora_edge.core.profile import DeviceProfile

    ids = ["p", "q", "s"]
    dep = deployment("embedded", tmp_path)
    procs = {}
    try:
        cfg = config(tmp_path, ids, rounds=3, **{"privacy.secure_aggregation.enabled": True})
        creds = dep.enrol(*ids, max_examples=8)
        out = tmp_path / "out"
        coord = coordinator(dep, cfg, out)
        real = coord._secure_send

        def stop_at_the_relay(r, device, stage, body):
            if r.index == 2 and stage == "relay":
                raise KeyboardInterrupt("coordinator stopped")
            return real(r, device, stage, body)

        coord._secure_send = stop_at_the_relay
        prof = DeviceProfile(name="p", **FAST_PROFILE)
        procs = {i: spawn(dep, cfg.transport.run_id, i, tmp_path / i, prof, creds[i]) for i in ids}
        th = CoordThread(coord)
        th.start()
        with pytest.raises(KeyboardInterrupt):
            th.result()
        resumed = coordinator(dep, cfg, out, resume=True)
        assert resumed.first_round == 2
        th2 = CoordThread(resumed)
        th2.start()
        rep = th2.result()
    finally:
        for p in procs.values():
            p.kill()
        dep.close()
    r1, r2, r3 = rep["rounds"]
    assert r1["status"] == "ok" and r1["valid_updates"] == 3
    assert r2["status"] == "failed" and all("restarted during this secure-aggregation round" in f["reason"]
                                            for f in r2["failed"])
    assert r3["status"] == "ok" and r3["valid_updates"] == 3 and r3["secure_aggregation"]["survivors"] == 3


@pytest.mark.integration
@pytest.mark.parametrize("method", ["fedit", "hafl"])
def test_secure_aggregation_composes_with_device_level_dp(tmp_path, method):
    from fedlora_edge.coordinator.privacy import epsilon_for

    sim = _sim(tmp_path, "both", method=method, **{"privacy.secure_aggregation.enabled": True, "lora.rank": 2,
                                                   "privacy.dp.noise_multiplier": 1.0, "privacy.dp.clip_norm": 0.05})
    report = sim.run()
    ran = [r for r in report["rounds"] if r["status"] == "ok"]
    assert ran and all("secure_aggregation" in r for r in ran)  # Poisson sampling may leave a round under 3
    assert report["privacy"]["epsilon"] == pytest.approx(epsilon_for(1.0, 1.0, 2, 1 / 6))
    for r in report["rounds"]:
        assert not r["rejected"]


def test_adaptive_clipping_is_refused_with_secure_aggregation(tmp_path):
    from fedlora_edge.coordinator.config import ConfigError

    with pytest.raises(ConfigError, match="adaptive clipping counts which devices"):
        _sim(tmp_path, "x", method="fedit", **{"privacy.secure_aggregation.enabled": True,
                                               "privacy.dp.noise_multiplier": 1.0, "privacy.dp.adaptive_clipping": True})


@pytest.mark.integration
def test_clients_written_from_the_protocol_document_alone_take_part_in_a_secure_round(tmp_path):
    """tests/independent_client.py implements the stages from docs/protocol.md (no project imports):
    three of them make secure rounds whose sum is their mean change (+0.001 everywhere)."""
    import subprocess
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from mqttkit import CoordThread, config, coordinator, deployment

    from fedlora_edge.core.identity import save_credentials

    ids = ["i1", "i2", "i3"]
    d = deployment("embedded", tmp_path)
    procs = []
    try:
        cfg = config(tmp_path, ids, rounds=2, **{"privacy.secure_aggregation.enabled": True})
        creds = d.enrol(*ids, max_examples=8)
        coord = coordinator(d, cfg, tmp_path / "out")
        g0 = {m: (a.clone(), b.clone()) for m, (a, b) in coord.engine.state.global_factors.items()}
        th = CoordThread(coord)
        th.start()
        for i in ids:
            save_credentials(tmp_path / f"{i}.json", creds[i])
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).parent / "independent_client.py"), "--broker", d.address.url,
                 "--credentials", str(tmp_path / f"{i}.json"), "--run", cfg.transport.run_id, "--state-dir",
                 str(tmp_path / f"{i}-state"), "--examples", "8"],
                stdout=(tmp_path / f"{i}.log").open("w"), stderr=subprocess.STDOUT))
        report = th.result()
        for i, p in zip(ids, procs):
            assert p.wait(120) == 0, (tmp_path / f"{i}.log").read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
        d.close()
    assert [(r["status"], r["valid_updates"]) for r in report["rounds"]] == [("ok", 3), ("ok", 3)]
    assert not coord.events, coord.events  # nothing they sent was refused
    for m, (a, b) in coord.engine.state.global_factors.items():  # two rounds of +0.001 on the trained components
        r = report["rounds"][0]["clients"][0]["rank"]
        assert torch.allclose(a[:r], g0[m][0][:r] + 0.002, atol=1e-4)
        assert torch.allclose(b[:, :r], g0[m][1][:, :r] + 0.002, atol=1e-4)


@pytest.mark.integration
def test_norm_bound_under_secure_aggregation_bounds_each_change_on_the_device(tmp_path):
    sim = _sim(tmp_path, "nb", method="norm-bound", rounds=1,
               **{"privacy.secure_aggregation.enabled": True, "norm_bound.max_norm": 0.01})
    g0 = {m: (a.clone(), b.clone()) for m, (a, b) in sim.engine.state.global_factors.items()}
    (r,) = sim.run()["rounds"]
    assert r["status"] == "ok" and r["valid_updates"] == 6
    assert sim.engine.device_clip() == 0.01
    import math as _math

    moved = _math.sqrt(sum(float((a - g0[m][0]).pow(2).sum() + (b - g0[m][1]).pow(2).sum())
                           for m, (a, b) in sim.engine.state.global_factors.items()))
    assert moved <= 0.01 * 1.01  # a mean of changes each at most 0.01 long


def test_a_round_left_with_two_devices_fails_at_the_roster_saying_why():
    p = Params.for_round(3)
    server = ServerSecAgg(["a", "b", "c"], CTX, p, 8)
    for u in ("a", "b"):  # c never sent its keys
        server.keys(u, DeviceSecAgg(u, CTX).keys())
    with pytest.raises(SecAggError, match="a device has 1 neighbours, fewer than the threshold 2"):
        server.rosters()
