"""Who sent a message: signatures, the message layer's checks, counters, the registry, credentials files."""

import os
import stat

import pytest

from fedlora_edge.coordinator.registry import Registry, RegistryError, verify_password
from fedlora_edge.core.framing import ProtocolError
from fedlora_edge.core.identity import (
    Counter,
    ReplayGuard,
    Signer,
    Verifier,
    load_credentials,
    new_signing_key,
    save_credentials,
)
from fedlora_edge.core.messages import Outbox, read_message
from fedlora_edge.core.mqtt import device_topic, topic


@pytest.fixture
def reg(tmp_path):
    return Registry.create(tmp_path / "reg")


def _device_side(reg, device="pi5", tmp=None):
    creds = reg.add(device)
    return creds, Outbox(Signer(creds.signing_key), Counter(), "r", "nonce-1")


def test_a_signed_message_verifies_and_any_change_breaks_it(reg):
    creds, out = _device_side(reg)
    t = device_topic("r", "pi5", "event")
    payload = out.json(t, {"type": "failure", "device": "pi5", "round": 1, "reason": "x"})
    verifier = Verifier(reg.key_of)
    sender, leaf, fields, _ = read_message(verifier, ReplayGuard(), "r", t, payload)
    assert (sender, leaf, fields["reason"], fields["nonce"]) == ("pi5", "event", "x", "nonce-1")
    tampered = payload[:-3] + b"y" + payload[-2:]
    with pytest.raises(ProtocolError, match="bad signature"):
        read_message(verifier, ReplayGuard(), "r", t, tampered)
    with pytest.raises(ProtocolError, match="bad signature"):  # moved to another device's topic
        reg.add("pi4")
        read_message(verifier, ReplayGuard(), "r", device_topic("r", "pi4", "event"), payload)


def test_a_message_signed_by_another_key_is_refused(reg):
    reg.add("pi5")
    forger = Outbox(Signer(new_signing_key()), Counter(), "r", "nonce-1")
    t = device_topic("r", "pi5", "hello")
    with pytest.raises(ProtocolError, match="bad signature"):
        read_message(Verifier(reg.key_of), ReplayGuard(), "r", t, forger.json(t, {"type": "hello", "device": "pi5"}))


def test_an_unknown_or_revoked_sender_is_refused_at_its_next_message(reg):
    creds, out = _device_side(reg)
    t = device_topic("r", "pi5", "event")
    v = Verifier(reg.key_of)
    read_message(v, ReplayGuard(), "r", t, out.json(t, {"type": "received", "device": "pi5", "round": 1}))
    Registry(reg.folder).revoke("pi5")  # another process revokes it (the CLI)
    with pytest.raises(ProtocolError, match="not enrolled, or revoked"):
        read_message(v, ReplayGuard(), "r", t, out.json(t, {"type": "received", "device": "pi5", "round": 1}))
    with pytest.raises(ProtocolError, match="no key for sender 'ghost'"):
        read_message(v, ReplayGuard(), "r", device_topic("r", "ghost", "event"), b"x" * 100)


def test_fields_must_agree_with_the_topic(reg):
    _, out = _device_side(reg)
    v, t = Verifier(reg.key_of), device_topic("r", "pi5", "event")
    with pytest.raises(ProtocolError, match="names device 'pi4'"):
        read_message(v, ReplayGuard(), "r", t, out.json(t, {"type": "failure", "device": "pi4", "round": 1}))
    with pytest.raises(ProtocolError, match="'hello' message on a 'event' topic"):
        read_message(v, ReplayGuard(), "r", t, out.json(t, {"type": "hello", "device": "pi5"}))
    other_run = Outbox(out.signer, out.counter, "other", "nonce-1")
    with pytest.raises(ProtocolError, match="names run 'other'"):
        read_message(v, ReplayGuard(), "r", t, other_run.json(t, {"type": "failure", "device": "pi5", "round": 1}))
    with pytest.raises(ProtocolError, match="not a topic of run"):
        read_message(v, ReplayGuard(), "r", "fedlora/r/dev/pi5/secret", b"x" * 100)


def test_a_replayed_older_message_is_refused_and_a_redelivery_is_not(reg):
    _, out = _device_side(reg)
    v, guard, t = Verifier(reg.key_of), ReplayGuard(), device_topic("r", "pi5", "hello")
    old = out.json(t, {"type": "hello", "device": "pi5"})
    new = out.json(t, {"type": "hello", "device": "pi5"})
    read_message(v, guard, "r", t, new)
    read_message(v, guard, "r", t, new)  # QoS 1 delivers again: the same counter is fine
    with pytest.raises(ProtocolError, match="replayed or out-of-date"):
        read_message(v, guard, "r", t, old)


def test_the_coordinator_signs_its_topics_and_a_device_cannot(reg):
    coord = reg.coordinator_credentials()
    creds, dev = _device_side(reg)
    t = topic("r", "round")
    device_verifier = Verifier(lambda s: creds.coordinator_key if s == "coordinator" else None)
    good = Outbox(Signer(coord.signing_key), Counter(), "r", "n").json(t, {"type": "round", "round": 1,
                                                                           "state": "training"})
    assert read_message(device_verifier, ReplayGuard(), "r", t, good)[0] == "coordinator"
    with pytest.raises(ProtocolError, match="bad signature"):
        read_message(device_verifier, ReplayGuard(), "r", t, dev.json(t, {"type": "round", "round": 9,
                                                                          "state": "done"}))


def test_counters_only_grow_across_restarts_even_when_the_clock_goes_back(tmp_path, monkeypatch):
    path = tmp_path / "counter"
    c = Counter(path, block=10)
    seen = [c.next() for _ in range(25)]
    assert seen == sorted(set(seen))
    import fedlora_edge.core.identity as ident

    monkeypatch.setattr(ident.time, "time_ns", lambda: 0)  # a device whose clock reset to 1970
    assert Counter(path, block=10).next() > seen[-1]
    path.write_text("garbage")  # a torn counter file is set aside, not a crash
    Counter(path, block=10).next()
    assert list(tmp_path.glob("counter.corrupt-*"))


def test_the_registry_keeps_no_secret_and_hashes_work_for_the_broker(reg, tmp_path):
    creds = reg.add("pi5", max_examples=64)
    text = (reg.folder / "registry.json").read_text()
    assert creds.mqtt_password not in text and "signing_key" not in text
    e = reg.devices["pi5"]
    assert verify_password(creds.mqtt_password, e.password_hash) and not verify_password("nope", e.password_hash)
    assert e.password_hash.startswith("$7$") and e.max_examples == 64
    assert reg.check_login("pi5", creds.mqtt_password) and not reg.check_login("pi5", "x")
    assert not reg.check_login(None, None) and not reg.check_login("ghost", creds.mqtt_password)
    with pytest.raises(RegistryError, match="already enrolled"):
        reg.add("pi5")
    with pytest.raises(RegistryError, match="device id"):
        reg.add("a/b")
    with pytest.raises(RegistryError, match="device id"):
        reg.add("coordinator")
    reg.revoke("pi5")
    assert not reg.check_login("pi5", creds.mqtt_password) and reg.key_of("pi5") is None
    with pytest.raises(RegistryError, match="no device registry"):
        Registry(tmp_path / "nowhere")


def test_credentials_files_are_private_and_checked(reg, tmp_path):
    creds = reg.add("pi5")
    path = tmp_path / "pi5.json"
    save_credentials(path, creds)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    back = load_credentials(path, role="device")
    assert back.signing_key == creds.signing_key and back.coordinator_key == reg.coordinator_key
    assert creds.mqtt_password not in repr(back)  # never in a log line
    with pytest.raises(ValueError, match="holds a device identity"):
        load_credentials(path, role="coordinator")
    path.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_credentials(path)
    with pytest.raises(ValueError, match="not found"):
        load_credentials(tmp_path / "missing.json")
