"""The MQTT deployment against real brokers (the embedded amqtt one and Mosquitto on a random
loopback port), with real client processes and hand-driven misbehaving devices."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from fleets import FAST_PROFILE, fleet
from safetensors.torch import load_file

from coordinator.broker import EmbeddedBroker, free_port
from coordinator.config import load_config
from coordinator.emulate import device_command, emulate
from coordinator.service import Coordinator
from coordinator.simulate import Simulation
from edge_client.data import write_jsonl
from edge_client.framing import Reassembler, chunk_transfer, encode_json
from edge_client.lora import to_state_dict
from edge_client.mqtt import BrokerAddress, Link, device_topic
from edge_client.profile import DeviceProfile, save_profile
from edge_client.wire import decode_tensors, encode_tensors

pytestmark = pytest.mark.integration


# ---------------------------------------------------------------------------------- brokers

def start_mosquitto(tmp: Path, extra: str = "") -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        if os.environ.get("FEDLORA_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("mosquitto is required (FEDLORA_REQUIRE_MOSQUITTO=1) but not installed")
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    port = free_port()
    conf = tmp / f"mosquitto-{port}.conf"
    # with the default queue limits mosquitto drops QoS 1 bursts; raise them
    # "user root": mosquitto started as root otherwise drops to a user that cannot read tmp_path
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"{user}listener {port} 127.0.0.1\npersistence false\nmax_queued_messages 100000\n"
                    f"max_inflight_messages 100\n{extra or 'allow_anonymous true'}\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import socket

    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


@pytest.fixture(params=["embedded", "mosquitto"])
def broker(request, tmp_path):
    if request.param == "embedded":
        b = EmbeddedBroker().start()
        yield b.address
        b.stop()
    else:
        proc, port = start_mosquitto(tmp_path)
        yield BrokerAddress("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# ---------------------------------------------------------------------------------- helpers

def config(tmp: Path, ids: list[str], profiles=None, **over):
    base = {"model": "tiny-llama", "method": "fedit", "fleet": fleet(tmp, ids, **(profiles or {})), "rounds": 1,
            "clients_per_round": len(ids), "train.steps": 2, "train.batch_size": 4, "data.tasks": ["add"],
            "data.samples_per_client": 8, "data.eval_per_domain": 2, "max_new_tokens": 3, "lora.rank": 2,
            "lora.max_rank": 4, "transport.round_timeout_s": 20, "transport.wait_for_devices_s": 60,
            "transport.run_id": uuid.uuid4().hex[:8]}
    base.update(over)
    return load_config(overrides=base)


class CoordThread(threading.Thread):
    def __init__(self, coord: Coordinator):
        super().__init__(daemon=True)
        self.coord, self.report, self.error = coord, None, None

    def run(self):
        try:
            self.report = self.coord.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc

    def result(self, timeout=180):
        self.join(timeout)
        assert not self.is_alive(), "coordinator did not finish"
        if self.error:
            raise self.error
        return self.report


class FakeDevice:
    """A device driven by the test: says hello, receives plans, sends whatever it is told to."""

    def __init__(self, address, run, device_id):
        self.run, self.id = run, device_id
        self.link = Link(address, f"fake-{device_id}-{uuid.uuid4().hex[:4]}")
        self.link.subscribe(device_topic(run, device_id, "down"))
        self.link.subscribe(device_topic(run, device_id, "ack"))
        self.link.connect()
        self.link.publish(device_topic(run, device_id, "status"),
                          encode_json({"type": "status", "device": device_id, "state": "online"}), retain=True)
        prof = DeviceProfile(name="fake", **FAST_PROFILE)
        self.link.publish(device_topic(run, device_id, "hello"), encode_json(
            {"type": "hello", "device": device_id, "profile": prof.to_dict(), "examples": 8}), retain=True)
        self.reasm = Reassembler(1 << 30)
        self.acks: list[dict] = []

    def next_plan(self, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            msg = self.link.get(0.5)
            if msg is None:
                continue
            t, payload = msg
            if t.endswith("/ack"):
                self.acks.append(json.loads(payload))
                continue
            tr = self.reasm.add(payload)
            if tr is not None:
                return tr
        raise TimeoutError(f"{self.id}: no plan")

    def raw(self, payload: bytes):
        self.link.publish(device_topic(self.run, self.id, "up"), payload)

    def send(self, round_idx, data: bytes, update_id=None, num_examples=8, chunk_bytes=4096):
        meta = {"round": round_idx, "update_id": update_id or uuid.uuid4().hex,
                "report": {"num_examples": num_examples, "steps": 1, "first_loss": 1.0, "last_loss": 1.0,
                           "seconds": 0.1}}
        for ch in chunk_transfer(data, kind="update", run=self.run, round_idx=round_idx, device=self.id,
                                 transfer=meta["update_id"], meta=meta, chunk_bytes=chunk_bytes):
            self.raw(ch)
        return meta["update_id"]

    def wait_acks(self, n, timeout=30):
        end = time.monotonic() + timeout
        while len(self.acks) < n and time.monotonic() < end:
            msg = self.link.get(0.2)
            if msg and msg[0].endswith("/ack"):
                self.acks.append(json.loads(msg[1]))
        return self.acks


def tweak(data: bytes, fn) -> bytes:
    t = decode_tensors(data)
    k = sorted(t)[0]
    t[k] = fn(t[k].clone())
    return encode_tensors(t)


# ------------------------------------------------------------------------------------ tests

def test_bad_messages_are_rejected_with_reasons_and_the_round_goes_on(broker, tmp_path):
    ids = ["good", "dup", "shape", "nan"]
    cfg = config(tmp_path, ids, rounds=2, **{"transport.max_update_bytes": 1 << 20})
    coord = Coordinator(cfg, tmp_path / "out", broker, log=lambda *_: None)
    th = CoordThread(coord)
    th.start()
    devs = {i: FakeDevice(broker, cfg.transport.run_id, i) for i in ids}
    plans = {i: d.next_plan() for i, d in devs.items()}
    good = devs["good"]
    # protocol junk first: an unknown schema, a truncated chunk, an oversize transfer
    chunk = next(chunk_transfer(plans["good"].data, kind="update", run=cfg.transport.run_id, round_idx=1,
                                device="good", transfer="x", meta={}))
    hlen = int.from_bytes(chunk[:4], "big")
    header = json.loads(chunk[4:4 + hlen])
    bad_schema = encode_json({**header, "schema": "9.0"})
    good.raw(len(bad_schema).to_bytes(4, "big") + bad_schema + chunk[4 + hlen:])
    good.raw(chunk[:10])
    big = encode_json({**header, "nbytes": 1 << 30, "schema": "1.0"})
    good.raw(len(big).to_bytes(4, "big") + big + b"x")
    # then the good update, a duplicate pair, a wrong shape, a NaN
    good.send(1, plans["good"].data)
    uid = devs["dup"].send(1, plans["dup"].data)
    devs["dup"].send(1, plans["dup"].data, update_id=uid)
    devs["shape"].send(1, tweak(plans["shape"].data, lambda t: t[:, :1].contiguous()))
    devs["nan"].send(1, tweak(plans["nan"].data, lambda t: t.fill_(float("nan"))))
    # round 2: a stale round-1 update first, then everyone answers properly
    r2 = {i: d.next_plan() for i, d in devs.items()}
    stale_id = good.send(1, plans["good"].data)
    for i, d in devs.items():
        d.send(2, r2[i].data)
    report = th.result()
    r1 = report["rounds"][0]
    assert r1["status"] == "ok" and r1["valid_updates"] == 2  # good + dup counted once
    reasons = {r["client"]: r["reason"] for r in r1["rejected"]}
    assert "shape" in reasons["shape"] and "NaN" in reasons["nan"]
    proto = " | ".join(x["reason"] for x in r1["protocol_rejections"])
    assert "unsupported schema version 9.0" in proto and "truncated" in proto and "exceeds the limit" in proto
    acks = {(a["update_id"], a["status"]) for a in devs["dup"].wait_acks(2)}
    assert (uid, "received") in acks and (uid, "duplicate") in acks
    assert any(a["update_id"] == stale_id and a["status"] == "stale" for a in good.wait_acks(4))
    assert report["rounds"][1]["valid_updates"] == 4


def spawn(address, run, cid, folder: Path, profile, slowdown=1.0, data=None):
    folder.mkdir(parents=True, exist_ok=True)
    from edge_client.data import generate_task
    write_jsonl(folder / "data.jsonl", data or generate_task("add", 8, 0))
    save_profile(profile, folder / "profile.yaml")
    cmd, _ = device_command(address, run, cid, folder, profile, 1.0, 1.0, 1)
    cmd[cmd.index("--slowdown") + 1] = str(slowdown)
    log = (folder / "client.log").open("a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_a_client_killed_mid_round_leaves_the_round_to_its_deadline(broker, tmp_path):
    ids = ["a", "b", "slow"]
    # the deadline covers the live devices' torch import, model load and training: 25 s leaves
    # room for a loaded 2-core machine (12 s did not, with benchmarks beside the tests)
    cfg = config(tmp_path, ids, **{"transport.round_timeout_s": 25})
    coord = Coordinator(cfg, tmp_path / "out", broker, log=lambda *_: None)
    started = threading.Event()
    real = coord.run_round
    coord.run_round = lambda r: (started.set(), real(r))[1]
    th = CoordThread(coord)
    th.start()
    prof = DeviceProfile(name="p", **FAST_PROFILE)
    procs = {i: spawn(broker, cfg.transport.run_id, i, tmp_path / i, prof, slowdown=300 if i == "slow" else 1)
             for i in ids}
    try:
        assert started.wait(90)
        time.sleep(2)
        procs["slow"].send_signal(signal.SIGKILL)
        report = th.result()
    finally:
        for p in procs.values():
            p.kill()
    r1 = report["rounds"][0]
    assert r1["status"] == "ok" and r1["valid_updates"] == 2
    assert [f["client"] for f in r1["failed"]] == ["slow"] and "deadline" in r1["failed"][0]["reason"]


def test_restart_after_training_before_the_ack_delivers_the_update_once(broker, tmp_path):
    ids = ["x", "y"]
    cfg = config(tmp_path, ids, rounds=3)  # rounds 2-3 leave the coordinator time to see the re-send
    coord = Coordinator(cfg, tmp_path / "out", broker, log=lambda *_: None)
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
    procs = {i: spawn(broker, cfg.transport.run_id, i, tmp_path / i, prof) for i in ids}
    try:
        pending = tmp_path / "x" / "state" / "pending"
        for _ in range(600):
            if dropped:
                break
            time.sleep(0.1)
        assert dropped and list(pending.glob("*.safetensors")), "x should hold its unacknowledged update"
        procs["x"].send_signal(signal.SIGKILL)
        procs["x"].wait()
        procs["x"] = spawn(broker, cfg.transport.run_id, "x", tmp_path / "x", prof)  # restart
        report = th.result()
    finally:
        for p in procs.values():
            p.kill()
    assert report["rounds"][0]["valid_updates"] == 2  # x's round-1 update counted once...
    assert ("x", dropped[0]) in coord.duplicates  # ...though it arrived again after the restart
    log = (tmp_path / "x" / "client.log").read_text()
    assert "round 1: update duplicate" in log  # the re-send was acknowledged
    assert log.count("round 1: trained") == 1  # and not trained twice
    assert not list(pending.glob("*.safetensors"))


def test_coordinator_stopped_after_round_one_resumes_and_finishes(broker, tmp_path):
    ids = ["p", "q"]
    cfg = config(tmp_path, ids, rounds=2)
    out = tmp_path / "out"
    coord = Coordinator(cfg, out, broker, log=lambda *_: None)
    real = coord.run_round

    def crash_after_one(r):
        if r == 2:
            raise KeyboardInterrupt("coordinator stopped")
        return real(r)

    coord.run_round = crash_after_one
    prof = DeviceProfile(name="p", **FAST_PROFILE)
    procs = {i: spawn(broker, cfg.transport.run_id, i, tmp_path / i, prof) for i in ids}
    try:
        th = CoordThread(coord)
        th.start()
        with pytest.raises(KeyboardInterrupt):
            th.result()
        saved = json.loads((out / "state" / "run.json").read_text())
        assert saved["completed_round"] == 1
        g1 = load_file(str(out / "state" / "global.safetensors"))
        resumed = Coordinator(cfg, out, broker, resume=True, log=lambda *_: None)
        assert resumed.first_round == 2
        assert all(torch.equal(g1[k], v) for k, v in to_state_dict(resumed.engine.state.global_factors).items())
        report = CoordThread(resumed)
        report.start()
        rep = report.result()
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



def test_devices_without_a_plan_leave_when_the_run_is_done(tmp_path):
    # one round of one device: the two never sampled saw the run live, so its "done" ends them too
    # (a "done" seen before the run went live is a previous run's, and they keep waiting)
    cfg = config(tmp_path, ["d1", "d2", "d3"], clients_per_round=1)
    rep = emulate(cfg, tmp_path / "emu", log=lambda *_: None)
    assert len(rep["rounds"][0]["clients"]) == 1
    assert {d: v["exit_code"] for d, v in rep["devices"].items()} == {"d1": 0, "d2": 0, "d3": 0}
    for d in ("d1", "d2", "d3"):
        assert "the run is done" in (tmp_path / "emu" / "devices" / d / "client.log").read_text()


def test_emulate_clair_with_heterogeneous_ranks_matches_simulate(tmp_path):
    # slow links bind d3 and d4 to ranks 1 and 2; clair works on their ΔW and refines each client's
    # own adapter: the global and the personal adapters must come out as in simulate, nobody flagged
    slow = {"d3": {"uplink_mbps": 1.0, "downlink_mbps": 1.0}, "d4": {"uplink_mbps": 2.0, "downlink_mbps": 2.0}}
    ids = ["d1", "d2", "d3", "d4"]
    cfg = config(tmp_path, ids, profiles=slow, method="clair", rounds=2,  # four device processes: a longer deadline
                 **{"train.steps": 3, "planner.transfer_budget_s": 0.05, "transport.round_timeout_s": 60})
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


def test_wrong_password_is_refused_with_a_clear_error_and_no_reconnect_storm(tmp_path):
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "dev", "right"], check=True, capture_output=True)
    proc, port = start_mosquitto(tmp_path, f"allow_anonymous false\npassword_file {pw}")
    try:
        folder = tmp_path / "c"
        folder.mkdir()
        from edge_client.data import generate_task
        write_jsonl(folder / "d.jsonl", generate_task("add", 4, 0))
        save_profile(DeviceProfile(name="p", **FAST_PROFILE), folder / "p.yaml")
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "edge_client.client", "--broker", f"mqtt://127.0.0.1:{port}",
                              "--device-id", "c", "--data", str(folder / "d.jsonl"), "--profile", str(folder / "p.yaml"),
                              "--username", "dev", "--password", "wrong", "--state-dir", str(folder / "s")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 3
        assert "refused the connection" in out.stderr
        assert "Not authorized" in out.stderr or "Bad user name or password" in out.stderr
        assert time.monotonic() - t0 < 30  # gave up at once instead of retrying
    finally:
        proc.kill()
        proc.wait()
    attempts = proc.stderr.read().decode().count("not authorised") if proc.stderr else 0
    assert attempts <= 2
