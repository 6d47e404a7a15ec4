"""State on disk: atomic snapshots with checksums and fall-back, the round journal, a device's state."""

import hashlib
import json
import uuid

import pytest

from fedlora_edge.coordinator.runstate import RoundJournal, SnapshotStore, StateError
from fedlora_edge.core import durable
from fedlora_edge.edge_client.device_state import DeviceState


def test_a_snapshot_is_whole_or_absent_and_the_last_two_are_kept(tmp_path):
    store = SnapshotStore(tmp_path, log=lambda *_: None)
    for n in range(4):
        store.write(n, {"run.json": json.dumps({"n": n}).encode(), "personal/a.safetensors": bytes([n]) * 10})
    assert store.numbers() == [2, 3]
    n, files = store.load()
    assert n == 3 and json.loads(files["run.json"]) == {"n": 3} and files["personal/a.safetensors"] == b"\3" * 10
    (tmp_path / "snap-000004.tmp-123").mkdir()  # a crash mid-write leaves a .tmp folder: never loaded
    assert store.load()[0] == 3


def test_a_torn_snapshot_is_named_and_the_one_before_is_used(tmp_path):
    said = []
    store = SnapshotStore(tmp_path, log=said.append)
    store.write(1, {"run.json": b'{"n": 1}', "global.safetensors": b"a" * 100})
    store.write(2, {"run.json": b'{"n": 2}', "global.safetensors": b"b" * 100})
    (tmp_path / "snap-000002" / "global.safetensors").write_bytes(b"b" * 50)  # truncated on disk
    n, files = store.load()
    assert n == 1 and files["global.safetensors"] == b"a" * 100
    assert any("snap-000002/global.safetensors: fails its checksum" in s for s in said)
    (tmp_path / "snap-000001" / "manifest.json").write_text("")  # empty manifest: unusable too
    with pytest.raises(StateError, match="no usable state snapshot"):
        store.load()
    assert SnapshotStore(tmp_path / "empty").load() is None


class _A:  # the fields of an Assignment the journal stores
    def __init__(self, client):
        self.client, self.meta, self.start, self.start_tensor_bytes = client, {"plan": {}, "round": 3}, b"s" * 8, 8


def test_the_journal_reopens_a_round_with_what_was_accepted(tmp_path):
    j = RoundJournal(tmp_path, log=lambda *_: None)
    j.open(3, "nonce", [_A("a"), _A("b")], [{"client": "c", "reason": "too small"}])
    j.accept(3, "a", "u1", b"update-a", {"num_examples": 4})
    j.fail(3, "b", "out of memory")
    jr = j.load(3)
    assert jr.nonce == "nonce" and jr.clients == ["a", "b"] and jr.skipped[0]["client"] == "c"
    assert jr.updates == {"a": ("u1", b"update-a", {"num_examples": 4})} and jr.failures == {"b": "out of memory"}
    j.accept(3, "b", "u2", b"update-b", {"num_examples": 2})
    assert j.read_update(3, "b") == ("u2", b"update-b", {"num_examples": 2})
    assert RoundJournal(tmp_path, log=lambda *_: None).read_update(3, "a")[0] == "u1"  # found by a scan, too
    j.close()
    f = tmp_path / "round-000003" / "updates.log"
    good = f.read_bytes()
    raw = bytearray(good)
    raw[30] ^= 0xFF  # a's record corrupt, its framing intact: left out, b's after it still read
    f.write_bytes(bytes(raw))
    assert j.load(3).updates == {"b": ("u2", b"update-b", {"num_examples": 2})}
    f.write_bytes(good[:-2])  # b's record torn (a crash mid-append): left out, it was never acknowledged
    assert j.load(3).updates == {"a": ("u1", b"update-a", {"num_examples": 4})}
    assert j.load(4) is None
    j.prune(4)
    assert j.load(3) is None


@pytest.mark.parametrize("damage", ["start blob missing", "start blob altered", "assign.json lacks a device",
                                    "open.json without clients"])
def test_a_damaged_journal_is_a_warning_and_a_replan_never_a_crash(tmp_path, damage):
    said: list[str] = []
    j = RoundJournal(tmp_path, log=said.append)
    j.open(2, "nonce", [_A("a"), _A("b")], [])
    j.accept(2, "a", "u1", b"update-a", {"num_examples": 4})
    j.close()
    d = tmp_path / "round-000002"
    blob = next(d.glob("start-*.safetensors"))
    if damage == "start blob missing":
        blob.unlink()
    elif damage == "start blob altered":
        blob.write_bytes(b"x" * 8)
    elif damage == "assign.json lacks a device":
        index = json.loads((d / "assign.json").read_text())
        del index["b"]
        (d / "assign.json").write_text(json.dumps(index))
    else:
        info = json.loads((d / "open.json").read_text())
        del info["clients"]
        (d / "open.json").write_text(json.dumps(info))
    assert j.load(2) is None  # the round is planned again
    assert any("journal of round 2 is damaged" in line and "planned again" in line for line in said), said


def test_durable_writes_leave_the_old_file_until_the_new_one_is_complete(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    durable.write_json(path, {"v": 1})

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "fsync", full)
    with pytest.raises(OSError):
        durable.write_json(path, {"v": 2})
    assert durable.read_json(path) == {"v": 1} and not list(tmp_path.glob("*.tmp-*"))


def test_a_device_sets_torn_state_aside_instead_of_crash_looping(tmp_path):
    logs = []
    s = DeviceState(tmp_path, log=logs.append)
    s.join("n1")
    uid = uuid.uuid4().hex
    s.add({"round": 1, "update_id": uid, "report": {}}, b"data")
    assert [p.update_id for p in s.pending()] == [uid] and s.trained == {1}
    (tmp_path / "state.json").write_text('{"nonce": "n1", "trai')  # torn
    (tmp_path / "pending" / f"{uid}.json").write_text("{")
    s2 = DeviceState(tmp_path, log=logs.append)
    assert s2.nonce is None and s2.pending() == []
    assert list(tmp_path.glob("state.json.corrupt-*")) and list((tmp_path / "pending").glob("*.corrupt-*"))
    assert any("unreadable" in m for m in logs)


def test_a_new_run_drops_the_updates_of_the_old_one(tmp_path):
    s = DeviceState(tmp_path, log=lambda *_: None)
    s.join("old")
    uid = uuid.uuid4().hex
    s.add({"round": 2, "update_id": uid, "report": {}}, b"x")
    assert s.join("old") == 0 and s.join("new") == 1
    assert s.pending() == [] and s.trained == set() and DeviceState(tmp_path).nonce == "new"
    assert not s.drop("../../etc/passwd")  # an id this device never makes touches nothing
    data = b"payload"
    uid = uuid.uuid4().hex
    s.add({"round": 1, "update_id": uid, "report": {}}, data)
    meta = json.loads((tmp_path / "pending" / f"{uid}.json").read_text())
    assert meta["sha256"] == hashlib.sha256(data).hexdigest() and meta["nonce"] == "new"
