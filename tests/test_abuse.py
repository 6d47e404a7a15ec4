"""Bounded under abuse: what one enrolled device (or an operator's mistake) can make the coordinator
hold, send, log or write stays bounded, and no round is lost to it.

The memory tests drive a real :class:`Coordinator` (tiny-llama, a real round open, the real
handlers) without a broker: its link is replaced by one that records what would go out, and each
hostile message is signed with the device's real key, so it passes the signature check and reaches
the handler it targets.  Growth is measured with tracemalloc (every Python allocation, exactly) as
bytes per message between a warm-up and the same number of messages again."""

from __future__ import annotations

import json
import time
import tracemalloc
import uuid

import pytest
from fleets import FAST_PROFILE
from mqttkit import (
    CoordThread,
    FakeDevice,
    config,
    coordinator,
    deployment,
    report_of,
    trained,
    two_runs_train,
)

from fedlora_edge.coordinator.config import ConfigError
from fedlora_edge.coordinator.registry import Registry, RegistryError
from fedlora_edge.coordinator.service import MAX_REFUSAL_ACKS, Coordinator, OpenRound
from fedlora_edge.core.framing import ProtocolError, chunk_transfer, parse_chunk
from fedlora_edge.core.identity import Counter, Signer
from fedlora_edge.core.messages import Outbox
from fedlora_edge.core.mqtt import BrokerAddress, device_topic
from fedlora_edge.core.profile import DeviceProfile

IDS = ["good", "evil"]


class RecordingLink:
    """Stands in for the MQTT link: records what the coordinator publishes, receives nothing."""

    def __init__(self):
        self.sent: list[tuple[str, int]] = []

    def publish(self, t, payload, retain=False, timeout_s=10.0, wait=True):
        self.sent.append((t, len(payload)))
        return None

    def get(self, timeout_s):
        return None

    def close(self):
        pass

    def count(self, leaf: str) -> int:
        return sum(t.endswith("/" + leaf) for t, _ in self.sent)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """A coordinator in round 1 of a run of two devices, ``good`` and ``evil``, both online."""
    tmp = tmp_path_factory.mktemp("abuse")
    reg = Registry.create(tmp / "registry")
    creds = {i: reg.add(i, max_examples=8) for i in IDS}
    cfg = config(tmp, IDS, rounds=2, **{"transport.round_timeout_s": 600})
    lines: list[str] = []
    coord = Coordinator(cfg, tmp / "out", BrokerAddress("127.0.0.1", 1, username=f"coordinator@{cfg.transport.run_id}"),
                        reg, log=lines.append)
    coord.link = RecordingLink()
    e = coord.engine
    e.base_accuracy = {"overall": 0.0, "per_domain": {}}
    assignments, skipped = e.open_round(1, available=set(IDS))
    e.journal.open(1, e.nonce, assignments, skipped)
    coord.round = OpenRound(1, {a.client: a for a in assignments}, skipped, time.perf_counter(),
                            time.monotonic() + 600)
    for i in IDS:
        coord.sessions[i] = f"s-{i}"
    coord.round.plan_sent = {i: time.monotonic() for i in IDS}
    coord.round.plan_sessions = {i: f"s-{i}" for i in IDS}
    outboxes = {i: Outbox(Signer(creds[i].signing_key), Counter(), cfg.transport.run_id, e.nonce) for i in IDS}
    yield coord, outboxes, lines, cfg.transport.run_id
    coord.run_lock.release()


def _chunk(outbox, run, device, data=b"", *, transfer=None, round_idx=1, total=None, nbytes=None, seq=0):
    """One signed update chunk of ``device``, with header fields overridden as given."""
    t = device_topic(run, device, "up")
    transfer = transfer or uuid.uuid4().hex
    body = next(chunk_transfer(data, kind="update", run=run, nonce=outbox.nonce, round_idx=round_idx, device=device,
                               transfer=transfer, meta={"round": round_idx, "update_id": transfer,
                                                        "report": report_of(round_idx)},
                               next_ctr=outbox.counter.next))
    if total is not None or nbytes is not None or seq:
        n = int.from_bytes(body[:4], "big")
        header = json.loads(body[4:4 + n])
        header.update({k: v for k, v in (("total", total), ("nbytes", nbytes), ("seq", seq)) if v is not None})
        if seq:
            header.pop("meta", None)
        h = json.dumps(header, separators=(",", ":")).encode()
        body = len(h).to_bytes(4, "big") + h + body[4 + n:]
    return t, outbox.signer.seal(t, body)


def _growth_per_message(coord, messages, warm: int = 300, n: int = 1500) -> float:
    """Bytes of Python memory held per handled message, between ``warm`` messages and ``n`` more."""
    for _ in range(warm):
        coord.handle(*next(messages))
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(n):
        coord.handle(*next(messages))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    return grown / n


def _forever(make):
    while True:
        yield make()


def test_a_long_update_id_is_refused_by_its_form_and_holds_nothing(harness):
    coord, outboxes, lines, run = harness
    stale = _chunk(outboxes["evil"], run, "evil", transfer="x" * 25_000, round_idx=0)
    acks = coord.link.count("ack")
    per = _growth_per_message(coord, _forever(lambda: stale))
    assert per < 64, f"{per:.0f} bytes held per re-send of a 25 KB-id chunk"
    assert coord.link.count("ack") == acks  # an id of the wrong form is not answered (nothing echoes it back)
    assert any("not of its documented form" in e["reason"] and e["count"] > 1000 for e in coord.events)


def test_fresh_stale_updates_get_a_bounded_number_of_answers(harness):
    coord, outboxes, lines, run = harness
    acks = coord.link.count("ack")
    per = _growth_per_message(coord, _forever(lambda: _chunk(outboxes["evil"], run, "evil", round_idx=0)))
    assert per < 64, f"{per:.0f} bytes held per stale update"
    answered = coord.link.count("ack") - acks
    assert 0 < answered <= MAX_REFUSAL_ACKS  # past the cap the device's junk is refused without an answer
    assert len(coord.answers) <= 2 * coord.answers.per_device


def test_empty_chunks_cannot_pile_up_in_the_reassembler(harness):
    coord, outboxes, lines, run = harness
    uid = uuid.uuid4().hex
    seq = iter(range(1, 10**9))
    per = _growth_per_message(coord, _forever(
        lambda: _chunk(outboxes["evil"], run, "evil", transfer=uid, total=30_000, nbytes=1000, seq=next(seq))))
    assert per < 64, f"{per:.0f} bytes held per empty chunk"
    assert coord.reassembler.buffered == 0


def test_refused_updates_of_the_current_round_are_counted_not_listed(harness):
    coord, outboxes, lines, run = harness
    limit = coord._expected_bytes(coord.round.assignments["evil"])
    per = _growth_per_message(coord, _forever(
        lambda: _chunk(outboxes["evil"], run, "evil", b"z" * 5000, nbytes=limit + 1, total=None)))
    assert per < 64, f"{per:.0f} bytes held per refused update"
    mine = [x for x in coord.round.rejected if x["client"] == "evil"]
    assert len(mine) <= 5 and sum(x["count"] for x in mine) >= 1800
    assert len(coord.refusals.of_round(1)) < 20
    said = [ln for ln in lines if "refused a message from evil" in ln]
    assert len(said) < 40  # the first few of each kind, then every power of ten


def test_a_hello_storm_sends_the_plan_at_most_once_per_interval(harness):
    coord, outboxes, lines, run = harness
    t = device_topic(run, "good", "hello")
    prof = DeviceProfile(name="fake", **FAST_PROFILE).to_dict()
    r = coord.round
    r.plan_sent["good"] = time.monotonic()  # its plan just went out
    before = coord.link.count("down")
    for k in range(200):
        coord.handle(t, outboxes["good"].json(t, {"type": "hello", "device": "good", "session": f"storm-{k}",
                                                  "profile": prof, "examples": 8}))
    assert coord.link.count("down") == before  # all 200 within the interval: held back, not sent
    assert "good" in r.resend_due
    r.plan_sent["good"] -= coord.cfg.transport.resend_interval_s  # the interval has passed
    coord._send_due_plans(r)
    coord._send_due_plans(r)
    assert coord.link.count("down") - before == len(r.assignments["good"].start) // coord.cfg.transport.chunk_bytes + 1
    assert r.plan_sessions["good"] == "storm-199"  # to the session it has now


def test_a_hello_cannot_switch_the_trainer_unless_the_operator_allowed_it(harness):
    coord, outboxes, lines, run = harness
    t = device_topic(run, "evil", "hello")
    prof = DeviceProfile(name="fake", trainer="executorch", **FAST_PROFILE).to_dict()
    coord.handle(t, outboxes["evil"].json(t, {"type": "hello", "device": "evil", "session": "et", "profile": prof,
                                              "examples": 8}))
    assert any("trainer 'executorch' is not allowed" in e["reason"] for e in coord.events)
    assert coord.engine.by_id["evil"].device.profile.trainer == "torch"


def test_hello_fields_are_bounded(harness):
    coord, outboxes, lines, run = harness
    t = device_topic(run, "evil", "hello")
    prof = DeviceProfile(name="fake", **FAST_PROFILE).to_dict()
    for over, says in (({"programs": ["p"] * 1000}, "'programs'"), ({"domains": {f"d{i}": 1 for i in range(500)}},
                                                                       "'domains'"), ({"examples": 10**15}, "'examples'")):
        coord.handle(t, outboxes["evil"].json(t, {"type": "hello", "device": "evil", "session": "b", "profile": prof,
                                                  "examples": 8, **over}))
        assert any(says in e["reason"] for e in coord.events), says


def test_a_device_revoked_mid_round_leaves_it_at_once(harness):
    coord, outboxes, lines, run = harness
    r = coord.round
    assert "good" in r.waiting_for()
    coord.registry.revoke("good")
    coord._leave_revoked(r)
    assert "revoked during the round" in r.failed["good"]
    assert "good" not in r.waiting_for()


def test_chunk_headers_are_bounded_by_form():
    body = next(chunk_transfer(b"a" * 10, kind="update", run="r", nonce="n", round_idx=1, device="d", transfer="t",
                               meta={}, next_ctr=lambda: 1))
    n = int.from_bytes(body[:4], "big")
    header = json.loads(body[4:4 + n])
    for key, bad in (("total", 5), ("transfer", "a b"), ("device", "x" * 100), ("kind", "junk"), ("run", "r/x")):
        h = json.dumps({**header, key: bad}).encode()
        with pytest.raises(ProtocolError):
            parse_chunk(len(h).to_bytes(4, "big") + h + b"a" * 10)
    deep = json.dumps({**header, "meta": json.loads("[" * 40 + "]" * 40)}).encode()
    with pytest.raises(ProtocolError, match="nested deeper"):
        parse_chunk(len(deep).to_bytes(4, "big") + deep + b"a" * 10)


def test_one_coordinator_per_run_and_registry(tmp_path):
    reg = Registry.create(tmp_path / "registry")
    held = reg.lock_run("r1")
    with pytest.raises(RegistryError, match="already being coordinated"):
        Registry(tmp_path / "registry").lock_run("r1")
    other = reg.lock_run("r2")  # another run is another lock
    held.release()
    reg.lock_run("r1").release()  # free again once the first let go
    other.release()


def test_a_second_coordinator_of_the_same_run_is_refused_before_it_starts(harness, tmp_path):
    coord, _, _, run = harness
    cfg = config(tmp_path, IDS, **{"transport.run_id": run})
    with pytest.raises(ConfigError, match="already being coordinated"):
        Coordinator(cfg, tmp_path / "out2", BrokerAddress("127.0.0.1", 1), coord.registry)


def test_a_program_build_runs_beside_the_coordinator_and_is_used_once_done(tmp_path):
    import subprocess
    import sys

    from fedlora_edge.coordinator.et_compile import CompilingStore
    from fedlora_edge.coordinator.programs import BackgroundBuilds
    from fedlora_edge.edge_client.et_train import program_key

    store = CompilingStore(tmp_path / "programs")
    spec = {"version": 4, "model": "tiny-llama", "ranks": {"m": 2}}
    key = program_key(spec)
    go = tmp_path / "go"
    child = ("import json, pathlib, sys, time\n"
             "go, root, key = map(pathlib.Path, sys.argv[1:4])\n"
             "while not go.exists(): time.sleep(0.01)\n"  # the test says when the 'build' ends
             "(root / f'{key}.pte').write_bytes(b'program')\n"
             "(root / f'{key}.json').write_text(json.dumps({'key': str(key), 'bytes': 7}))\n")
    said: list[str] = []
    builds = BackgroundBuilds(store, log=said.append,
                              command=lambda s: [sys.executable, "-c", child, str(go), str(store.root), key])
    assert builds.ready(spec) is None
    builds.want(spec)
    builds.want(spec)  # asked again while it builds: still one build
    assert len(builds._running) == 1 and "is being built" in builds.reason(spec)
    assert builds.ready(spec) is None  # nothing half-written is read while the build runs
    go.touch()
    proc = next(iter(builds._running.values()))[0]
    proc.wait(60)
    assert builds.ready(spec) == {"key": key, "bytes": 7}
    assert any("built in the background" in line for line in said)

    failing = BackgroundBuilds(store, log=said.append, command=lambda s: [sys.executable, "-c", "raise SystemExit(3)"])
    other = {**spec, "ranks": {"m": 4}}
    failing.want(other)
    next(iter(failing._running.values()))[0].wait(60)
    assert failing.ready(other) is None and "failed to build" in failing.reason(other)
    failing.want(other)  # not tried again in the run
    assert not failing._running and not failing._queued
    assert subprocess.call([sys.executable, "-m", "fedlora_edge.coordinator.programs", "--help"], stdout=subprocess.DEVNULL) == 0


@pytest.mark.integration
def test_two_runs_on_one_mosquitto_and_one_registry_complete_every_round(tmp_path):

    dep = deployment("mosquitto", tmp_path)
    try:
        runs = {"run-a": ["a1", "a2"], "run-b": ["b1", "b2"]}
        creds = dep.enrol(*[i for ids in runs.values() for i in ids], max_examples=8)
        threads, devs = {}, {}
        for run, ids in runs.items():
            (tmp_path / run).mkdir()
            cfg = config(tmp_path / run, ids, rounds=2, **{"transport.run_id": run})
            threads[run] = CoordThread(coordinator(dep, cfg, tmp_path / run / "out"))
            threads[run].start()
        for run, ids in runs.items():
            devs.update({i: FakeDevice(dep, run, i, creds=creds[i]) for i in ids})
        two_runs_train(devs, threads)  # both runs' rounds interleaved on the one broker
        for d in devs.values():
            d.close()
        assert "coordinator@run-a" in (tmp_path / "mosquitto" / "passwd").read_text()
    finally:
        dep.close()


@pytest.mark.integration
def test_outputs_that_fail_to_write_are_exit_6_and_a_resume_writes_them_without_devices(tmp_path, monkeypatch):
    import fedlora_edge.coordinator.engine as engine_mod
    from fedlora_edge.coordinator.errors import StorageError
    dep = deployment("embedded", tmp_path)
    try:
        ids = ["p", "q"]
        creds = dep.enrol(*ids, max_examples=8)
        cfg = config(tmp_path, ids, rounds=1)
        out = tmp_path / "out"
        real = engine_mod.save_outputs

        def disk_full(e, report):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(engine_mod, "save_outputs", disk_full)
        th = CoordThread(coordinator(dep, cfg, out))
        th.start()
        devs = {i: FakeDevice(dep, cfg.transport.run_id, i, creds=creds[i]) for i in ids}
        plans = {i: d.next_plan() for i, d in devs.items()}
        for k, (i, d) in enumerate(sorted(devs.items())):
            assert d.wait_ack(d.send(1, trained(plans[i].data, k)))["status"] == "accepted"
        with pytest.raises(StorageError, match="cannot write the run's outputs"):
            th.result()
        assert not any(r.get("state") == "done" for d in devs.values() for r in d.rounds)  # 'done' not said yet
        for d in devs.values():
            d.close()  # the devices are gone; the resume must not wait for them
        monkeypatch.setattr(engine_mod, "save_outputs", real)
        resumed = coordinator(dep, cfg, out, resume=True)
        report = CoordThread(resumed)
        report.start()
        rep = report.result()
        assert [r["status"] for r in rep["rounds"]] == ["ok"]
        assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "report.json").is_file()
    finally:
        dep.close()


@pytest.fixture
def buffered_harness(tmp_path):
    """A coordinator collecting version 1 of a buffered run (buffer 1, both devices training)."""
    from fedlora_edge.coordinator.buffered import BufferedService

    reg = Registry.create(tmp_path / "registry")
    creds = {i: reg.add(i, max_examples=8) for i in IDS}
    cfg = config(tmp_path, IDS, rounds=2, **{"schedule.mode": "buffered", "schedule.buffer": 1})
    coord = Coordinator(cfg, tmp_path / "out", BrokerAddress("127.0.0.1", 1,
                                                             username=f"coordinator@{cfg.transport.run_id}"), reg,
                        log=lambda *_: None)
    coord.link = RecordingLink()
    coord.engine.base_accuracy = {"overall": 0.0, "per_domain": {}}
    for i in IDS:
        coord.sessions[i] = f"s-{i}"
    svc = coord.buffered = BufferedService(coord)
    r = svc.open(1, {})
    svc.dispatch(r)
    outboxes = {i: Outbox(Signer(creds[i].signing_key), Counter(), cfg.transport.run_id, coord.engine.nonce)
                for i in IDS}
    yield coord, svc, r, outboxes, cfg.transport.run_id
    coord.run_lock.release()


def _update_of(coord, r, outbox, run, device, k: int) -> tuple[str, str, bytes]:
    uid = uuid.uuid4().hex
    return (uid, *_chunk(outbox, run, device, trained(r.assignments[device].start, k), transfer=uid))


def test_a_late_update_of_a_buffered_plan_that_ended_is_answered_stale(buffered_harness):
    coord, svc, r, outboxes, run = buffered_harness
    assert set(r.assignments) == set(IDS)
    svc._end(r, "evil", "no complete update within transport.round_timeout_s (60 s) of its plan")
    uid, t, payload = _update_of(coord, r, outboxes["evil"], run, "evil", 1)
    coord.handle(t, payload)
    assert coord.answers.get("evil", uid)[1:] == ("stale", "its plan for round 1 ended: no complete update within "
                                                            "transport.round_timeout_s (60 s) of its plan")
    assert "evil" not in r.accepted


def test_updates_that_come_once_the_buffer_is_full_hold_one_per_device(buffered_harness):
    coord, svc, r, outboxes, run = buffered_harness
    uid, t, payload = _update_of(coord, r, outboxes["good"], run, "good", 0)
    coord.handle(t, payload)
    coord._commit()
    assert svc.full(r) and coord.answers.get("good", uid)[1] == "accepted"
    for k in range(50):  # the buffer is full: evil's update waits for the next version, once, however often sent
        coord.handle(*_update_of(coord, r, outboxes["evil"], run, "evil", k)[1:])
    assert list(svc.deferred) == ["evil"] and "evil" not in r.accepted


@pytest.mark.integration
def test_a_finished_run_is_never_announced_again(tmp_path):
    """`done` is the last round message: the periodic re-announcement (and a reconnect's) stops, so
    a device that comes later finds no run to join."""
    dep = deployment("embedded", tmp_path)
    try:
        creds = dep.enrol("a1", max_examples=8)
        cfg = config(tmp_path, ["a1"], rounds=1, **{"transport.announce_every_s": 0.2})
        th = CoordThread(coordinator(dep, cfg, tmp_path / "out"))
        th.start()
        d = FakeDevice(dep, cfg.transport.run_id, "a1", creds=creds["a1"])
        plan = d.next_plan()
        assert d.wait_ack(d.send(1, trained(plan.data, 0)))["status"] == "accepted"
        d.wait_round("done")
        th.result()  # it waited for this device's farewell (never sent) while re-announcing was due
        while d._read(0.5) is not None:
            pass
        assert d.rounds[-1]["state"] == "done"
        late = FakeDevice(dep, cfg.transport.run_id, "a1", creds=creds["a1"], hello=False)
        assert late._read(2.0) is None and late.rounds == []
    finally:
        dep.close()
