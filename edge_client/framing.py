"""Chunked transfers over MQTT: framing, checksums and reassembly (protocol: docs/protocol.md).

Every chunk is one MQTT message whose payload is

    4 bytes: big-endian length L of the header
    L bytes: UTF-8 JSON header
    the rest: this chunk's slice of the transfer's bytes

The header carries ``schema``, ``type: "chunk"``, ``kind``, ``run``, ``round``, ``device``,
``transfer`` (an id unique per transfer), ``seq``/``total`` (0-based chunk index and count),
``nbytes`` (the whole transfer's size) and ``sha256`` (of the whole transfer); chunk 0 also
carries ``meta``, the transfer's JSON metadata.  A :class:`Reassembler` accepts chunks in any
order, ignores duplicates, refuses a transfer larger than its limit *before* buffering anything,
and yields the bytes only when every chunk is in and the checksum matches.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

SCHEMA_VERSION = "1.0"
SCHEMA_MAJOR = 1
DEFAULT_CHUNK_BYTES = 900 * 1024  # leaves room for the header under a 1 MB broker message limit
_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 256 * 1024


class ProtocolError(ValueError):
    """A message breaks the protocol: the text says how (bad schema, truncated, oversize...)."""


def check_schema(obj: dict) -> None:
    """Refuse a message whose schema major version this implementation does not speak."""
    version = obj.get("schema")
    if not isinstance(version, str) or not version.split(".")[0].isdigit():
        raise ProtocolError(f"message has no valid 'schema' version (got {version!r})")
    if int(version.split(".")[0]) != SCHEMA_MAJOR:
        raise ProtocolError(f"unsupported schema version {version} (this side speaks {SCHEMA_VERSION})")


def encode_json(obj: dict) -> bytes:
    return json.dumps({"schema": SCHEMA_VERSION, **obj}, separators=(",", ":")).encode()


def decode_json(payload: bytes) -> dict:
    try:
        obj = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not a JSON message ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON message is not an object")
    check_schema(obj)
    return obj


def chunk_transfer(data: bytes, *, kind: str, run: str, round_idx: int, device: str, transfer: str,
                   meta: dict, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """The chunk payloads of one transfer, in order."""
    total = max(1, math.ceil(len(data) / chunk_bytes))
    digest = hashlib.sha256(data).hexdigest()
    for seq in range(total):
        header = {"type": "chunk", "kind": kind, "run": run, "round": round_idx, "device": device,
                  "transfer": transfer, "seq": seq, "total": total, "nbytes": len(data), "sha256": digest}
        if seq == 0:
            header["meta"] = meta
        h = encode_json(header)
        yield _LEN.pack(len(h)) + h + data[seq * chunk_bytes:(seq + 1) * chunk_bytes]


def parse_chunk(payload: bytes) -> tuple[dict, bytes]:
    """(header, body) of a chunk payload; ProtocolError if it is malformed."""
    if len(payload) < _LEN.size:
        raise ProtocolError("truncated chunk: no header length")
    (n,) = _LEN.unpack_from(payload)
    if n > MAX_HEADER_BYTES or _LEN.size + n > len(payload):
        raise ProtocolError(f"truncated chunk: header of {n} bytes does not fit a {len(payload)}-byte message")
    header = decode_json(payload[_LEN.size:_LEN.size + n])
    for key, typ in (("kind", str), ("transfer", str), ("device", str), ("seq", int), ("total", int),
                     ("nbytes", int), ("sha256", str), ("round", int)):
        if not isinstance(header.get(key), typ):
            raise ProtocolError(f"chunk header field '{key}' missing or not {typ.__name__}")
    if not 0 <= header["seq"] < header["total"]:
        raise ProtocolError(f"chunk seq {header['seq']} outside 0..{header['total'] - 1}")
    return header, payload[_LEN.size + n:]


@dataclass
class _Partial:
    header: dict
    chunks: dict = field(default_factory=dict)
    meta: dict | None = None
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


class Reassembler:
    """Collects chunks into transfers.  ``add`` returns a Transfer when one completes, else None;
    it raises ProtocolError for a chunk that can never be part of a valid transfer.

    A transfer sent again whole (a client re-sending an unacknowledged update) completes again
    and is returned again: idempotency is the receiver's business (it knows the update id).  A
    stray re-delivered chunk of a completed transfer is dropped quietly at the deadline."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._open: dict[tuple[str, str], _Partial] = {}
        self._done: set[tuple[str, str]] = set()

    def add(self, payload: bytes, device_from_topic: str | None = None) -> Transfer | None:
        header, body = parse_chunk(payload)
        if device_from_topic is not None and header["device"] != device_from_topic:
            raise ProtocolError(f"chunk names device '{header['device']}' but came on the topic of "
                                f"'{device_from_topic}'")
        if header["nbytes"] > self.max_bytes:
            raise ProtocolError(f"transfer of {header['nbytes']} bytes exceeds the limit of {self.max_bytes}")
        key = (header["device"], header["transfer"])
        part = self._open.get(key)
        if part is None:
            part = self._open[key] = _Partial(header, repeat=key in self._done)
        elif any(part.header[k] != header[k] for k in ("total", "nbytes", "sha256", "kind", "round")):
            del self._open[key]
            raise ProtocolError(f"chunks of transfer {header['transfer']} disagree on its size or checksum")
        if "meta" in header:
            part.meta = header["meta"]
        part.chunks[header["seq"]] = body
        if len(part.chunks) < header["total"] or part.meta is None:
            return None
        del self._open[key]
        data = b"".join(part.chunks[i] for i in range(header["total"]))
        if len(data) != header["nbytes"] or hashlib.sha256(data).hexdigest() != header["sha256"]:
            raise ProtocolError(f"transfer {header['transfer']} from {header['device']} fails its checksum "
                                f"({len(data)} of {header['nbytes']} bytes)")
        self._done.add(key)
        return Transfer(header["kind"], str(header.get("run", "")), header["round"], header["device"],
                        header["transfer"], part.meta, data)

    def drop_incomplete(self, older_than_s: float = 0.0) -> list[tuple[str, str]]:
        """Forget transfers still missing chunks (at a deadline); returns the (device, transfer)
        of those that were not re-sends of a completed transfer."""
        now = time.monotonic()
        gone = [k for k, p in self._open.items() if now - p.started >= older_than_s]
        report = [k for k in gone if not self._open[k].repeat]
        for k in gone:
            del self._open[k]
        return report
