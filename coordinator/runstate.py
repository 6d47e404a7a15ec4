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
  devices, skipped ones) and each assignment exactly as sent (``assign-<client>.json`` and
  ``.safetensors``), then every update the coordinator accepted (``update-<client>.bin``: a JSON
  header with its report and sha256, then its bytes, written and fsynced *before* the device's ack
  goes out) and every failure a device reported.  A resumed coordinator re-opens the round from it,
  keeping what it had accepted.  The journal of round N is kept until snapshot N+1 exists, so a
  fall-back to snapshot N-1 can re-close round N from the same updates.

Every write goes through :mod:`edge_client.durable` (tmp file, fsync, rename, fsync of the folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edge_client import durable
from edge_client.lora import Factors

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
        manifest = {"snapshot": number, "files": {}}
        for name, data in sorted(files.items()):
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        from .faults import crash_point

        crash_point("state-write")  # a test kills the process here: the snapshot is half-written
        durable.write_json(tmp / MANIFEST, manifest)
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


class RoundJournal:
    """``round-NNNNNN`` directories under ``folder`` (see the module text)."""

    def __init__(self, folder: str | Path, log=print):
        self.folder = Path(folder)
        self.log = log

    def _dir(self, round_idx: int) -> Path:
        return self.folder / f"round-{round_idx:06d}"

    def open(self, round_idx: int, nonce: str, assignments, skipped: list[dict]) -> None:
        """Record round ``round_idx``'s assignments (``open.json`` last: its presence commits them)."""
        d = self._dir(round_idx)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for a in assignments:
            durable.write_bytes(d / f"assign-{a.client}.safetensors", a.start)
            durable.write_json(d / f"assign-{a.client}.json", {
                "meta": a.meta, "sha256": hashlib.sha256(a.start).hexdigest(), "tensor_bytes": a.start_tensor_bytes})
        durable.write_json(d / "open.json", {"round": round_idx, "nonce": nonce,
                                             "clients": [a.client for a in assignments], "skipped": skipped})

    def accept(self, round_idx: int, client: str, update_id: str, data: bytes, report: dict) -> None:
        """Make an accepted update durable (one file: a JSON header with its sha256, then its bytes,
        written and fsynced in one step); only then may it be acknowledged."""
        head = json.dumps({"update_id": update_id, "report": report, "sha256": hashlib.sha256(data).hexdigest(),
                           "bytes": len(data)}).encode()
        durable.write_bytes(self._dir(round_idx) / f"update-{client}.bin", len(head).to_bytes(4, "big") + head + data)

    def fail(self, round_idx: int, client: str, reason: str) -> None:
        durable.write_json(self._dir(round_idx) / f"failure-{client}.json", {"reason": reason})

    def load(self, round_idx: int) -> JournalRound | None:
        """The journal of round ``round_idx``, or None when it was never opened (or opened only in
        part: nothing of it was sent).  An update file that does not verify is left out with a
        warning: it was never acknowledged, so its device still holds it and sends it again."""
        d = self._dir(round_idx)
        try:
            info = durable.read_json(d / "open.json")
        except FileNotFoundError:
            return None
        except durable.CorruptFile as exc:
            self.log(f"warning: {exc}; the round is planned again")
            return None
        assignments = {}
        for client in info["clients"]:
            meta = durable.read_json(d / f"assign-{client}.json")
            start = (d / f"assign-{client}.safetensors").read_bytes()
            if hashlib.sha256(start).hexdigest() != meta["sha256"]:
                raise StateError(f"{d / f'assign-{client}.safetensors'}: fails its checksum")
            assignments[client] = (meta["meta"], start, int(meta["tensor_bytes"]))
        jr = JournalRound(round_idx, info["nonce"], list(info["clients"]), list(info["skipped"]), assignments)
        for client in info["clients"]:
            if (d / f"update-{client}.bin").is_file():
                try:
                    jr.updates[client] = self.read_update(round_idx, client)
                except (OSError, KeyError, TypeError, ValueError, durable.CorruptFile) as exc:
                    self.log(f"warning: accepted update of {client} in round {round_idx} is unreadable ({exc}); "
                             "it is taken again when the device re-sends it")
            fail_file = d / f"failure-{client}.json"
            if client not in jr.updates and fail_file.is_file():
                try:
                    jr.failures[client] = str(durable.read_json(fail_file)["reason"])
                except (KeyError, durable.CorruptFile):
                    pass
        return jr

    def read_update(self, round_idx: int, client: str) -> tuple[str, bytes, dict]:
        """``(update id, bytes, report)`` of an accepted update, checked against its sha256 (OSError,
        ValueError or CorruptFile when it does not read)."""
        path = self._dir(round_idx) / f"update-{client}.bin"
        raw = path.read_bytes()
        n = int.from_bytes(raw[:4], "big")
        meta, data = json.loads(raw[4:4 + n]), raw[4 + n:]
        if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise durable.CorruptFile(f"{path}: fails its checksum")
        return str(meta["update_id"]), data, dict(meta["report"])

    def prune(self, completed: int) -> None:
        """Drop journals of rounds before ``completed`` (round ``completed`` stays for a fall-back)."""
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
    from edge_client.lora import to_state_dict
    from edge_client.wire import encode_tensors

    ms = state.method_state
    run = {"method": cfg.method, "model": cfg.model, "seed": cfg.seed, "nonce": nonce,
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
    from edge_client.lora import from_state_dict
    from edge_client.wire import decode_tensors

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
