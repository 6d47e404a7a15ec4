"""Who sent a message: Ed25519 identities, signed envelopes, counters and the replay guard.

Every MQTT message of protocol 2 is ``signature (64 bytes) || body``, the signature an Ed25519
signature (RFC 8032, through the ``cryptography`` package) by the sender's key over

    b"fedlora/2\\x00" + topic (UTF-8) + b"\\x00" + body

so a message cannot be forged, altered, or moved to another topic.  The topic names the sender
(docs/protocol.md): the coordinator signs ``round``, ``down`` and ``ack``; device ``D`` signs
what it publishes under ``dev/D/``.  Receivers verify before they parse anything.

Each body carries ``ctr``, a counter that only grows for its sender, across restarts
(:class:`Counter` keeps a reserved floor on disk).  A receiver remembers the highest ``ctr`` it
accepted per topic and refuses a lower one (a replay, or a message older than one already
acted on); an equal one is the same message delivered again (QoS 1), which every handler treats
idempotently.  Together with the run nonce (a fresh random id per run, carried by every message
but ``status``) this refuses replays across runs and within one.

Credentials files (:func:`save_credentials`, :func:`load_credentials`) hold a party's secret
key, its MQTT password and, for a device, the coordinator's public key.  They are written with
mode 0600 and never printed.
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import durable
from .framing import ProtocolError

SIG_BYTES = 64
DOMAIN = b"fedlora/2\x00"
CREDENTIALS_VERSION = 2

if TYPE_CHECKING:  # cryptography is imported when first used (_ed25519)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def _ed25519():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError):
        raise ValueError(f"{what} is not valid base64") from None


def new_signing_key() -> bytes:
    """32 raw bytes of a fresh Ed25519 private key."""
    from cryptography.hazmat.primitives import serialization

    key = _ed25519().Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def public_key_of(signing_key: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pub = _ed25519().Ed25519PrivateKey.from_private_bytes(signing_key).public_key()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def new_secret() -> str:
    """A random MQTT password (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


class Signer:
    """Signs bodies for one sender."""

    def __init__(self, signing_key: bytes):
        self._key = _ed25519().Ed25519PrivateKey.from_private_bytes(signing_key)
        self.public_key = public_key_of(signing_key)

    def seal(self, topic: str, body: bytes) -> bytes:
        return self._key.sign(DOMAIN + topic.encode() + b"\x00" + body) + body


class Verifier:
    """Checks signatures with the public key of the sender a topic names.

    ``keys`` maps a sender (``"coordinator"`` or a device id) to its raw public key, or returns
    None for a sender that is unknown or revoked; it is called per message, so a revocation
    takes effect at the next one."""

    def __init__(self, keys):
        self._keys = keys
        self._cache: dict[bytes, Ed25519PublicKey] = {}

    def open(self, sender: str, topic: str, payload: bytes) -> bytes:
        """The body of a message from ``sender`` on ``topic``; ProtocolError naming the reason."""
        from cryptography.exceptions import InvalidSignature

        raw = self._keys(sender)
        if raw is None:
            raise ProtocolError(f"no key for sender '{sender}' (not enrolled, or revoked)")
        if len(payload) <= SIG_BYTES:
            raise ProtocolError(f"message of {len(payload)} bytes is too short to carry a signature")
        pub = self._cache.get(raw)
        if pub is None:
            pub = self._cache[raw] = _ed25519().Ed25519PublicKey.from_public_bytes(raw)
        sig, body = payload[:SIG_BYTES], payload[SIG_BYTES:]
        try:
            pub.verify(bytes(sig), DOMAIN + topic.encode() + b"\x00" + bytes(body))
        except InvalidSignature:
            raise ProtocolError(f"bad signature: not signed by '{sender}' for topic {topic}") from None
        return bytes(body)


class Counter:
    """A message counter that only grows, across restarts of its process.

    It starts above both the floor reserved on disk and the clock in microseconds, then counts
    by one; every ``block`` values it reserves the next block on disk (one small crash-safe
    write), so a restart, even one whose clock went back, starts above everything it sent."""

    def __init__(self, path: str | Path | None = None, block: int = 1_000_000, log=None):
        self.path = Path(path) if path else None
        self.block = block
        floor = 0
        if self.path and self.path.is_file():
            try:
                floor = int(self.path.read_text().strip())
            except ValueError:
                durable.set_aside(self.path, log, "not a counter value")
        self._value = max(floor, time.time_ns() // 1000)
        self._limit = self._value
        self._lock = threading.Lock()
        self._reserve()

    def _reserve(self) -> None:
        self._limit = self._value + self.block
        if self.path:
            durable.write_bytes(self.path, str(self._limit).encode(), 0o600)

    def next(self) -> int:
        with self._lock:
            self._value += 1
            if self._value >= self._limit:
                self._reserve()
            return self._value


class ReplayGuard:
    """The highest ``ctr`` accepted per topic; a lower one is refused."""

    def __init__(self, seen: dict[str, int] | None = None):
        self.seen: dict[str, int] = dict(seen or {})

    def check(self, topic: str, ctr) -> None:
        if not isinstance(ctr, int) or isinstance(ctr, bool) or ctr < 0:
            raise ProtocolError(f"field 'ctr' missing or not a non-negative integer (got {ctr!r})")
        last = self.seen.get(topic)
        if last is not None and ctr < last:
            raise ProtocolError(f"replayed or out-of-date message on {topic} (ctr {ctr} < {last} already seen)")
        self.seen[topic] = ctr


@dataclass(frozen=True)
class Credentials:
    """One party's identity: who it is, its secret key, its broker login, what it trusts."""

    id: str
    role: str                     # "device" or "coordinator"
    signing_key: bytes = field(repr=False)
    coordinator_key: bytes | None = None  # a device trusts this public key for the coordinator's messages
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    ca_pem: str | None = None     # the CA that signed the broker's TLS certificate
    cert_pem: str | None = None   # a client certificate for mutual TLS, and its key
    key_pem: str | None = field(default=None, repr=False)

    @property
    def public_key(self) -> bytes:
        return public_key_of(self.signing_key)

    def to_json(self) -> dict:
        out = {"fedlora_credentials": CREDENTIALS_VERSION, "id": self.id, "role": self.role,
               "signing_key": b64(self.signing_key), "public_key": b64(self.public_key)}
        if self.coordinator_key:
            out["coordinator_key"] = b64(self.coordinator_key)
        out["mqtt"] = {"username": self.mqtt_username, "password": self.mqtt_password}
        tls = {k: v for k, v in (("ca", self.ca_pem), ("cert", self.cert_pem), ("key", self.key_pem)) if v}
        if tls:
            out["tls"] = tls
        return out


def save_credentials(path: str | Path, creds: Credentials) -> None:
    """Write a credentials file, readable by its owner only (0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    durable.write_json(path, creds.to_json(), mode=0o600)
    os.chmod(path, 0o600)


def load_credentials(path: str | Path, role: str | None = None) -> Credentials:
    """Read a credentials file; ValueError naming the file and the field when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"credentials file {path} not found")
    try:
        obj = durable.read_json(path)
    except durable.CorruptFile as exc:
        raise ValueError(f"credentials: {exc}") from None
    where = f"credentials file {path}"
    if obj.get("fedlora_credentials") != CREDENTIALS_VERSION:
        raise ValueError(f"{where}: not a fedlora-edge credentials file of version {CREDENTIALS_VERSION} "
                         f"(got {obj.get('fedlora_credentials')!r})")
    for key in ("id", "role", "signing_key"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise ValueError(f"{where}: field '{key}' missing")
    if role and obj["role"] != role:
        raise ValueError(f"{where}: holds a {obj['role']} identity, a {role} one is needed")
    signing_key = unb64(obj["signing_key"], f"{where}: signing_key")
    if len(signing_key) != 32:
        raise ValueError(f"{where}: signing_key must be 32 bytes (an Ed25519 private key)")
    coord = None
    if obj["role"] == "device":
        if not isinstance(obj.get("coordinator_key"), str):
            raise ValueError(f"{where}: field 'coordinator_key' missing (a device must know the coordinator's key)")
        coord = unb64(obj["coordinator_key"], f"{where}: coordinator_key")
        if len(coord) != 32:
            raise ValueError(f"{where}: coordinator_key must be 32 bytes (an Ed25519 public key)")
    mqtt = obj.get("mqtt") or {}
    tls = obj.get("tls") or {}
    if mode_is_loose(path):
        print(f"warning: {where} is readable by other users; chmod 600 it", flush=True)
    return Credentials(obj["id"], obj["role"], signing_key, coord, mqtt.get("username"), mqtt.get("password"),
                       tls.get("ca"), tls.get("cert"), tls.get("key"))


def mode_is_loose(path: Path) -> bool:
    return os.name == "posix" and bool(path.stat().st_mode & 0o077)
