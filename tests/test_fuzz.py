"""No input crashes the coordinator or a client: 10,000 generated messages at a live run.

The broker is open (anyone may publish on any topic), so the generated messages reach every
handler: random bytes; mutated copies of genuine messages without a new signature; and messages
*validly signed* by an enrolled, sampled device (``fz``) or by the coordinator's key, whose content
is broken by construction: update chunks with a corrupted tensor, report or header, hellos with
junk profiles, events for other rounds, chunks whose checksum cannot match.  Hypothesis generates
them (derandomised, so a failure reproduces).

Then: the coordinator and the real client process are alive, the round completed with the
genuine updates, the final adapter is bitwise the one of the same run without the fuzzing
(nothing invalid was aggregated), and memory stayed bounded.
"""

from __future__ import annotations

import json
import uuid

import psutil
import pytest
import torch
from fleets import FAST_PROFILE
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mqttkit import (
    CoordThread,
    FakeDevice,
    config,
    coordinator,
    deployment,
    log_of,
    report_of,
    spawn,
    trained,
    wait_for,
)
from safetensors.torch import load_file

from fedlora_edge.core.framing import encode_json
from fedlora_edge.core.identity import Counter, Signer
from fedlora_edge.core.messages import Outbox
from fedlora_edge.core.mqtt import device_topic, topic
from fedlora_edge.core.profile import DeviceProfile
from fedlora_edge.core.wire import decode_tensors, encode_tensors

pytestmark = pytest.mark.integration
TO_COORDINATOR, TO_CLIENT = 7000, 3000
def fuzz(n: int):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck))




json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=30))
junk_json = st.recursive(json_leaf, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                                kids, max_size=4),
                         max_leaves=12)
bad_values = st.one_of(st.none(), st.booleans(), st.just(-1), st.just(0), st.just(10**30), st.just("NaN"),
                       st.just([]), st.just({}), st.text(max_size=10))
# values each report field must refuse (a huge loss or example count is valid input, so not here)
BAD_REPORT = {"num_examples": [None, True, 0, -1, 2.5, "8", [], {}], "steps": [None, True, 0, -1, 10**6, "1"],
              "first_loss": [None, True, -1.0, "NaN", [], {}], "last_loss": [None, False, -0.5, "inf", {}],
              "seconds": [None, True, -1, "1", []], "round": [None, 0, 2, -1, "1", []]}
BAD_SCHEMA = ["1.0", "9.9", "two", None, 2]


def corrupt_tensors(data: bytes, how: str, key_index: int) -> bytes:
    """A genuine update broken in one way that can never validate."""
    t = decode_tensors(data)
    key = sorted(t)[key_index % len(t)]
    v = t[key].clone()
    if how == "nan":
        v.view(-1)[0] = float("nan")
    elif how == "inf":
        v.view(-1)[0] = float("inf")
    elif how == "huge":
        v.view(-1)[0] = 1e9
    elif how == "shape":
        v = v.reshape(-1)[1:].contiguous()
    elif how == "dtype":
        v = v.to(torch.float16)
    elif how == "drop":
        del t[key]
        return encode_tensors(t)
    elif how == "extra":
        t[key + ".extra"] = v
        return encode_tensors(t)
    t[key] = v
    return encode_tensors(t)


def test_ten_thousand_hostile_messages_crash_nothing_and_change_nothing(tmp_path):
    dep = deployment("open", tmp_path)
    try:
        _run_fuzz(dep, tmp_path)
    finally:
        dep.close()


def _round_with(dep, tmp_path, name, fuzz=None):
    ids = ["d1", "d2", "fz"]
    cfg = config(tmp_path, ids, **{"transport.round_timeout_s": 300})
    creds = {i: dep.registry.add(i, max_examples=8, replace=True) for i in ids}
    run = cfg.transport.run_id
    coord = coordinator(dep, cfg, tmp_path / name)
    th = CoordThread(coord)
    th.start()
    proc = spawn(dep, run, "d2", tmp_path / name / "d2", DeviceProfile(name="p", **FAST_PROFILE), creds["d2"])
    fakes = {i: FakeDevice(dep, run, i, creds=creds[i]) for i in ("d1", "fz")}
    plans = {i: d.next_plan() for i, d in fakes.items()}
    stats = fuzz(dep, run, creds, coord, plans, proc, tmp_path / name / "d2", fakes["fz"]) if fuzz else {}
    for k, (i, d) in enumerate(sorted(fakes.items())):
        uid = d.send(1, trained(plans[i].data, k))
        ack = d.wait_ack(uid)
        assert ack["status"] == "accepted", ack.get("reason")
    report = th.result()
    assert proc.wait(120) == 0, log_of(tmp_path / name / "d2")[-3000:]
    for d in fakes.values():
        d.close()
    return report, load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors")), coord, stats


def _run_fuzz(dep, tmp_path):
    _, expected, _, _ = _round_with(dep, tmp_path, "reference")
    report, got, coord, stats = _round_with(dep, tmp_path, "fuzzed", fuzz=_fire)
    assert stats["sent"] >= TO_COORDINATOR + TO_CLIENT
    r1 = report["rounds"][0]
    assert r1["status"] == "ok" and r1["valid_updates"] == 3 and r1["failed"] == []
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    # the refusals were counted with their reasons (summarised per device and kind of reason)
    assert sum(e["count"] for e in coord.events) >= 1000
    assert all(isinstance(e["reason"], str) and e["reason"] for e in coord.events)
    # memory stayed bounded: one sender buffers at most two transfers of its plan's size, and the
    # three devices' transfers are what was ever held at once
    assert coord.reassembler.peak_buffered <= 3 * 2 * stats["expected_bytes"], coord.reassembler.peak_buffered
    assert stats["client_rss_growth"] < 100 * 2**20, stats


def _fire(dep, run, creds, coord, plans, client_proc, client_folder, fz_device) -> dict:
    """Send the generated messages; returns what was sent and what the client's memory did.  What is
    signed as ``fz`` shares its counter: one key, one sender, as on a real device."""
    coordinator_creds = dep.registry.coordinator_credentials()
    dev_out = fz_device.outbox
    coord_out = Outbox(Signer(coordinator_creds.signing_key), Counter(), run, coord.engine.nonce)
    link = dep.link(dep.address, f"fuzzer-{uuid.uuid4().hex[:6]}")
    link.connect()
    genuine = trained(plans["fz"].data, 1)
    t_up = device_topic(run, "fz", "up")
    coord_topics = [device_topic(run, d, leaf) for d in ("d1", "d2", "fz", "ghost") for leaf in
                    ("hello", "status", "up", "event")]
    client_topics = [topic(run, "round"), device_topic(run, "d2", "down"), device_topic(run, "d2", "ack")]
    expected_bytes = max(coord._expected_bytes(a) for a in coord.round.assignments.values())
    sent = [0]

    def pub(t, payload):
        link.publish(t, payload)
        sent[0] += 1

    chunk_fields = st.sampled_from(["nbytes", "total", "seq", "sha256", "kind", "round", "run", "nonce", "device",
                                    "transfer", "meta", "type", "schema"])
    report_fields = st.sampled_from(["num_examples", "steps", "first_loss", "last_loss", "seconds", "round"])

    @fuzz(TO_COORDINATOR)
    @given(kind=st.integers(0, 6), t=st.sampled_from(coord_topics), raw=st.binary(max_size=300),
           how=st.sampled_from(["nan", "inf", "huge", "shape", "dtype", "drop", "extra"]), i=st.integers(0, 50),
           field=chunk_fields, rfield=report_fields, bad=bad_values, obj=junk_json)
    def at_coordinator(kind, t, raw, how, i, field, rfield, bad, obj):
        if kind == 0:  # random bytes, anywhere
            pub(t, raw)
        elif kind == 1:  # an update with a tensor broken, validly signed by an enrolled, sampled device
            uid = uuid.uuid4().hex
            for ch in dev_out.chunks(t_up, corrupt_tensors(genuine, how, i), kind="update", round_idx=1, device="fz",
                                     transfer=uid, meta={"round": 1, "update_id": uid, "report": report_of(1)},
                                     chunk_bytes=4096):
                pub(t_up, ch)
        elif kind == 2:  # the genuine tensors with one report field broken
            uid = uuid.uuid4().hex
            rep = dict(report_of(1))
            rep[rfield] = BAD_REPORT[rfield][i % len(BAD_REPORT[rfield])]
            for ch in dev_out.chunks(t_up, genuine, kind="update", round_idx=1, device="fz", transfer=uid,
                                     meta={"round": 1, "update_id": uid, "report": rep}, chunk_bytes=4096):
                pub(t_up, ch)
        elif kind == 3:  # the genuine update with one chunk-header field broken, signed again
            uid = uuid.uuid4().hex
            for body in _chunk_bodies(genuine, run, coord.engine.nonce, uid, dev_out.counter):
                n = int.from_bytes(body[:4], "big")
                h = json.loads(body[4:4 + n])
                if field == "schema":
                    h[field] = BAD_SCHEMA[i % len(BAD_SCHEMA)]
                elif field in h:
                    h[field] = obj if obj != h.get(field) else "changed"
                hb = json.dumps(h).encode()
                pub(t_up, dev_out.signer.seal(t_up, len(hb).to_bytes(4, "big") + hb + body[4 + n:]))
        elif kind == 4:  # a genuine message mutated without a new signature
            payload = bytearray(dev_out.json(t_up, {"type": "chunk"}))
            payload[i % len(payload)] ^= 0xFF
            pub(t_up, bytes(payload))
        elif kind == 5:  # a signed hello or event with junk fields (events never for the open round)
            th, te = device_topic(run, "fz", "hello"), device_topic(run, "fz", "event")
            if i % 2:
                pub(th, dev_out.json(th, {"type": "hello", "device": "fz", "session": "s", "profile": obj,
                                          "examples": bad}))
            else:
                pub(te, dev_out.json(te, {"type": "failure", "device": "fz", "round": 2 + i, "reason": obj}))
        else:  # a JSON body with a schema and nothing else right, on any device topic
            pub(t, encode_json({"junk": obj}) if i % 3 else dev_out.signer.seal(t, encode_json({"x": obj})))

    @fuzz(TO_CLIENT)
    @given(kind=st.integers(0, 3), t=st.sampled_from(client_topics), raw=st.binary(max_size=300), i=st.integers(0, 99),
           obj=junk_json, bad=bad_values)
    def at_client(kind, t, raw, i, obj, bad):
        t_down, t_ack, t_round = device_topic(run, "d2", "down"), device_topic(run, "d2", "ack"), topic(run, "round")
        if kind == 0:
            pub(t, raw)
        elif kind == 1:  # plan chunks signed by the coordinator's key: a broken signature, or a checksum that fails
            for ch in coord_out.chunks(t_down, raw or b"x", kind="plan", round_idx=1, device="d2",
                                       transfer=uuid.uuid4().hex, meta={"round": 1, "plan": obj}):
                if i % 2:
                    pub(t_down, ch[:-1] + bytes([ch[-1] ^ 0x01]))
                    continue
                body = ch[64:]
                n = int.from_bytes(body[:4], "big")
                h = dict(json.loads(body[4:4 + n]), sha256="0" * 64)
                hb = json.dumps(h).encode()
                pub(t_down, coord_out.signer.seal(t_down, len(hb).to_bytes(4, "big") + hb + body[4 + n:]))
        elif kind == 2:  # signed acks for updates the device does not hold, with junk
            pub(t_ack, coord_out.json(t_ack, {"type": "ack", "device": "d2", "round": bad, "update_id": obj,
                                              "status": obj, "reason": obj}))
        else:  # a signed round message with no nonce, or another run's name
            body = {"type": "round", "round": bad, "state": obj}
            payload = coord_out.json(t_round, body, nonce=False) if i % 2 else \
                coord_out.signer.seal(t_round, encode_json({**body, "run": "other", "nonce": "n", "ctr": 1}))
            pub(t_round, payload)

    at_coordinator()
    # the client has trained (its model loaded) before its memory is watched under the fuzzing
    wait_for(lambda: "round 1: update accepted" in log_of(client_folder), what="the client's update accepted")
    rss0 = psutil.Process(client_proc.pid).memory_info().rss
    at_client()
    assert client_proc.poll() is None, "the client process died under the fuzzing"
    return {"sent": sent[0], "expected_bytes": expected_bytes,
            "client_rss_growth": psutil.Process(client_proc.pid).memory_info().rss - rss0}


def _chunk_bodies(data, run, nonce, uid, counter):
    from fedlora_edge.core.framing import chunk_transfer

    return list(chunk_transfer(data, kind="update", run=run, nonce=nonce, round_idx=1, device="fz", transfer=uid,
                               meta={"round": 1, "update_id": uid, "report": report_of(1)}, next_ctr=counter.next,
                               chunk_bytes=4096))
