"""What a device keeps on disk between restarts (``--state-dir``), crash-safely.

- ``state.json``: the run it takes part in (its nonce), the rounds it trained in that run, and
  the highest counter it accepted on the run's ``round`` topic (so a replayed, older round
  message is refused even after a restart);
- ``pending/<update id>.safetensors`` and ``.json``: each update it produced and the coordinator
  has not acknowledged yet (the ``.json``, written last, carries the update's sha256);
- ``counter``: the floor of its message counter (:class:`fedlora_edge.core.identity.Counter`);
- ``programs/``: ExecuTorch training programs it received.

Every write is crash-safe (:mod:`fedlora_edge.core.durable`).  A torn or corrupt file is set aside with
a warning that names it, never a crash loop; what it held is then treated as absent (an update
lost that way was never acknowledged, so the round simply misses it).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fedlora_edge.core import durable

UPDATE_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex


@dataclass(frozen=True)
class Pending:
    update_id: str
    round: int
    nonce: str
    meta: dict   # as sent: round, update_id, report
    data_file: Path

    def data(self) -> bytes:
        return self.data_file.read_bytes()


class DeviceState:
    def __init__(self, folder: str | Path, log=print):
        self.folder = Path(folder)
        self.log = log
        self.pending_dir = self.folder / "pending"
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        durable.remove_tmp(self.folder)
        durable.remove_tmp(self.pending_dir)
        self.nonce: str | None = None
        self.trained: set[int] = set()
        self.round_ctr: int | None = None
        path = self.folder / "state.json"
        if path.is_file():
            try:
                obj = durable.read_json(path)
                self.nonce = obj.get("nonce") if isinstance(obj.get("nonce"), str) else None
                self.trained = {int(r) for r in obj.get("trained", [])}
                self.round_ctr = obj.get("round_ctr") if isinstance(obj.get("round_ctr"), int) else None
            except (durable.CorruptFile, TypeError, ValueError) as exc:
                durable.set_aside(path, log, str(exc))
                self.nonce, self.trained, self.round_ctr = None, set(), None

    def save(self) -> None:
        durable.write_json(self.folder / "state.json", {"nonce": self.nonce, "trained": sorted(self.trained),
                                                        "round_ctr": self.round_ctr})

    def join(self, nonce: str) -> int:
        """Take part in the run ``nonce``: a different run's trained rounds and unacknowledged
        updates no longer count.  Returns how many pending updates were dropped."""
        if nonce == self.nonce:
            return 0
        dropped = 0
        for p in self.pending():
            if p.nonce != nonce:
                self.drop(p.update_id)
                dropped += 1
        self.nonce, self.trained = nonce, set()
        self.save()
        return dropped

    # ------------------------------------------------------------------------------ updates

    def add(self, meta: dict, data: bytes) -> None:
        """Make an update durable before it is sent (data first; the meta, with its checksum, commits it)."""
        uid = meta["update_id"]
        durable.write_bytes(self.pending_dir / f"{uid}.safetensors", data)
        durable.write_json(self.pending_dir / f"{uid}.json", {"meta": meta, "nonce": self.nonce,
                                                              "sha256": hashlib.sha256(data).hexdigest()})
        self.trained.add(int(meta["round"]))
        self.save()

    def pending(self) -> list[Pending]:
        out = []
        for f in sorted(self.pending_dir.glob("*.json")):
            data_file = f.with_suffix(".safetensors")
            try:
                obj = durable.read_json(f)
                meta, nonce = obj["meta"], obj["nonce"]
                if not data_file.is_file() or hashlib.sha256(data_file.read_bytes()).hexdigest() != obj["sha256"]:
                    raise durable.CorruptFile(f"{data_file}: missing or fails its checksum")
                out.append(Pending(str(meta["update_id"]), int(meta["round"]), str(nonce), meta, data_file))
            except (durable.CorruptFile, KeyError, TypeError, ValueError) as exc:
                durable.set_aside(f, self.log, str(exc))
                if data_file.is_file():
                    durable.set_aside(data_file, self.log, "its metadata was unreadable")
        for orphan in self.pending_dir.glob("*.safetensors"):  # written, but the crash came before its meta
            if not orphan.with_suffix(".json").exists():
                orphan.unlink(missing_ok=True)
        return out

    def drop(self, update_id: str) -> bool:
        """Forget an update (acknowledged, or of a finished run); True if it was held."""
        if not isinstance(update_id, str) or not UPDATE_ID.fullmatch(update_id):
            return False  # not an id this device makes: nothing of it on disk
        held = False
        for suffix in (".json", ".safetensors"):
            f = self.pending_dir / f"{update_id}{suffix}"
            if f.exists():
                f.unlink()
                held = True
        return held

    def drop_all(self) -> int:
        n = 0
        for p in self.pending():
            n += self.drop(p.update_id)
        return n
