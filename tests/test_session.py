"""The device loop (edge_client/session.py) driven through a fake link, without a broker: what it
says (hello, updates, events, the cleared retained messages) and what it does with what the
coordinator signs (a round, a plan, an ack, "done"), forged or garbled messages included."""

from __future__ import annotations

import secrets
from collections import deque
from types import SimpleNamespace

import pytest
from fleets import FAST_PROFILE

from fedlora_edge.core.data import generate_task
from fedlora_edge.core.framing import Reassembler
from fedlora_edge.core.identity import (
    Counter,
    Credentials,
    ReplayGuard,
    Signer,
    Verifier,
    new_signing_key,
    public_key_of,
)
from fedlora_edge.core.messages import Outbox, read_message
from fedlora_edge.core.mqtt import device_topic, topic
from fedlora_edge.core.profile import DeviceProfile
from fedlora_edge.edge_client import session as session_mod
from fedlora_edge.edge_client.device_state import DeviceState
from fedlora_edge.edge_client.session import DeviceSession

RUN, ME = "r1", "pi"
COORD_KEY = new_signing_key()
DEVICE = Credentials(ME, "device", new_signing_key(), public_key_of(COORD_KEY), ME, "pw")


class FakeLink:
    """The link's interface, in memory: what the session publishes is kept; what it gets is queued."""

    def __init__(self, will):
        self.will = will
        self.address = SimpleNamespace(url="mqtt://fake:1883")
        self.on_connect_hooks: list = []
        self.subscribed: list[str] = []
        self.published: list[tuple[str, bytes, bool]] = []
        self.inbox: deque = deque()
        self.wills = [will()]  # a real Link arms its will when made, and again before each connection
        self.closed = False
        self.drained_ok = True  # False: waiting on an empty inbox fails the test (loop() would spin)

    def connect(self, timeout_s=None):  # nothing to wait for: the fake is connected at once
        self.wills.append(self.will())
        for hook in self.on_connect_hooks:
            hook()

    def subscribe(self, topic_filter):
        self.subscribed.append(topic_filter)

    def publish(self, topic_name, payload, *, retain=False, timeout_s=None):
        self.published.append((topic_name, payload, retain))

    def get(self, timeout_s):
        if self.inbox:
            return self.inbox.popleft()
        assert self.drained_ok, "the session waited on an empty inbox"
        return None

    def close(self):
        self.closed = True


class Coordinator:
    """Signs what the coordinator sends, as coordinator/service.py does."""

    def __init__(self, nonce: str, key: bytes = COORD_KEY):
        self.outbox = Outbox(Signer(key), Counter(), RUN, nonce)

    def round(self, round_idx=1, state="waiting") -> tuple[str, bytes]:
        t = topic(RUN, "round")
        return t, self.outbox.json(t, {"type": "round", "round": round_idx, "state": state})

    def plan(self, start: bytes, round_idx=1, rank=2) -> list[tuple[str, bytes]]:
        t = device_topic(RUN, ME, "down")
        meta = {"round": round_idx, "plan": {"rank": rank}, "model": "tiny-llama", "train": {}}
        return [(t, c) for c in self.outbox.chunks(t, start, kind="plan", round_idx=round_idx, device=ME,
                                                   transfer=f"plan-{round_idx}-{ME}", meta=meta, chunk_bytes=4096)]

    def ack(self, update_id: str, round_idx=1, status="accepted") -> tuple[str, bytes]:
        t = device_topic(RUN, ME, "ack")
        return t, self.outbox.json(t, {"type": "ack", "device": ME, "round": round_idx, "update_id": update_id,
                                       "status": status, "reason": ""})


def opened(t: str, payload: bytes) -> tuple[str, dict, bytes | None]:
    """(leaf, fields, data) of what the device published, checked against its public key."""
    verifier = Verifier(lambda sender: DEVICE.public_key if sender == ME else None)
    _, leaf, fields, data = read_message(verifier, ReplayGuard(), RUN, t, payload)
    return leaf, fields, data


def sent(link: FakeLink, leaf: str) -> list[tuple[dict, bytes | None, bool]]:
    return [(*opened(t, p)[1:], retain) for t, p, retain in link.published
            if p and t == device_topic(RUN, ME, leaf)]


def make(tmp_path, nonce: str | None = None, **training) -> tuple[DeviceSession, FakeLink]:
    state = DeviceState(tmp_path / "state")
    if nonce:
        state.join(nonce)  # a device that took part in run ``nonce`` before it restarted
    links = []
    s = DeviceSession(DEVICE, generate_task("add", 8, 0), DeviceProfile(name="fake", **FAST_PROFILE), state,
                      lambda will: links.append(FakeLink(will)) or links[-1], run_id=RUN,
                      training=session_mod.Training(**training))
    return s, links[0]


@pytest.fixture
def fake_training(monkeypatch):
    """run_assignment returns a 2 MB update (3 chunks on the wire) and a report; no model is loaded."""
    calls = []
    update = secrets.token_bytes(2 * 2**20)

    def run_assignment(peft_model, tokenizer, examples, meta, start, device, *, slowdown, programs, feedback=None):
        calls.append((meta, start))
        return update, {"round": meta["round"], "num_examples": len(examples), "steps": 1, "first_loss": 2.0,
                        "last_loss": 1.5, "seconds": 0.1}

    monkeypatch.setattr(session_mod, "run_assignment", run_assignment)
    monkeypatch.setattr(session_mod, "load_for_training", lambda meta, threads, device: ("model", "tokenizer"))
    return SimpleNamespace(calls=calls, update=update)


def test_after_connect_a_device_of_a_known_run_says_hello_retained_with_its_profile_and_examples(tmp_path):
    s, link = make(tmp_path, nonce="n1")
    s.connect()
    assert link.subscribed == [device_topic(RUN, ME, "down"), device_topic(RUN, ME, "ack"), topic(RUN, "round")]
    will_topic, will = link.wills[-1]
    _, status, _ = opened(will_topic, will)
    assert (status["state"], status["session"], "nonce" in status) == ("offline", s.session_id, False)
    assert s.step() is None
    [(hello, _, retain)] = sent(link, "hello")
    assert retain and hello["nonce"] == "n1" and hello["session"] == s.session_id
    assert hello["profile"] == s.profile.to_dict() and hello["examples"] == 8 and hello["domains"] == {"add": 8}
    s.step()
    assert len(sent(link, "hello")) == 1  # once per connection
    link.on_connect_hooks[0]()  # a reconnect
    s.step()
    assert len(sent(link, "hello")) == 2


def test_a_new_device_waits_for_the_round_before_it_says_hello(tmp_path):
    s, link = make(tmp_path)
    s.connect()
    s.step()
    assert link.published == []  # no run known: nothing to say hello in


def test_a_signed_round_with_a_new_nonce_makes_the_device_join_and_say_hello_again(tmp_path, capsys):
    s, link = make(tmp_path, nonce="old")
    s.state.add({"round": 1, "update_id": "a" * 32, "report": {}}, b"from the old run")
    s.connect()
    s.step()
    assert [h["nonce"] for h, _, _ in sent(link, "hello")] == ["old"]
    link.inbox.append(Coordinator("new").round())
    assert s.step() is None
    assert s.state.nonce == "new" and s.outbox.nonce == "new" and s.state.pending() == []
    assert "run 'r1' is live (nonce new); dropped 1 update(s) of an earlier run" in capsys.readouterr().out
    s.step()
    assert [h["nonce"] for h, _, _ in sent(link, "hello")] == ["old", "new"]
    assert DeviceState(tmp_path / "state").round_ctr == s.state.round_ctr  # kept on disk, for a restart


def test_a_signed_plan_is_trained_uploaded_in_chunks_and_dropped_from_disk_on_its_ack(tmp_path, fake_training,
                                                                                       capsys):
    s, link = make(tmp_path)
    coord = Coordinator("n1")
    start = secrets.token_bytes(10_000)
    link.inbox.extend([coord.round(), *coord.plan(start)])
    s.connect()
    while link.inbox:
        assert s.step() is None
    [(meta, got)] = fake_training.calls
    assert got == start and meta["plan"] == {"rank": 2}
    assert [e["type"] for e, _, _ in sent(link, "event")] == ["received"]
    chunks = sent(link, "up")
    assert len(chunks) == 3
    reasm, update = Reassembler(1 << 30), None
    for fields, data, _ in chunks:
        update = reasm.add(fields, data) or update
    assert update.data == fake_training.update and update.kind == "update" and update.round == 1
    uid = update.meta["update_id"]
    assert update.meta["report"]["last_loss"] == 1.5
    assert [p.update_id for p in s.state.pending()] == [uid] and s.state.trained == {1}
    assert "round 1: trained rank 2 in 0.1 s, loss 2.000 -> 1.500, sent 2097152 bytes" in capsys.readouterr().out

    link.inbox.extend(coord.plan(start))  # the plan again (a restarted coordinator): the held update, not retrained
    while link.inbox:
        s.step()
    assert len(fake_training.calls) == 1 and len(sent(link, "up")) == 6
    assert {f["transfer"] for f, _, _ in sent(link, "up")} == {uid}

    link.inbox.append(coord.ack(uid))
    s.step()
    assert s.state.pending() == [] and not (tmp_path / "state" / "pending" / f"{uid}.safetensors").exists()
    assert "round 1: update accepted" in capsys.readouterr().out


def test_done_ends_the_loop_with_0_and_clears_the_retained_hello_and_status(tmp_path):
    s, link = make(tmp_path)
    earlier = Coordinator("earlier").round(3, "done")  # the end of a run never joined: ignored
    coord = Coordinator("n1")  # a later coordinator: its counter starts higher (time-based)
    link.inbox.extend([earlier, coord.round(), coord.round(1, "done")])
    link.drained_ok = False
    assert s.loop() == 0
    assert link.closed and link.inbox == deque()
    assert link.published[-2:] == [(device_topic(RUN, ME, "hello"), b"", True),
                                   (device_topic(RUN, ME, "status"), b"", True)]


@pytest.mark.parametrize("error, status, reason", [
    (MemoryError(), 4, "out of memory while training round 1: MemoryError"),
    (RuntimeError("CUDA failed to allocate 2 GiB\nmore"), 4, "out of memory while training round 1: CUDA failed to "
                                                             "allocate 2 GiB"),
    (ValueError("no such module: q_proj"), None, "training failed in round 1: no such module: q_proj"),
])
def test_a_failed_training_is_reported_and_out_of_memory_ends_the_device_with_4(tmp_path, monkeypatch, error, status,
                                                                                 reason):
    def run_assignment(*a, **kw):
        raise error

    monkeypatch.setattr(session_mod, "run_assignment", run_assignment)
    monkeypatch.setattr(session_mod, "load_for_training", lambda meta, threads, device: ("model", "tokenizer"))
    s, link = make(tmp_path)
    coord = Coordinator("n1")
    link.inbox.extend([coord.round(), *coord.plan(b"x" * 100)])
    s.connect()
    results = [s.step() for _ in range(len(link.inbox))]
    assert results[-1] == status and set(results[:-1]) == {None}
    assert [(e["type"], e.get("reason")) for e, _, _ in sent(link, "event")] == [("received", None),
                                                                                 ("failure", reason)]
    assert sent(link, "up") == [] and s.state.pending() == []


def test_forged_garbled_replayed_or_foreign_messages_are_logged_and_ignored(tmp_path, fake_training, capsys):
    s, link = make(tmp_path)
    coord, forger = Coordinator("n1"), Coordinator("n1", key=new_signing_key())
    older, round_msg = coord.round(), coord.round()
    plan = coord.plan(b"y" * 9000)
    t_down = device_topic(RUN, ME, "down")
    bad = [
        forger.round(),                                            # signed by someone else
        (topic(RUN, "round"), b"\x00garbage"),                     # not a signed message at all
        (t_down, plan[0][1][:-1] + bytes([plan[0][1][-1] ^ 1])),   # a chunk altered on the way
        Coordinator("n2").ack("b" * 32),                           # an ack for another run
        (device_topic(RUN, "other", "down"), plan[0][1]),          # a topic the signature is not for
        ("elsewhere/x", b"hello"),                                 # not a topic of this run
    ]
    bad.append(older)                                              # replayed: its counter is below the last seen
    link.inbox.extend([round_msg, *bad, round_msg, *plan])        # the same one again (retained, redelivered): fine
    s.connect()
    while link.inbox:
        assert s.step() is None
    out = capsys.readouterr().out
    assert out.count("ignored a message on") == len(bad) and "replayed or out-of-date" in out
    assert len(fake_training.calls) == 1 and s.state.nonce == "n1"  # the genuine messages still worked


def test_a_devices_secure_aggregation_state_is_kept_for_its_current_round_and_run_only(tmp_path):
    from fedlora_edge.core.secagg import DeviceSecAgg

    s, _ = make(tmp_path, nonce="a" * 32)
    for r in (1, 2, 3):
        s.secagg[r] = DeviceSecAgg(s.me, f"{'a' * 32}|{r}".encode())
        s.sa_vector[r] = (b"", {}, {})
        s.sa_ready.add(r)
    s.forget_secure_rounds(before=3)  # a plan for round 3 ends the exchanges of rounds 1 and 2
    assert list(s.secagg) == [3] and list(s.sa_vector) == [3] and s.sa_ready == {3}
    s.join("b" * 32)  # a new run: no key exchange of the old one may be reused in its round 3
    assert not s.secagg and not s.sa_vector and not s.sa_ready
