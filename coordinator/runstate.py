"""A run's state on disk, crash-consistent: snapshots after each round, and the open round's journal.

``OUT/state/`` holds

- ``snap-NNNNNN/``: the state after round N (N = 0 is the state before round 1): ``run.json``
  (config identity, nonce, round records, base accuracy, method state), ``global.safetensors``,
  ``personal/<client>.safetensors``, ``method.safetensors``, and ``manifest.json`` with the
  sha256 and size of every other file.  A snapshot is written into a fresh ``.tmp`` directory,
  every file fsynced, the manifest last, then renamed into place in one atomic step; the last two
  are kept.  Loading takes the newest snapshot whose manifest verifies; a torn or corrupt one is
  named and skipped, and the one before it is used.
- ``round-NNNNNN/``: the journal of round N while it is open: ``open.json`` (its nonce, sampled
  devices, skipped ones) and each assignment exactly as sent (``assign.json``: per device its meta
  and the sha256 of its start blob, ``start-<sha256>.safetensors`` once per distinct blob), then
  every update the coordinator accepted, appended to ``updates.log`` (per record: a magic, the
  lengths, a JSON header with the device, its report and sha256, then its bytes), fsynced *before*
  the device's ack goes out (updates arriving together share one fsync: a group commit), and
  every failure a device reported.  A resumed coordinator re-opens the round from it,
  keeping what it had accepted.  The journal of round N is kept until snapshot N+1 exists, so a
  fall-back to snapshot N-1 can re-close round N from the same updates.

Every write goes through :mod:`fedlora_edge.core.durable` (tmp file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fedlora_edge.core import durable
from fedlora_edge.core.lora import Factors

MANIFEST = "manifest.json"
_SNAP = re.compile(r"^snap-(\d{6})$")
_ROUND = re.compile(r"^round-(\d{6})$")


class StateError(ValueError):
    """No usable state: the text names what was looked at and what was wrong with it."""


def _fsync_tree(folder: Path) -> None:
    for d, _, _ in os.walk(folder):
        durable.fsync_dir(d)


class SnapshotStore:
    """``snap-NNNNNN`` directories under ``folder`` (see the module text)."""

    def __init__(self, folder: str | Path, log=print, keep: int = 2):
        self.folder = Path(folder)
        self.log = log
        self.keep = keep

    def numbers(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _SNAP.match(p.name)) and p.is_dir())

    def write(self, number: int, files: dict[str, bytes]) -> Path:
        """Make ``files`` (relative name -> bytes) snapshot ``number``, atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"snap-{number:06d}"
        tmp = self.folder / f"snap-{number:06d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        listing: dict[str, dict] = {}  # name -> its sha256 and size
        for name, data in sorted(files.items()):
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            listing[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        from .faults import crash_point

        crash_point("state-write")  # a test kills the process here: the snapshot is half-written
        durable.write_json(tmp / MANIFEST, {"snapshot": number, "files": listing})
        _fsync_tree(tmp)
        if final.exists():  # the same round written again (a resumed run): replace it
            old = self.folder / f"{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        durable.fsync_dir(self.folder)
        self._prune(number)
        return final

    def _prune(self, newest: int) -> None:
        kept = [n for n in self.numbers() if n <= newest][-self.keep:]
        for n in self.numbers():
            if n not in kept and n < newest:
                shutil.rmtree(self.folder / f"snap-{n:06d}", ignore_errors=True)
        for p in self.folder.glob("snap-*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def verify(self, number: int) -> dict[str, bytes]:
        """The files of snapshot ``number``; StateError naming the first that is missing or torn."""
        folder = self.folder / f"snap-{number:06d}"
        try:
            manifest = durable.read_json(folder / MANIFEST)
            entries = manifest["files"]
        except (OSError, durable.CorruptFile, KeyError, TypeError) as exc:
            raise StateError(f"{folder}: no readable {MANIFEST} ({exc})") from None
        files = {}
        for name, e in entries.items():
            path = folder / name
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise StateError(f"{path}: missing ({exc.strerror})") from None
            if not isinstance(e, dict) or len(data) != e.get("bytes") or hashlib.sha256(data).hexdigest() != e.get("sha256"):
                raise StateError(f"{path}: fails its checksum (torn or corrupt: {len(data)} bytes)")
            files[name] = data
        return files

    def load(self) -> tuple[int, dict[str, bytes]] | None:
        """(number, files) of the newest snapshot that verifies, falling back past broken ones with a
        message; None when there is no snapshot at all; StateError when every one is broken."""
        numbers = self.numbers()
        problems = []
        for n in reversed(numbers):
            try:
                files = self.verify(n)
            except StateError as exc:
                problems.append(str(exc))
                self.log(f"warning: state snapshot {n} is unusable: {exc}; trying an older one")
                continue
            if problems:
                self.log(f"resuming from snapshot {n} (after round {n}); the newer one(s) were unusable")
            return n, files
        if problems:
            raise StateError("no usable state snapshot: " + "; ".join(problems))
        return None


@dataclass
class JournalRound:
    """What the journal of one open round holds."""

    round: int
    nonce: str
    clients: list[str]
    skipped: list[dict]
    assignments: dict[str, tuple[dict, bytes, int]]   # client -> (meta, start bytes, start tensor bytes)
    updates: dict[str, tuple[str, bytes, dict]] = field(default_factory=dict)  # client -> (update id, bytes, report)
    failures: dict[str, str] = field(default_factory=dict)  # client -> reason
    exact: dict[str, bytes] = field(default_factory=dict)  # client -> its plan's exact start (buffered rounds)


class RoundJournal:
    """``round-NNNNNN`` directories under ``folder`` (see the module text)."""

    LOG = "updates.log"
    MAGIC = b"FLU1"

    def __init__(self, folder: str | Path, log=print):
        self.folder = Path(folder)
        self.log = log
        self._fh: BinaryIO | None = None  # the open round's update log, appended to
        self._fh_round: int | None = None
        self._index: dict[tuple[int, str], tuple[int, int]] = {}  # (round, client) -> (offset, length) of its record
        self._dirty = False
        self._open: tuple[int, dict, dict] | None = None  # (round, open.json, assign.json) of the round opened last

    def _dir(self, round_idx: int) -> Path:
        return self.folder / f"round-{round_idx:06d}"

    def open(self, round_idx: int, nonce: str, assignments, skipped: list[dict],
             exact: dict[str, dict] | None = None) -> None:
        """Record round ``round_idx``'s assignments (``open.json`` last: its presence commits them).
        A start blob that several devices share (every FedIT device starts from the same global
        adapter) is stored once.  ``exact``: client -> the exact start tensors its plan was made
        from, kept beside the blob sent (a buffered round's plans: made on earlier versions)."""
        self.close()
        d = self._dir(round_idx)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        self._open = (round_idx, {"round": round_idx, "nonce": nonce, "clients": [], "skipped": []}, {})
        self.add(round_idx, assignments, skipped, exact)

    def add(self, round_idx: int, assignments, skipped: Sequence[dict] = (), exact: dict[str, dict] | None = None) -> None:
        """Add assignments (and skipped devices) to the open round ``round_idx`` (buffered rounds hand
        plans out one by one): their blobs first, then ``assign.json`` and ``open.json`` rewritten whole."""
        from fedlora_edge.core.wire import encode_tensors

        if self._open is None or self._open[0] != round_idx:
            raise StateError(f"the journal of round {round_idx} is not the open one")
        d, (_, info, index) = self._dir(round_idx), self._open
        have = {("start", e["sha256"]) for e in index.values()} | {("exact", e.get("exact")) for e in index.values()}

        def blob(prefix: str, data: bytes) -> str:
            sha = hashlib.sha256(data).hexdigest()
            if (prefix, sha) not in have:
                durable.write_bytes(d / f"{prefix}-{sha}.safetensors", data)
                have.add((prefix, sha))
            return sha

        for a in assignments:
            index[a.client] = {"meta": a.meta, "sha256": blob("start", a.start), "tensor_bytes": a.start_tensor_bytes}
            if exact and a.client in exact:
                index[a.client]["exact"] = blob("exact", encode_tensors(exact[a.client], {"format": "pt"}))
            if a.client not in info["clients"]:
                info["clients"].append(a.client)
        info["skipped"].extend(skipped)
        durable.write_json(d / "assign.json", index)
        durable.write_json(d / "open.json", info)

    def accept(self, round_idx: int, client: str, update_id: str, data: bytes, report: dict,
               sync: bool = True) -> None:
        """Append an accepted update to the round's log (a JSON header with its sha256, then its
        bytes).  It may be acknowledged only once it is on disk: with ``sync`` (the default) this
        returns after an fsync; otherwise the caller calls :meth:`sync` before it sends the acks
        (one fsync for a batch of updates: a group commit)."""
        head = json.dumps({"client": client, "update_id": update_id, "report": report,
                           "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}).encode()
        if self._fh is None or self._fh_round != round_idx:
            self.close()
            path = self._dir(round_idx) / self.LOG
            self._fh = open(path, "ab")
            self._fh_round = round_idx
            durable.fsync_dir(path.parent)  # the log's own name is on disk
        offset = self._fh.tell()
        record = self.MAGIC + len(head).to_bytes(4, "big") + len(data).to_bytes(8, "big") + head + data
        try:
            self._fh.write(record)
            self._fh.flush()
        except OSError:
            self._fh.truncate(offset)  # no half record stays behind a full disk
            raise
        self._index[(round_idx, client)] = (offset, len(record))
        self._dirty = True
        if sync:
            self.sync()

    def sync(self) -> None:
        """fsync the update log: every update appended so far is on disk."""
        if self._fh is not None and self._dirty:
            os.fsync(self._fh.fileno())
            self._dirty = False

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None

    def fail(self, round_idx: int, client: str, reason: str) -> None:
        durable.write_json(self._dir(round_idx) / f"failure-{client}.json", {"reason": reason})

    def read_update(self, round_idx: int, client: str) -> tuple[str, bytes, dict]:
        """``(update id, bytes, report)`` of an accepted update, checked against its sha256 (OSError,
        KeyError, ValueError or CorruptFile when it does not read)."""
        where = self._index.get((round_idx, client))
        if where is None:
            for c, got in self._records(round_idx):
                if c == client:
                    return got
            raise KeyError(f"no accepted update of {client} in the journal of round {round_idx}")
        with open(self._dir(round_idx) / self.LOG, "rb") as fh:
            fh.seek(where[0])
            _, got = self._parse(fh.read(where[1]), 0)
        if got is None or got[3] != client:
            raise durable.CorruptFile(f"{self._dir(round_idx) / self.LOG}: the update of {client} fails its checksum")
        return got[:3]

    def _parse(self, raw: bytes, at: int) -> tuple[int, tuple[str, bytes, dict, str] | None]:
        """(offset of the next record, this record's (update id, bytes, report, client) or None if it
        fails its checksum); CorruptFile where the record cannot even be framed (a torn tail)."""
        if raw[at:at + 4] != self.MAGIC or len(raw) < at + 16:
            raise durable.CorruptFile(f"no update record at offset {at}")
        n_head, n_data = int.from_bytes(raw[at + 4:at + 8], "big"), int.from_bytes(raw[at + 8:at + 16], "big")
        end = at + 16 + n_head + n_data
        if end > len(raw):
            raise durable.CorruptFile(f"the update record at offset {at} is torn ({len(raw) - at} of {end - at} bytes)")
        try:
            meta = json.loads(raw[at + 16:at + 16 + n_head])
            data = raw[at + 16 + n_head:end]
            if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                return end, None
            return end, (str(meta["update_id"]), data, dict(meta["report"]), str(meta["client"]))
        except (ValueError, KeyError, TypeError):
            return end, None

    def _records(self, round_idx: int):
        """(client, (update id, bytes, report)) of every update record that verifies, in order; a
        record that fails its checksum or a torn tail is left out with a warning: it was never
        acknowledged, so its device still holds it and sends it again."""
        path = self._dir(round_idx) / self.LOG
        if not path.is_file():
            return
        raw, at = path.read_bytes(), 0
        while at < len(raw):
            try:
                nxt, got = self._parse(raw, at)
            except durable.CorruptFile as exc:
                self.log(f"warning: {path}: {exc}; what it held is taken again when the devices re-send it")
                return
            if got is None:
                self.log(f"warning: {path}: the update record at offset {at} fails its checksum; it is taken again "
                         "when its device re-sends it")
            else:
                yield got[3], got[:3]
            at = nxt

    def load(self, round_idx: int) -> JournalRound | None:
        """The journal of round ``round_idx``, or None when it was never opened (or opened only in
        part: nothing of it was sent), or when what records its assignments is damaged (a file
        missing, torn or failing its checksum): then a warning says which, and the round is planned
        again.  An update that does not verify is left out with a warning: it was never
        acknowledged, so its device still holds it and sends it again."""
        d = self._dir(round_idx)
        try:
            info = durable.read_json(d / "open.json")
        except FileNotFoundError:
            return None
        except durable.CorruptFile as exc:
            self.log(f"warning: {exc}; the round is planned again")
            return None
        try:
            index = durable.read_json(d / "assign.json")
        except (FileNotFoundError, durable.CorruptFile) as exc:
            self.log(f"warning: the journal of round {round_idx} has no readable assign.json ({exc}); the round is "
                     "planned again")
            return None
        try:
            jr = self._assignments(d, round_idx, info, index)
        except (OSError, KeyError, TypeError, ValueError, StateError) as exc:
            what = exc.filename if isinstance(exc, OSError) and exc.filename else exc
            self.log(f"warning: the journal of round {round_idx} is damaged ({type(exc).__name__}: {what}); the round "
                     "is planned again")
            return None
        self._open = (round_idx, info, index)  # a resumed round may be handed more plans (buffered rounds)
        for client, got in self._records(round_idx):
            if client in jr.assignments and client not in jr.updates:
                jr.updates[client] = got
        for client in info["clients"]:
            fail_file = d / f"failure-{client}.json"
            if client not in jr.updates and fail_file.is_file():
                try:
                    jr.failures[client] = str(durable.read_json(fail_file)["reason"])
                except (KeyError, durable.CorruptFile):
                    pass
        return jr

    @staticmethod
    def _assignments(d: Path, round_idx: int, info: dict, index: dict) -> JournalRound:
        """The round's assignments from ``open.json`` and ``assign.json``, each start blob read and
        checked against its sha256 (OSError, KeyError, TypeError, ValueError or StateError when not)."""
        assignments, blobs = {}, {}
        for client in info["clients"]:
            e = index[client]
            if e["sha256"] not in blobs:
                path = d / f"start-{e['sha256']}.safetensors"
                start = path.read_bytes()
                if hashlib.sha256(start).hexdigest() != e["sha256"]:
                    raise StateError(f"{path}: fails its checksum")
                blobs[e["sha256"]] = start
            assignments[client] = (e["meta"], blobs[e["sha256"]], int(e["tensor_bytes"]))
        exact = {}
        for client in info["clients"]:
            sha = index[client].get("exact")
            if sha is not None:
                path = d / f"exact-{sha}.safetensors"
                exact[client] = path.read_bytes()
                if hashlib.sha256(exact[client]).hexdigest() != sha:
                    raise StateError(f"{path}: fails its checksum")
        return JournalRound(round_idx, str(info["nonce"]), list(info["clients"]), list(info["skipped"]), assignments,
                            exact=exact)

    def prune(self, completed: int) -> None:
        """Drop journals of rounds before ``completed`` (round ``completed`` stays for a fall-back)."""
        if self._fh_round is not None and self._fh_round < completed:
            self.close()
        self._index = {k: v for k, v in self._index.items() if k[0] >= completed}
        if not self.folder.is_dir():
            return
        for p in self.folder.iterdir():
            m = _ROUND.match(p.name)
            if m and int(m.group(1)) < completed:
                shutil.rmtree(p, ignore_errors=True)


@dataclass
class RunState:
    """Everything a run carries from round to round."""

    global_factors: Factors
    # JSON-able values, plus "personal" (client -> factors) and "tensors" (name -> tensor), saved as safetensors
    method_state: dict = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)


def snapshot_files(cfg, nonce: str, state: RunState, base_accuracy: dict | None) -> dict[str, bytes]:
    """The files of a snapshot: ``run.json`` (config identity, nonce, round records, base accuracy,
    the method's JSON state), the global adapter, per-client adapters (peft's keys) and the method's
    own tensors."""
    from fedlora_edge.core.lora import to_state_dict
    from fedlora_edge.core.wire import encode_tensors

    ms = state.method_state
    run = {"method": cfg.method, "model": cfg.model, "seed": cfg.seed, "schedule": cfg.schedule.mode, "nonce": nonce,
           "completed_round": len(state.rounds), "rounds": state.rounds, "base_accuracy": base_accuracy,
           "method_state": {k: v for k, v in ms.items() if k not in ("personal", "tensors")}}
    files = {"run.json": json.dumps(run, indent=1).encode(),
             "global.safetensors": encode_tensors(to_state_dict(state.global_factors), {"format": "pt"})}
    for cid, f in ms.get("personal", {}).items():
        files[f"personal/{cid}.safetensors"] = encode_tensors(to_state_dict(f), {"format": "pt"})
    if ms.get("tensors"):
        files["method.safetensors"] = encode_tensors(ms["tensors"], {"format": "pt"})
    return files


def restore(store: SnapshotStore, cfg) -> tuple[RunState, str, dict | None, int]:
    """(state, nonce, base accuracy, last completed round) of the newest usable snapshot; ConfigError
    naming what is wrong when there is none or it is another run's."""
    from fedlora_edge.core.lora import from_state_dict
    from fedlora_edge.core.wire import decode_tensors

    from .errors import ConfigError

    try:
        loaded = store.load()
    except StateError as exc:
        raise ConfigError(f"--resume: {exc}") from None
    if loaded is None:
        raise ConfigError(f"--resume: no saved run state in {store.folder}")
    _, files = loaded
    try:
        saved = json.loads(files["run.json"])
        for key in ("method", "model", "seed"):
            if saved[key] != getattr(cfg, key):
                raise ConfigError(f"--resume: the saved run has {key}={saved[key]!r}, the config says "
                                  f"{getattr(cfg, key)!r}")
        if saved.get("schedule", "sync") != cfg.schedule.mode:  # its journal holds rounds, or versions
            raise ConfigError(f"--resume: the saved run has schedule.mode={saved.get('schedule', 'sync')!r}, the "
                              f"config says {cfg.schedule.mode!r}")
        state = RunState(from_state_dict(decode_tensors(files["global.safetensors"])), dict(saved["method_state"]),
                         saved["rounds"])
        personal = {name[len("personal/"):-len(".safetensors")]: from_state_dict(decode_tensors(data))
                    for name, data in files.items() if name.startswith("personal/")}
        if personal:
            state.method_state["personal"] = personal
        if "method.safetensors" in files:
            state.method_state["tensors"] = dict(decode_tensors(files["method.safetensors"]))
        return state, str(saved["nonce"]), saved.get("base_accuracy"), int(saved["completed_round"])
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--resume: the saved state in {store.folder} is not one this version "
                          f"reads ({type(exc).__name__}: {exc})") from None
