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

import contextlib
import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
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


def _raise(exc: OSError) -> None:
    raise exc


def fsync_tree(folder: str | Path) -> None:
    """fsync every file and folder under ``folder`` (deepest first) and ``folder`` itself, so a
    folder built with plain writes is on disk before it is renamed into place."""
    folder = Path(folder)
    for root, _dirs, files in os.walk(folder, topdown=False, onerror=_raise):  # walk's default skips errors
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def replace_dir(tmp: str | Path, final: str | Path) -> None:
    """Swap the complete folder ``tmp`` in as ``final`` (same parent, so same filesystem).

    ``tmp`` is fsynced (:func:`fsync_tree`) first.  POSIX cannot rename a folder over a non-empty
    one, so an existing ``final`` is first renamed aside to ``<final>.old-<pid>-<time>``, ``tmp``
    is renamed to ``final``, the parent is fsynced, and only then is the old folder removed: the
    old version is never removed before the new one is in place.  If renaming ``tmp`` fails, the
    old folder is renamed back (best effort) and the error propagates unchanged.  A crash between
    the two renames (microseconds) leaves no ``final`` but the complete old version under its
    ``.old-`` name.  Failing to remove the old folder after the swap is not an error (the new
    version is in place; the leftover is only disk space); after a successful swap every
    ``<final>.old-*`` beside it (this swap's, and any an earlier crash or failure left) is removed."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    aside = None
    if final.exists():
        aside = final.with_name(f"{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(final, aside)
    try:
        os.replace(tmp, final)
    except BaseException:
        if aside is not None:
            with contextlib.suppress(OSError):
                os.replace(aside, final)
        raise
    fsync_dir(final.parent)  # if this fails the old folder stays aside: the rename may not be on disk
    # the old version, and any an earlier swap left aside (a crash, a failed fsync): the new one is in
    for old in final.parent.glob(f"{glob.escape(final.name)}.old-*"):
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_dir(final: str | Path) -> Iterator[Path]:
    """Build a folder whole, then swap it in: yields an empty ``<final>.tmp-<pid>`` beside
    ``final`` for the caller to fill with plain writes; on a normal exit :func:`replace_dir`
    puts it in place.  If the body or the swap raises, the temporary folder is removed (best
    effort) and the exception propagates unchanged, with ``final`` as it was (or, when only the
    fsync after the rename failed, already the complete new folder: never a mix)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed process that had our pid
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
