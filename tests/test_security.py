"""Red team: an attacker with an enrolled device of its own (``evil``), or no credentials at all,
against the embedded broker, Mosquitto configured by `fedlora broker-config` (TLS, passwords,
per-device ACL), and an *open* broker where only the message signatures stand in the way.

Every attack must be refused, and the run must end with the same adapter, bit for bit, as the
same run without the attacker."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import torch
from fleets import FAST_PROFILE
from mqttkit import CoordThread, FakeDevice, config, coordinator, deployment, report_of, start_run, trained
from safetensors.torch import load_file

from fedlora_edge.core.identity import Counter, Signer
from fedlora_edge.core.messages import Outbox
from fedlora_edge.core.mqtt import BrokerAuthError, Link, device_topic, topic
from fedlora_edge.core.profile import DeviceProfile

pytestmark = pytest.mark.integration


@pytest.fixture(params=["embedded", "mosquitto", "open"])
def dep(request, tmp_path):
    d = deployment(request.param, tmp_path)
    yield d
    d.close()


@pytest.fixture(params=["embedded", "mosquitto"])
def closed(request, tmp_path):
    d = deployment(request.param, tmp_path)
    yield d
    d.close()




def run_honest_round(devs: dict, r: int, plans=None) -> None:
    plans = plans or {i: d.next_plan() for i, d in devs.items()}
    for k, (i, d) in enumerate(sorted(devs.items())):
        uid = d.send(r, trained(plans[i].data, k))
        assert d.wait_ack(uid)["status"] == "accepted"


def adapter(out):
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def reference(dep, tmp_path, ids, creds, rounds=2):
    """The same run without an attacker: the adapter every attacked run must end with."""
    cfg = config(tmp_path, ids, rounds=rounds)
    _, th, devs = start_run(dep, cfg, tmp_path / "ref", creds, ids)
    for r in range(1, rounds + 1):
        run_honest_round(devs, r)
    th.result()
    for d in devs.values():
        d.close()  # the attacked run's devices connect under the same ids
    return adapter(tmp_path / "ref")


def attacker_link(dep, creds, client_id=None, subscribe=()):
    address = dataclasses.replace(dep.address, username=creds.mqtt_username, password=creds.mqtt_password,
                                  ca_pem=creds.ca_pem)
    link = dep.link(address, client_id or creds.mqtt_username)
    for t in subscribe:
        link.subscribe(t)
    link.connect()
    return link


def test_impersonation_and_replay_are_refused(dep, tmp_path):
    ids = ["victim", "other"]
    creds = dep.enrol(*ids, "evil", max_examples=8)
    expected = reference(dep, tmp_path, ids, creds)
    cfg = config(tmp_path, ids, rounds=2)
    run = cfg.transport.run_id
    coord = coordinator(dep, cfg, tmp_path / "out")
    th = CoordThread(coord)
    th.start()
    devs = {i: FakeDevice(dep, run, i, creds=creds[i]) for i in ids}
    victim = devs["victim"]
    evil = attacker_link(dep, creds["evil"])
    forge = Outbox(Signer(creds["evil"].signing_key), Counter(), run, victim.rounds[-1]["nonce"])
    vt = {leaf: device_topic(run, "victim", leaf) for leaf in ("hello", "up", "event", "down", "ack", "status")}

    def publish(t, payload, retain=False):
        evil.publish(t, payload, retain=retain)  # a closed broker drops it silently; an open one delivers it

    plans = {i: d.next_plan() for i, d in devs.items()}
    # a hello as the victim, with a huge example count; an update as the victim; a failure as the
    # victim; a "done" to every device; a plan of the attacker's own on the victim's downlink
    prof = DeviceProfile(name="forged", **FAST_PROFILE).to_dict()
    publish(vt["hello"], forge.json(vt["hello"], {"type": "hello", "device": "victim", "session": "x",
                                                  "profile": prof, "examples": 10**12}), retain=True)
    for ch in forge.chunks(vt["up"], trained(plans["victim"].data, 99), kind="update", round_idx=1, device="victim",
                           transfer=uuid.uuid4().hex, meta={"round": 1, "update_id": "u", "report": report_of(1)}):
        publish(vt["up"], ch)
    publish(vt["event"], forge.json(vt["event"], {"type": "failure", "device": "victim", "round": 1, "reason": "x"}))
    publish(topic(run, "round"), forge.json(topic(run, "round"), {"type": "round", "round": 1, "state": "done"}),
            retain=True)
    for ch in forge.chunks(vt["down"], b"evil plan", kind="plan", round_idx=1, device="victim", transfer="p",
                           meta={"round": 1}):
        publish(vt["down"], ch)
    # the victim itself claims a billion examples: its weight stays what the coordinator granted (8)
    captured = []
    for k, i in enumerate(sorted(ids)):
        d = devs[i]
        data = trained(plans[i].data, k)
        if i == "victim":
            uid = uuid.uuid4().hex
            meta = {"round": 1, "update_id": uid, "report": report_of(1, n=10**9)}
            t = device_topic(run, i, "up")
            captured = list(d.outbox.chunks(t, data, kind="update", round_idx=1, device=i, transfer=uid, meta=meta,
                                            chunk_bytes=4096))
            for ch in captured:
                d.link.publish(t, ch)
        else:
            uid = d.send(1, data)
        assert d.wait_ack(uid)["status"] == "accepted"
    # round 2: the victim's captured round-1 update replayed on its own topic, then everyone honest
    plans2 = {i: d.next_plan() for i, d in devs.items()}
    for ch in captured:
        publish(vt["up"], ch)
    run_honest_round(devs, 2, plans2)
    report = th.result()

    got = adapter(tmp_path / "out")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    r1 = report["rounds"][0]
    assert r1["valid_updates"] == 2 and r1["failed"] == []
    assert {c["client"]: c["num_examples"] for c in r1["clients"]}["victim"] == 10**9  # claimed...
    victim.wait_round("done")
    assert all(r["nonce"] == victim.rounds[0]["nonce"] for r in victim.rounds)
    assert not any(x.get("state") == "done" for x in victim.rounds[:-1])  # ...no forged done was ever taken
    refused = " | ".join(x["reason"] for x in coord.events)
    if dep.kind == "open":  # the broker let everything through: the signatures refused it
        assert refused.count("bad signature") >= 3  # hello, update chunks, failure
        assert any("bad signature" in x for x in victim.refused)  # the forged done and plan
        assert "replayed or out-of-date" in refused  # the captured round-1 update, sent again in round 2
    else:  # the broker's ACL dropped every forged message before anyone saw it
        assert "bad signature" not in refused and not victim.refused


def test_an_enrolled_device_cannot_eavesdrop_on_another(closed, tmp_path):
    ids = ["victim"]
    creds = closed.enrol("victim", "evil")
    cfg = config(tmp_path, ids)
    run = cfg.transport.run_id
    th = CoordThread(coordinator(closed, cfg, tmp_path / "out"))
    th.start()
    victim = FakeDevice(closed, run, "victim", creds=creds["victim"])  # its hello is retained now
    wanted = [device_topic(run, "victim", x) for x in ("down", "ack", "hello", "up", "event", "status")]
    evil = attacker_link(closed, creds["evil"], subscribe=["fedlora/#", "#", f"fedlora/{run}/dev/+/down", *wanted])
    evil._on_message = lambda client, userdata, msg: evil.inbox.put((msg.topic, msg.payload))  # no client-side filter
    evil._client.on_message = evil._on_message
    run_honest_round({"victim": victim}, 1)
    th.result()
    victim.wait_round("done")
    seen = []
    while (msg := evil.get(0.5)) is not None:
        seen.append(msg[0])
    assert not [t for t in seen if "/dev/" in t], seen  # nothing of the victim's traffic reached it


def test_anonymous_and_wrong_credentials_are_refused(closed):
    creds = closed.enrol("victim")["victim"]
    for username, password in ((None, None), ("victim", "wrong"), ("coordinator", "wrong"), ("nobody", "x")):
        address = dataclasses.replace(closed.address, username=username, password=password, ca_pem=creds.ca_pem)
        with pytest.raises(BrokerAuthError):
            closed.link(address, f"anon-{uuid.uuid4().hex[:6]}").connect(timeout_s=30)


def test_an_mqtt_client_id_cannot_be_taken_over(closed, tmp_path):
    ids = ["victim"]
    creds = closed.enrol("victim", "evil")
    cfg = config(tmp_path, ids)
    coord = coordinator(closed, cfg, tmp_path / "out")
    th = CoordThread(coord)
    th.start()
    victim = FakeDevice(closed, cfg.transport.run_id, "victim", creds=creds["victim"])
    drops = []
    victim.link._client.on_disconnect = lambda *a, **k: drops.append(a)
    # with its own login, and with the victim's user name but a wrong password, under the victim's client id
    attacker_link(closed, creds["evil"], client_id="victim")
    bad = dataclasses.replace(closed.address, username="victim", password="wrong", ca_pem=creds["evil"].ca_pem)
    with pytest.raises(BrokerAuthError):
        closed.link(bad, "victim").connect(timeout_s=30)
    run_honest_round({"victim": victim}, 1)
    th.result()
    assert drops == []  # the victim's connection was never closed by the broker


def test_a_revoked_device_is_refused_from_its_next_message(closed, tmp_path):
    ids = ["victim", "other"]
    creds = closed.enrol(*ids)
    cfg = config(tmp_path, ids, rounds=2)
    coord, th, devs = start_run(closed, cfg, tmp_path / "out", creds)
    plans = {i: d.next_plan() for i, d in devs.items()}
    v = devs["victim"]
    assert v.wait_ack(v.send(1, trained(plans["victim"].data, 0)))["status"] == "accepted"
    closed.registry.revoke("victim")  # what `fedlora devices revoke victim` does, from another process
    o = devs["other"]
    assert o.wait_ack(o.send(1, trained(plans["other"].data, 1)))["status"] == "accepted"  # round 1 closes
    plan = o.next_plan()
    v.send(2, b"whatever")
    o.send(2, trained(plan.data, 0))
    report = th.result()
    r2 = report["rounds"][1]
    assert [c["client"] for c in r2["clients"]] == ["other"] and r2["failed"] == []  # the revoked one was not sampled
    if closed.kind == "embedded":  # the embedded broker drops a revoked device's publishes at once
        assert not [e for e in coord.events if e["device"] == "victim"]
    else:  # Mosquitto still has its password until broker-config runs again: the signature check refuses it
        assert any("revoked" in e["reason"] for e in coord.events if e["device"] == "victim")
    assert all(x["client"] != "victim" for x in r2["rejected"])


def test_mutual_tls_on_mosquitto_needs_a_certificate_from_the_run_ca(tmp_path):
    from mqttkit import Mosquitto

    from fedlora_edge.coordinator.registry import Registry
    from fedlora_edge.core.mqtt import BrokerTLSError

    reg = Registry.create(tmp_path / "registry")
    with_cert, without = reg.add("pi5", client_cert=True), reg.add("pi4")
    reg.add_run("r1")
    m = Mosquitto(reg, tmp_path / "m", mtls=True)
    try:
        def login(creds, cert=True):
            return dataclasses.replace(m.address, username=creds.mqtt_username, password=creds.mqtt_password,
                                       ca_pem=creds.ca_pem, cert_pem=creds.cert_pem if cert else None,
                                       key_pem=creds.key_pem if cert else None)

        ok = Link(login(with_cert), "pi5")
        ok.connect(timeout_s=30)  # its certificate and its password
        ok.close()
        with pytest.raises((BrokerTLSError, TimeoutError)):
            Link(login(without), "pi4").connect(timeout_s=30)  # a password alone is not enough
        from cryptography import x509

        assert x509.load_pem_x509_certificate(with_cert.cert_pem.encode()).subject.rfc4514_string() == "CN=pi5"
        # the coordinator's own client certificate (issued by broker-config --mtls) is used for it
        coord = Link(reg.coordinator_login(m.address, run_id="r1"), "coordinator@r1")
        coord.connect(timeout_s=30)
        coord.close()
    finally:
        m.stop()
