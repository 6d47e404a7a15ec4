"""The MQTT deployment against real brokers (the embedded amqtt one, and Mosquitto configured by
`fedlora broker-config` with TLS, passwords and the per-device ACL) on random loopback ports,
with real client processes and hand-driven misbehaving devices."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fleets import FAST_PROFILE
from mqttkit import (
    CoordThread,
    FakeDevice,
    Mosquitto,
    config,
    coordinator,
    deployment,
    log_of,
    report_of,
    spawn,
    start_run,
    wait_for,
)
from safetensors.torch import load_file

from fedlora_edge.coordinator.emulate import emulate
from fedlora_edge.coordinator.registry import Registry
from fedlora_edge.coordinator.simulate import Simulation
from fedlora_edge.core.identity import save_credentials
from fedlora_edge.core.lora import to_state_dict
from fedlora_edge.core.mqtt import BrokerAddress
from fedlora_edge.core.profile import DeviceProfile
from fedlora_edge.core.wire import decode_tensors, encode_tensors

pytestmark = pytest.mark.integration


@pytest.fixture(params=["embedded", "mosquitto"])
def dep(request, tmp_path):
    d = deployment(request.param, tmp_path)
    yield d
    d.close()


def tweak(data: bytes, fn) -> bytes:
    t = decode_tensors(data)
    k = sorted(t)[0]
    t[k] = fn(t[k].clone())
    return encode_tensors(t)


def test_bad_updates_are_rejected_before_the_ack_and_a_corrected_one_counts(dep, tmp_path):
    ids = ["good", "dup", "shape", "nan"]
    cfg = config(tmp_path, ids, rounds=2, **{"transport.max_update_bytes": 1 << 20})
    coord, th, devs = start_run(dep, cfg, tmp_path / "out", dep.enrol(*ids))
    plans = {i: d.next_plan() for i, d in devs.items()}
    good = devs["good"]
    # junk first: garbage, a truncated chunk, an unsigned message, a report with NaN loss and -1 steps
    good.raw(b"\x00" * 10)
    good.raw(b"x" * 200)
    bad_report = good.send(1, plans["good"].data, report={**report_of(1), "steps": -1})
    assert good.wait_ack(bad_report)["status"] == "rejected"
    oversize = good.send(1, b"z" * 600_000)
    a = good.wait_ack(oversize)
    assert a["status"] == "rejected" and "exceeds the limit" in a["reason"]
    ok = good.send(1, plans["good"].data)  # the corrected update is taken: the slot was not used up
    assert good.wait_ack(ok)["status"] == "accepted"
    uid = devs["dup"].send(1, plans["dup"].data)
    devs["dup"].send(1, plans["dup"].data, update_id=uid)
    shape = devs["shape"].send(1, tweak(plans["shape"].data, lambda t: t[:, :1].contiguous()))
    nan = devs["nan"].send(1, tweak(plans["nan"].data, lambda t: t.fill_(float("nan"))))
    assert "shape" in devs["shape"].wait_ack(shape)["reason"] and "NaN" in devs["nan"].wait_ack(nan)["reason"]
    assert {devs["dup"].wait_ack(uid)["status"]} == {"accepted"}
    # the two rejected devices answer properly before the deadline: the round ends as soon as all did
    for i in ("shape", "nan"):
        assert devs[i].wait_ack(devs[i].send(1, plans[i].data))["status"] == "accepted"
    r2 = {i: d.next_plan() for i, d in devs.items()}
    stale = good.send(1, plans["good"].data)
    for i, d in devs.items():
        d.send(2, r2[i].data)
    report = th.result()
    r1 = report["rounds"][0]
    assert r1["status"] == "ok" and r1["valid_updates"] == 4
    reasons = " | ".join(x["reason"] for x in r1["rejected"])
    assert "steps" in reasons and "shape" in reasons and "NaN" in reasons and "exceeds the limit" in reasons
    proto = " | ".join(x["reason"] for x in r1["protocol_rejections"])
    assert "too short to carry a signature" in proto and "bad signature" in proto
    assert any(a["update_id"] == uid and a["status"] == "duplicate" for a in devs["dup"].acks)
    assert good.wait_ack(stale)["status"] == "stale"
    assert report["rounds"][1]["valid_updates"] == 4


def test_a_client_killed_mid_round_ends_the_wait_for_it_through_its_last_will(dep, tmp_path):
    ids = ["a", "b", "slow"]
    cfg = config(tmp_path, ids, **{"transport.round_timeout_s": 600, "transport.offline_grace_s": 2})
    creds = dep.enrol(*ids, max_examples=8)
    prof = DeviceProfile(name="p", **FAST_PROFILE)
    procs = {i: spawn(dep, cfg.transport.run_id, i, tmp_path / i, prof, creds[i], slowdown=300 if i == "slow" else 1)
             for i in ids}
    coord = coordinator(dep, cfg, tmp_path / "out")
    th = CoordThread(coord)
    th.start()
    try:
        wait_for(lambda: "round 1: update accepted" in log_of(tmp_path / "a") and
                 "round 1: update accepted" in log_of(tmp_path / "b"), what="a and b accepted")
        procs["slow"].send_signal(signal.SIGKILL)
        report = th.result()
    finally:
        for p in procs.values():
            p.kill()
    r1 = report["rounds"][0]
    assert r1["status"] == "ok" and r1["valid_updates"] == 2
    # its Last Will ended the wait, not the 600 s deadline
    assert [f["client"] for f in r1["failed"]] == ["slow"] and "offline" in r1["failed"][0]["reason"]


def test_restart_after_training_before_the_ack_delivers_the_update_once(dep, tmp_path):
    ids = ["x", "y"]
    cfg = config(tmp_path, ids, rounds=3)  # rounds 2-3 leave the coordinator time to see the re-send
    creds = dep.enrol(*ids, max_examples=8)
    coord = coordinator(dep, cfg, tmp_path / "out")
    real_ack, dropped = coord._ack, []

    def lossy_ack(device, round_idx, update_id, status, reason=""):
        if device == "x" and round_idx == 1 and not dropped:
            dropped.append(update_id)  # the ack is lost: x keeps its update on disk
            return
        real_ack(device, round_idx, update_id, status, reason)

    coord._ack = lossy_ack
    th = CoordThread(coord)
    th.start()
    prof = DeviceProfile(name="p", **FAST_PROFILE)
    procs = {i: spawn(dep, cfg.transport.run_id, i, tmp_path / i, prof, creds[i]) for i in ids}
    try:
        pending = tmp_path / "x" / "state" / "pending"
        wait_for(lambda: dropped and list(pending.glob("*.safetensors")), what="x holding its unacknowledged update")
        procs["x"].send_signal(signal.SIGKILL)
        procs["x"].wait()
        procs["x"] = spawn(dep, cfg.transport.run_id, "x", tmp_path / "x", prof)  # restart
        report = th.result()
        assert procs["x"].wait(120) == 0  # it leaves on the run's done, after the ack that came before it
    finally:
        for p in procs.values():
            p.kill()
    assert report["rounds"][0]["valid_updates"] == 2  # x's round-1 update counted once...
    assert ("x", dropped[0]) in coord.duplicates  # ...though it arrived again after the restart
    log = log_of(tmp_path / "x")
    assert "round 1: update duplicate" in log  # the re-send was acknowledged
    assert log.count("round 1: trained") == 1  # and not trained twice
    assert not list(pending.glob("*.safetensors"))


def test_coordinator_stopped_after_round_one_resumes_and_finishes(dep, tmp_path):
    ids = ["p", "q"]
    cfg = config(tmp_path, ids, rounds=2)
    out = tmp_path / "out"
    creds = dep.enrol(*ids, max_examples=8)
    coord = coordinator(dep, cfg, out)
    real = coord.run_round

    def crash_after_one(r, reopen=False):
        if r == 2:
            raise KeyboardInterrupt("coordinator stopped")
        return real(r, reopen)

    coord.run_round = crash_after_one
    prof = DeviceProfile(name="p", **FAST_PROFILE)
    procs = {i: spawn(dep, cfg.transport.run_id, i, tmp_path / i, prof, creds[i]) for i in ids}
    try:
        th = CoordThread(coord)
        th.start()
        with pytest.raises(KeyboardInterrupt):
            th.result()
        assert coord.engine.store.numbers() == [0, 1]
        g1 = coord.engine.state.global_factors
        resumed = coordinator(dep, cfg, out, resume=True)
        assert resumed.first_round == 2 and resumed.engine.nonce == coord.engine.nonce
        assert all(torch.equal(to_state_dict(g1)[k], v)
                   for k, v in to_state_dict(resumed.engine.state.global_factors).items())
        th2 = CoordThread(resumed)
        th2.start()
        rep = th2.result()
    finally:
        for p in procs.values():
            p.kill()
    assert [r["round"] for r in rep["rounds"]] == [1, 2] and rep["rounds"][1]["valid_updates"] == 2


@pytest.mark.parametrize("method", ["hetlora", "hafl", pytest.param("fslora", marks=pytest.mark.slow),
                                    pytest.param("fed-plora", marks=pytest.mark.slow)])
def test_emulate_ends_with_the_same_adapter_as_simulate(tmp_path, method):
    # hafl sends importance scores and holds more than it trains; fslora trains sketches under
    # their own scale; fed-plora folds into the device's base: all must come out as in simulate
    cfg = config(tmp_path, ["d1", "d2", "d3"], method=method, rounds=2, clients_per_round=2,
                 **{"train.steps": 3})
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    Simulation(cfg, tmp_path / "sim").run()
    a = load_file(str(tmp_path / "emu" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "sim" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    assert all(d["exit_code"] == 0 for d in rep["devices"].values())


def test_emulate_with_per_device_chat_files_a_system_prompt_and_a_schedule_matches_simulate(tmp_path):
    # each device's own file (chat rows), the run's system prompt sent in the plan, warm-up,
    # cosine decay and accumulation on the device: the same adapter as simulate
    folder = tmp_path / "devices"
    folder.mkdir()
    for k, cid in enumerate(["d1", "d2", "d3"]):
        rows = [{"messages": [{"role": "user", "content": f"{cid} asks {j}"},
                              {"role": "assistant", "content": f"answer {j * k}"}], "domain": f"t{k % 2}"}
                for j in range(10)]
        (folder / f"{cid}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(tmp_path, ["d1", "d2", "d3"], rounds=2, clients_per_round=2,
                 **{"data.train_dir": str(folder), "data.system_prompt": "Answer briefly.", "train.steps": 3,
                    "train.warmup_steps": 1, "train.lr_schedule": "cosine", "train.grad_accum": 2})
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    sim = Simulation(cfg, tmp_path / "sim").run()
    a = load_file(str(tmp_path / "emu" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "sim" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and any(a[k].abs().sum() > 0 for k in a)
    assert [x for r in rep["rounds"] for c in r["clients"] for x in c["losses"]] == pytest.approx(
        [x for r in sim["rounds"] for c in r["clients"] for x in c["losses"]], abs=1e-4)
    assert rep["metrics"]["lead"] == "loss" and any("held out" in n for n in rep["data_notes"])  # answers > 3 tokens


def test_emulate_over_tls_with_each_device_its_own_credentials(tmp_path):
    cfg = config(tmp_path, ["d1", "d2"], rounds=1)
    rep = emulate(cfg, tmp_path / "emu", tls=True, log=lambda *_: None)
    assert rep["rounds"][0]["valid_updates"] == 2
    reg = Registry(tmp_path / "emu" / "registry")
    assert sorted(reg.devices) == ["d1", "d2"]
    for d in ("d1", "d2"):
        log = log_of(tmp_path / "emu" / "devices" / d)
        assert "connected to mqtts://" in log and "round 1: update accepted" in log
    # no secret on a device's command line (`ps` shows it): the credentials come from its file
    from fedlora_edge.coordinator.emulate import device_command

    folder = tmp_path / "emu" / "devices" / "d1"
    creds = json.loads((folder / "credentials.json").read_text())
    cmd, _ = device_command(BrokerAddress("127.0.0.1", 1, tls=True), "r", "d1", folder,
                            DeviceProfile(name="p", **FAST_PROFILE), 1.0, 1.0, 1)
    line = " ".join(cmd)
    assert creds["mqtt"]["password"] not in line and creds["signing_key"] not in line


def test_devices_without_a_plan_leave_when_the_run_is_done(tmp_path):
    # one round of one device: the two never sampled saw the run live, so its "done" ends them too
    cfg = config(tmp_path, ["d1", "d2", "d3"], clients_per_round=1)
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    assert len(rep["rounds"][0]["clients"]) == 1
    assert {d: v["exit_code"] for d, v in rep["devices"].items()} == {"d1": 0, "d2": 0, "d3": 0}
    for d in ("d1", "d2", "d3"):
        assert "the run is done" in log_of(tmp_path / "emu" / "devices" / d)


def test_emulate_clair_with_heterogeneous_ranks_matches_simulate(tmp_path):
    # slow links bind d3 and d4 to ranks 1 and 2; clair works on their ΔW and refines each client's
    # own adapter: the global and the personal adapters must come out as in simulate, nobody flagged
    slow = {"d3": {"uplink_mbps": 1.0, "downlink_mbps": 1.0}, "d4": {"uplink_mbps": 2.0, "downlink_mbps": 2.0}}
    ids = ["d1", "d2", "d3", "d4"]
    cfg = config(tmp_path, ids, profiles=slow, method="clair", rounds=2,
                 **{"train.steps": 3, "planner.transfer_budget_s": 0.05})
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    sim = Simulation(cfg, tmp_path / "sim").run()
    ranks = [{c["client"]: c["rank"] for c in r["clients"]} for r in rep["rounds"]]
    assert ranks == [{c["client"]: c["rank"] for c in r["clients"]} for r in sim["rounds"]]
    assert ranks[0] == {"d1": 4, "d2": 4, "d3": 1, "d4": 2}
    assert [r["detection"]["flagged"] for r in rep["rounds"]] == [[], []]
    for rel in ["adapter"] + [f"clients/{d}/adapter" for d in ids]:
        a = load_file(str(tmp_path / "emu" / rel / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "sim" / rel / "adapter_model.safetensors"))
        assert a.keys() == b.keys(), rel
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), rel


def test_emulate_fedlease_clusters_and_trains_experts_as_simulate_does(tmp_path):
    # the clustering runs on the warm-up updates as they arrive over MQTT; devices then receive all
    # experts and a router and send back their own expert and router
    cfg = config(tmp_path, ["d1", "d2", "d3"], method="fedlease", rounds=2, clients_per_round=3,
                 **{"train.steps": 3, "fedlease.warmup_rounds": 1, "data.tasks": ["add", "upper"]})
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    sim = Simulation(cfg, tmp_path / "sim").run()
    # the devices run torch with their own thread count, so floats differ in the last bits and Adam
    # can amplify that on near-zero gradients: the clustering must agree, the tensors closely
    for r in (rep, sim):
        assert r["method_summary"]["clusters"] == {"d1": 0, "d2": 1, "d3": 0}  # by main domain: add, upper, add
        assert r["method_summary"]["experts"] == 2
    for cid in ("d1", "d2", "d3"):
        a = load_file(str(tmp_path / "emu" / "clients" / cid / "model" / "mixture.safetensors"))
        b = load_file(str(tmp_path / "sim" / "clients" / cid / "model" / "mixture.safetensors"))
        assert a.keys() == b.keys() and any(k.startswith("router.") for k in a)
        assert all(a[k].shape == b[k].shape and (a[k] - b[k]).abs().max() <= 0.05 * b[k].abs().max() + 1e-6
                   for k in a)
    assert rep["rounds"][1]["valid_updates"] == 3
    assert all(d["exit_code"] == 0 for d in rep["devices"].values())


def test_a_device_whose_plan_does_not_fit_reports_out_of_memory(tmp_path):
    # the planner is told there is no runtime overhead, so it believes 0.2 GB is enough for the
    # tiny model; the process needs more than that once torch is loaded
    cfg = config(tmp_path, ["ok", "tiny"], profiles={"tiny": {"memory_usable_gb": 0.2}},
                 **{"planner.runtime_overhead_gb": 0.0})
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    r1 = rep["rounds"][0]
    assert r1["valid_updates"] == 1
    assert [f["client"] for f in r1["failed"]] == ["tiny"] and "out of memory" in r1["failed"][0]["reason"]
    assert rep["devices"]["tiny"]["exit_code"] == 4


def _client(tmp_path, broker_url, creds_file, extra=()):
    folder = tmp_path / "c"
    folder.mkdir(exist_ok=True)
    from fedlora_edge.core.data import generate_task, write_jsonl
    from fedlora_edge.core.profile import save_profile

    write_jsonl(folder / "d.jsonl", generate_task("add", 4, 0))
    save_profile(DeviceProfile(name="p", **FAST_PROFILE), folder / "p.yaml")
    return subprocess.run([sys.executable, "-m", "fedlora_edge.edge_client.client", "--broker", broker_url, "--credentials",
                           str(creds_file), "--data", str(folder / "d.jsonl"), "--profile", str(folder / "p.yaml"),
                           "--state-dir", str(folder / "s"), *extra], capture_output=True, text=True, timeout=120)


def test_wrong_password_is_refused_with_a_clear_error_and_no_reconnect_storm(tmp_path):
    reg = Registry.create(tmp_path / "reg")
    creds = reg.add("dev")
    m = Mosquitto(reg, tmp_path / "m", tls=False)
    try:
        import dataclasses

        save_credentials(tmp_path / "wrong.json", dataclasses.replace(creds, mqtt_password="wrong"))
        out = _client(tmp_path, f"mqtt://127.0.0.1:{m.port}", tmp_path / "wrong.json")
        assert out.returncode == 3
        assert "refused the connection" in out.stderr
        assert "Not authorized" in out.stderr or "Bad user name or password" in out.stderr
    finally:
        m.stop()
    attempts = m.proc.stderr.read().decode().count("not authorised")
    assert attempts <= 2  # gave up at once instead of retrying


@pytest.mark.parametrize("case", ["wrong-ca", "plain-to-tls", "tls-to-plain", "missing-ca"])
def test_tls_mistakes_name_their_cause(tmp_path, case):
    reg = Registry.create(tmp_path / "reg")
    creds = reg.add("dev")
    save_credentials(tmp_path / "c.json", creds)
    tls = case != "tls-to-plain"
    m = Mosquitto(reg, tmp_path / "m", tls=tls)
    try:
        extra = ()
        url = f"mqtts://127.0.0.1:{m.port}" if case != "plain-to-tls" else f"mqtt://127.0.0.1:{m.port}"
        if case == "wrong-ca":
            other = Registry.create(tmp_path / "other")
            extra = ("--ca-file", str(other.folder / "ca.pem"))
        if case == "missing-ca":
            extra = ("--ca-file", str(tmp_path / "nowhere.pem"))
        out = _client(tmp_path, url, tmp_path / "c.json", extra)
    finally:
        m.stop()
    expect = {"wrong-ca": "certificate verify failed", "plain-to-tls": "a plain connection to a TLS port",
              "tls-to-plain": "does not speak TLS", "missing-ca": "CA file"}[case]
    assert out.returncode in (2, 3) and expect in out.stderr, out.stderr


def test_a_spoofed_hello_of_another_run_is_not_trusted(dep, tmp_path):
    # a retained hello left by a device of an earlier run (another nonce) does not make it online
    ids = ["d1"]
    cfg = config(tmp_path, ids, **{"transport.wait_for_devices_s": 3})
    creds = dep.enrol("d1")["d1"]
    old = FakeDevice(dep, cfg.transport.run_id, "d1", creds=creds, hello=False)
    old.outbox.nonce = "an-earlier-run"
    old.say_hello()
    coord = coordinator(dep, cfg, tmp_path / "out")
    from fedlora_edge.coordinator.service import TooFewDevices

    with pytest.raises(TooFewDevices, match="missing: d1"):
        coord.run()


def test_the_coordinator_clears_its_retained_round_when_the_run_ends(dep, tmp_path):
    cfg = config(tmp_path, ["d1"])
    creds = dep.enrol("d1", "late")
    coord = coordinator(dep, cfg, tmp_path / "out")
    dev = FakeDevice(dep, cfg.transport.run_id, "d1", creds=creds["d1"], hello=False)
    th = CoordThread(coord)
    th.start()
    dev.wait_round()
    dev.say_hello()
    plan = dev.next_plan()
    dev.send(1, plan.data)
    th.result()
    dev.wait_round("done")
    late = FakeDevice(dep, cfg.transport.run_id, "late", creds=creds["late"], hello=False)
    assert not late.link.get(2.0)  # nothing retained on the round topic any more


@pytest.mark.parametrize("open_enrolment", [False, True])
def test_an_enrolled_device_outside_the_fleet_joins_only_with_open_enrolment(tmp_path, open_enrolment):
    d = deployment("embedded", tmp_path)
    try:
        cfg = config(tmp_path, ["d1"], clients_per_round=2, **{"transport.open_enrolment": open_enrolment,
                                                              "transport.min_devices": 2 if open_enrolment else 1})
        creds = d.enrol("d1", "newcomer")
        coord = coordinator(d, cfg, tmp_path / "out")
        th = CoordThread(coord)
        th.start()
        devs = {i: FakeDevice(d, cfg.transport.run_id, i, creds=creds[i]) for i in ("d1", "newcomer")}
        for i in (("d1", "newcomer") if open_enrolment else ("d1",)):
            plan = devs[i].next_plan()
            assert devs[i].wait_ack(devs[i].send(1, plan.data))["status"] == "accepted"
        report = th.result()
    finally:
        d.close()
    clients = [c["client"] for c in report["rounds"][0]["clients"]]
    if open_enrolment:
        assert clients == ["d1", "newcomer"] and any(f["client"] == "newcomer" for f in report["fleet"])
    else:
        assert clients == ["d1"]
        assert any("not in fleet" in e["reason"] for e in coord.events if e["device"] == "newcomer")


@pytest.mark.parametrize("compression", ["none", "int8", "int4"])
def test_a_client_written_from_the_protocol_document_alone_takes_part(tmp_path, compression):
    # tests/independent_client.py was written from docs/protocol.md only (no project imports, no
    # torch): a stranger's client, which must join, be accepted, and leave at the run's done; under
    # transport.compression it decodes its plans and encodes its updates from the document too
    d = deployment("embedded", tmp_path)
    try:
        cfg = config(tmp_path, ["ind"], rounds=2, **{"transport.compression": compression})
        creds = d.enrol("ind", max_examples=8)["ind"]
        save_credentials(tmp_path / "ind.json", creds)
        coord = coordinator(d, cfg, tmp_path / "out")
        th = CoordThread(coord)
        th.start()
        log = (tmp_path / "ind.log").open("w")
        p = subprocess.Popen([sys.executable, str(Path(__file__).parent / "independent_client.py"), "--broker",
                              d.address.url, "--credentials", str(tmp_path / "ind.json"), "--run",
                              cfg.transport.run_id, "--state-dir", str(tmp_path / "ind-state"), "--examples", "8"],
                             stdout=log, stderr=subprocess.STDOUT)
        report = th.result()
        assert p.wait(120) == 0, (tmp_path / "ind.log").read_text()[-3000:]
    finally:
        d.close()
    assert [(r["status"], r["valid_updates"]) for r in report["rounds"]] == [("ok", 1), ("ok", 1)]
    assert not coord.events, coord.events  # nothing it sent was refused
    assert report["totals"]["compression"] == {compression: 1}
    # its one update a round is FedIT's global adapter: B started at zero and gained 0.001 a round,
    # which the codecs carry (as the change from the start) to within float32's rounding
    for _, b in coord.engine.state.global_factors.values():
        assert float((b - 0.002).abs().max()) < 1e-6


def test_a_broker_port_is_never_one_the_kernel_gives_a_connecting_device():
    # Devices retry their connection while the broker is down (starting, or restarting after a
    # crash); a port inside the source-port range can be handed to such a retry, which then
    # connects to itself and holds the port the broker is about to bind.
    from fedlora_edge.coordinator.broker import _ephemeral_range, free_port

    low, high = _ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
