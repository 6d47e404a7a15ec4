"""Chunked transfers over MQTT: framing, checksums and reassembly (protocol: docs/protocol.md).

Every chunk is one MQTT message whose body (under the signature, see :mod:`fedlora_edge.core.identity`) is

    4 bytes: big-endian length L of the header
    L bytes: UTF-8 JSON header
    the rest: this chunk's slice of the transfer's bytes

The header carries ``schema``, ``type: "chunk"``, ``kind``, ``run``, ``nonce``, ``ctr``,
``round``, ``device``, ``transfer`` (an id unique per transfer), ``seq``/``total`` (0-based chunk
index and count), ``nbytes`` (the whole transfer's size) and ``sha256`` (of the whole transfer);
chunk 0 also carries ``meta``, the transfer's JSON metadata.  A :class:`Reassembler` accepts
chunks in any order, ignores duplicates, refuses a transfer larger than its limit *before*
buffering anything, caps what one sender may have in flight, and yields the bytes only when
every chunk is in and the checksum matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

SCHEMA_VERSION = "2.0"
SCHEMA_MAJOR = 2
DEFAULT_CHUNK_BYTES = 900 * 1024  # leaves room for the header and signature under a 1 MB broker message limit
MIN_CHUNK_BYTES = 4096  # every chunk but a transfer's last carries at least this much (bounds the chunk count)
_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32  # objects and lists nested deeper than this are refused (no message needs more than 4)
KINDS = ("plan", "program", "update", "secagg")
# ids by their documented form: a transfer id (an update's is 32 hex digits; a plan's "plan-<round>-<device>"),
# a device id, a run id and a nonce
TRANSFER_ID = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NONCE = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ProtocolError(ValueError):
    """A message breaks the protocol: the text says how (bad schema, truncated, oversize...)."""


_VERSION = re.compile(r"^([0-9]{1,4})\.([0-9]{1,4})$")


def check_schema(obj: dict) -> None:
    """Refuse a message whose schema major version this implementation does not speak."""
    version = obj.get("schema")
    m = _VERSION.match(version) if isinstance(version, str) else None
    if m is None:
        raise ProtocolError(f"message has no valid 'schema' version (got {str(version)[:40]!r})")
    if int(m.group(1)) != SCHEMA_MAJOR:
        raise ProtocolError(f"unsupported schema version {version} (this side speaks {SCHEMA_VERSION})")


def encode_json(obj: dict) -> bytes:
    return json.dumps({"schema": SCHEMA_VERSION, **obj}, separators=(",", ":"), allow_nan=False).encode()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def json_depth(obj, most: int = MAX_JSON_DEPTH) -> int:
    """How deeply lists and objects nest in ``obj`` (a scalar: 0, ``{}``: 1), counted up to ``most + 1``;
    breadth-first, so a deep message costs no recursion."""
    depth, level = 0, [obj]
    while depth <= most:
        containers = [x for x in level if isinstance(x, (dict, list))]
        if not containers:
            return depth
        depth += 1
        level = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]
    return depth


def decode_json(payload: bytes) -> dict:
    """A JSON object with a schema this side speaks; NaN and Infinity are refused (JSON has none),
    and so is nesting deeper than :data:`MAX_JSON_DEPTH`."""
    try:
        obj = json.loads(payload, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"not a JSON message ({str(exc)[:120]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON message is not an object")
    if json_depth(obj) > MAX_JSON_DEPTH:
        raise ProtocolError(f"JSON message nested deeper than {MAX_JSON_DEPTH} levels")
    check_schema(obj)
    return obj


def chunk_transfer(data: bytes, *, kind: str, run: str, nonce: str, round_idx: int, device: str, transfer: str,
                   meta: dict, next_ctr: Callable[[], int], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The chunk bodies of one transfer, in order (each is signed by the sender before it goes out)."""
    total = max(1, math.ceil(len(data) / chunk_bytes))
    digest = hashlib.sha256(data).hexdigest()
    for seq in range(total):
        header = {"type": "chunk", "kind": kind, "run": run, "nonce": nonce, "ctr": next_ctr(), "round": round_idx,
                  "device": device, "transfer": transfer, "seq": seq, "total": total, "nbytes": len(data),
                  "sha256": digest}
        if seq == 0:
            header["meta"] = meta
        h = encode_json(header)
        yield _LEN.pack(len(h)) + h + data[seq * chunk_bytes:(seq + 1) * chunk_bytes]


_CHUNK_FIELDS = (("kind", str), ("run", str), ("nonce", str), ("transfer", str), ("device", str), ("seq", int),
                 ("total", int), ("nbytes", int), ("sha256", str), ("round", int), ("ctr", int))


def parse_chunk(body: bytes) -> tuple[dict, bytes]:
    """(header, data) of a chunk body; ProtocolError if it is malformed."""
    if len(body) < _LEN.size:
        raise ProtocolError("truncated chunk: no header length")
    (n,) = _LEN.unpack_from(body)
    if n > MAX_HEADER_BYTES or _LEN.size + n > len(body):
        raise ProtocolError(f"truncated chunk: header of {n} bytes does not fit a {len(body)}-byte message")
    header = decode_json(body[_LEN.size:_LEN.size + n])
    if header.get("type") != "chunk":
        raise ProtocolError(f"chunk header has type {header.get('type')!r}, expected 'chunk'")
    for key, typ in _CHUNK_FIELDS:
        v = header.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise ProtocolError(f"chunk header field '{key}' missing or not {typ.__name__}")
    if header["kind"] not in KINDS:
        raise ProtocolError(f"chunk header field 'kind' is {header['kind'][:20]!r}, not one of {', '.join(KINDS)}")
    for key, form in (("transfer", TRANSFER_ID), ("device", NAME), ("run", NAME), ("nonce", NONCE)):
        if not form.match(header[key]):
            raise ProtocolError(f"chunk header field '{key}' ({header[key][:40]!r}...) is not of its documented form")
    if not 0 <= header["nbytes"] <= 1 << 40 or not 0 <= header["round"] <= 1 << 31:
        raise ProtocolError("chunk header: nbytes or round out of range")
    most = max(1, math.ceil(header["nbytes"] / MIN_CHUNK_BYTES))  # chunks but the last carry >= MIN_CHUNK_BYTES
    if not 1 <= header["total"] <= most or not 0 <= header["seq"] < header["total"]:
        raise ProtocolError(f"chunk seq {header['seq']} of {header['total']}: outside 0..total-1, or more chunks "
                            f"than a {header['nbytes']}-byte transfer can have ({most})")
    if not SHA256.match(header["sha256"]):
        raise ProtocolError("chunk header field 'sha256' is not a hex SHA-256")
    if header["seq"] == 0 and not isinstance(header.get("meta"), dict):
        raise ProtocolError("chunk 0 has no 'meta' object")
    return header, body[_LEN.size + n:]


@dataclass
class _Partial:
    header: dict
    chunks: dict = field(default_factory=dict)
    meta: dict | None = None
    size: int = 0  # bytes buffered
    started: float = field(default_factory=time.monotonic)
    repeat: bool = False  # the transfer completed before: this is a re-send (or a stray re-delivery)


@dataclass(frozen=True)
class Transfer:
    """A complete, checksum-verified transfer."""

    kind: str
    run: str
    round: int
    device: str
    transfer: str
    meta: dict
    data: bytes


_SAME = ("total", "nbytes", "sha256", "kind", "round", "run", "nonce")


class Reassembler:
    """Collects chunks into transfers.  ``add`` returns a Transfer when one completes, else None;
    it raises ProtocolError for a chunk that can never be part of a valid transfer, and forgets
    the transfer it belonged to.

    Memory is bounded: a transfer larger than ``max_bytes`` (or the ``limit`` given with its
    chunk) is refused at its first chunk, before anything is buffered; one sender may have at
    most ``max_open`` transfers in flight; a transfer whose chunks add up to more than its
    ``nbytes`` is dropped.  So what is buffered never exceeds ``max_open x max_bytes`` per sender.
    A sender's transfer beyond ``max_open`` evicts its oldest incomplete one: a device that left
    broken transfers behind (or an enrolled device sending junk) can always send a good one.

    A transfer sent again whole (a client re-sending an unacknowledged update) completes again
    and is returned again: idempotency is the receiver's business (it knows the update id).  A
    stray re-delivered chunk of a completed transfer is dropped quietly at the deadline."""

    def __init__(self, max_bytes: int, max_open: int = 2):
        self.max_bytes = max_bytes
        self.max_open = max_open
        self._open: dict[tuple[str, str], _Partial] = {}
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()  # the last completed, for `repeat`
        self.buffered = 0       # bytes held now, over all open transfers
        self.peak_buffered = 0  # the most ever held at once
        self.evicted = 0        # incomplete transfers dropped to make room for a newer one of their sender

    def add(self, header: dict, body: bytes, limit: int | None = None) -> Transfer | None:
        """Add one parsed chunk (:func:`parse_chunk`); ``limit`` caps this transfer's size."""
        cap = self.max_bytes if limit is None else min(limit, self.max_bytes)
        if header["nbytes"] > cap:
            raise ProtocolError(f"transfer of {header['nbytes']} bytes exceeds the limit of {cap} bytes")
        key = (header["device"], header["transfer"])
        part = self._open.get(key)
        if part is None:
            mine = [k for k in self._open if k[0] == header["device"]]  # oldest first (insertion order)
            while len(mine) >= self.max_open:  # the newest transfer wins: a sender's stale partial ones go
                self._forget(mine.pop(0))
                self.evicted += 1
            part = self._open[key] = _Partial(header, repeat=key in self._done)
        elif any(part.header[k] != header[k] for k in _SAME):
            self._forget(key)
            raise ProtocolError(f"chunks of transfer {header['transfer']} disagree on its size, checksum or round")
        if "meta" in header and part.meta is None:
            part.meta = header["meta"]
        if header["seq"] not in part.chunks:
            if header["seq"] < header["total"] - 1 and len(body) < MIN_CHUNK_BYTES:
                self._forget(key)
                raise ProtocolError(f"transfer {header['transfer'][:40]}: chunk {header['seq']} carries "
                                    f"{len(body)} bytes; every chunk but the last carries at least {MIN_CHUNK_BYTES}")
            if part.size + len(body) > header["nbytes"]:
                self._forget(key)
                raise ProtocolError(f"transfer {header['transfer']}: chunks add up to more than its "
                                    f"{header['nbytes']} bytes")
            part.chunks[header["seq"]] = body
            part.size += len(body)
            self.buffered += len(body)
            self.peak_buffered = max(self.peak_buffered, self.buffered)
        if len(part.chunks) < header["total"] or part.meta is None:
            return None
        self._forget(key)
        data = b"".join(part.chunks[i] for i in range(header["total"]))
        if len(data) != header["nbytes"] or hashlib.sha256(data).hexdigest() != header["sha256"]:
            raise ProtocolError(f"transfer {header['transfer']} from {header['device']} fails its checksum "
                                f"({len(data)} of {header['nbytes']} bytes)")
        self._done[key] = None
        if len(self._done) > 4096:
            self._done.popitem(last=False)
        return Transfer(header["kind"], header["run"], header["round"], header["device"], header["transfer"],
                        part.meta, data)

    def _forget(self, key) -> None:
        part = self._open.pop(key, None)
        if part is not None:
            self.buffered -= part.size

    def drop_incomplete(self, older_than_s: float = 0.0, device: str | None = None) -> list[tuple[str, str]]:
        """Forget transfers still missing chunks (at a deadline), all or one device's; returns the
        (device, transfer) of those that were not re-sends of a completed transfer."""
        now = time.monotonic()
        gone = [k for k, p in self._open.items()
                if now - p.started >= older_than_s and (device is None or k[0] == device)]
        report = [k for k in gone if not self._open[k].repeat]
        for k in gone:
            self._forget(k)
        return report
