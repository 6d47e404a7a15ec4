"""Protocol 2 messages, both directions: sign and number what goes out, verify and check what
comes in (docs/protocol.md).  The coordinator and the edge client share this layer, so the two
sides cannot disagree on what a valid message is.

:func:`read_message` is the one way in: it finds the sender the topic names, checks its
signature (before parsing anything), parses the body (a JSON object, or a chunk on ``up`` and
``down``), checks the fields every message carries (``schema``, ``type`` for its topic, ``run``,
``device`` for a device's topics) and the sender's counter.  Whatever fails raises
:class:`~edge_client.framing.ProtocolError` with the reason; callers log it and go on.
"""

from __future__ import annotations

from collections.abc import Iterator

from .framing import DEFAULT_CHUNK_BYTES, ProtocolError, chunk_transfer, decode_json, encode_json, parse_chunk
from .identity import Counter, ReplayGuard, Signer, Verifier
from .mqtt import sender_of

# the body types each topic leaf carries
TYPES = {"round": ("round",), "ack": ("ack",), "hello": ("hello",), "status": ("status",),
         "event": ("failure", "received", "secagg"), "up": ("chunk",), "down": ("chunk",)}
CHUNKED = ("up", "down")


class Outbox:
    """Everything one party sends: bodies get ``run``, the run ``nonce`` and the next ``ctr``,
    then the sender's signature for their topic."""

    def __init__(self, signer: Signer, counter: Counter, run: str, nonce: str | None = None):
        self.signer, self.counter, self.run, self.nonce = signer, counter, run, nonce

    def json(self, topic: str, obj: dict, nonce: bool = True) -> bytes:
        fields = {**obj, "run": self.run, "ctr": self.counter.next()}
        if nonce:
            fields["nonce"] = self.nonce
        return self.signer.seal(topic, encode_json(fields))

    def chunks(self, topic: str, data: bytes, *, kind: str, round_idx: int, device: str, transfer: str, meta: dict,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        for body in chunk_transfer(data, kind=kind, run=self.run, nonce=self.nonce or "", round_idx=round_idx,
                                   device=device, transfer=transfer, meta=meta, next_ctr=self.counter.next,
                                   chunk_bytes=chunk_bytes):
            yield self.signer.seal(topic, body)


def read_message(verifier: Verifier, guard: ReplayGuard, run: str, topic: str,
                 payload: bytes) -> tuple[str, str, dict, bytes | None]:
    """(sender, leaf, fields, chunk data or None) of a message that verifies (see the module text)."""
    who = sender_of(run, topic)
    if who is None:
        raise ProtocolError(f"message on {topic[:200]}, not a topic of run '{run}'")
    sender, leaf = who
    body = verifier.open(sender, topic, payload)
    if leaf in CHUNKED:
        fields, data = parse_chunk(body)
    else:
        fields, data = decode_json(body), None
    if fields.get("type") not in TYPES[leaf]:
        raise ProtocolError(f"a '{str(fields.get('type'))[:40]}' message on a '{leaf}' topic "
                            f"(expected {' or '.join(TYPES[leaf])})")
    if fields.get("run") != run:
        raise ProtocolError(f"message names run {str(fields.get('run'))[:80]!r}, its topic run '{run}'")
    device = topic.split("/")[3] if topic.split("/")[2] == "dev" else None
    if device is not None and fields.get("device") != device:
        raise ProtocolError(f"message names device {str(fields.get('device'))[:80]!r} but came on the topic of "
                            f"'{device}'")
    if leaf != "status" and not isinstance(fields.get("nonce"), str):
        raise ProtocolError("field 'nonce' missing or not a string")
    guard.check(topic, fields.get("ctr"))
    return sender, leaf, fields, data
