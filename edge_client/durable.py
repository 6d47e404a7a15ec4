"""Files that survive a crash: written new, fsynced, then swapped in by a rename.

Every piece of state a process keeps across a restart (the coordinator's run state and round
journal, a device's pending updates and run state, credentials) goes through these helpers, so
a SIGKILL or a power cut at any instant leaves either the old file or the new one, never a torn
mix and never neither:

1. write the new bytes to ``<name>.tmp-<pid>`` in the same directory and ``fsync`` them;
2. ``rename`` over the target (atomic on POSIX within one filesystem);
3. ``fsync`` the directory, so the rename itself is on disk.

The old file is never removed first.  A file that still fails to parse (a disk that lied, a
hand edit) is *set aside* (renamed to ``<name>.corrupt-<time>``) with a warning naming it, so a
process does not crash-loop on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path


class CorruptFile(ValueError):
    """A state file cannot be read back: the message names the file and what is wrong."""


def fsync_dir(folder: str | Path) -> None:
    fd = os.open(str(folder), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` crash-safely (tmp + fsync + rename + fsync of the folder)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: str | Path, obj, mode: int = 0o644) -> None:
    write_bytes(path, json.dumps(obj, indent=1).encode(), mode)


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``; CorruptFile (naming the file) when it is torn or not an object."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CorruptFile(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def set_aside(path: str | Path, log=None, why: str = "") -> Path:
    """Rename an unreadable state file out of the way (never delete it) and say so."""
    path = Path(path)
    dest = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, dest)
    if log:
        log(f"warning: {path} is unreadable{f' ({why})' if why else ''}; set aside as {dest.name}")
    return dest


def remove_tmp(folder: str | Path) -> None:
    """Delete half-written ``*.tmp-*`` files a crash left behind in ``folder``."""
    for p in Path(folder).glob("*.tmp-*"):
        if p.is_file():
            p.unlink(missing_ok=True)
