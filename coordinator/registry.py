"""The device registry: who may take part in a run, and how each party proves who it is.

``fedlora devices init`` makes a registry folder; ``fedlora devices add ID`` enrols a device
and writes its credentials file (``fedlora_edge.core.identity``); ``revoke`` and ``list`` do what
they say.  The folder holds:

- ``registry.json``: per device its Ed25519 *public* key, a hash of its MQTT password (PBKDF2-
  HMAC-SHA512, in Mosquitto's ``$7$`` format, so ``fedlora broker-config`` can hand it to the
  broker as is), the aggregation-weight cap the coordinator grants it (``max_examples``), when it
  was enrolled and, once revoked, when.  No secret is in it.
- ``fedlora_edge.coordinator.json`` (mode 0600): the coordinator's own credentials: its signing key and its
  broker password.  It is the one secret the coordinator's host keeps.
- ``ca.pem`` and ``ca.key`` (0600): a certificate authority for the run's TLS: the broker's
  server certificate and, for mutual TLS, the devices' client certificates are issued from it.
- ``runs/<run>.lock``: held (an OS file lock) by the coordinator of run ``<run>`` while it runs,
  so a second coordinator of the same run from this registry is refused, naming the first.

The coordinator of run ``R`` logs in to the broker as ``coordinator@R`` (the registry's coordinator
password; MQTT client id the same), and the broker lets it use only ``fedlora/R/`` topics: two runs
on one broker and one registry each have their own login, session and ACL, so neither can take
the other's connection over.  ``registry.json`` lists the runs its coordinators have used (``runs``)
so that ``fedlora broker-config`` writes a login and an ACL entry for each.

The registry is read again whenever its file changes, so a device revoked with ``fedlora
devices revoke`` is refused at its next message, by the coordinator and the embedded broker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fedlora_edge.core import durable
from fedlora_edge.core.identity import (
    Credentials,
    b64,
    load_credentials,
    new_secret,
    new_signing_key,
    save_credentials,
    unb64,
)

REGISTRY_FILE = "registry.json"
COORDINATOR_FILE = "fedlora_edge.coordinator.json"
REGISTRY_VERSION = 1
COORDINATOR_ID = "coordinator"  # the coordinator's identity on the wire (who signs); its broker login is per run
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PBKDF2_ITERATIONS = 1000  # the secrets are 256-bit random tokens: the hash need not be slow
DEFAULT_REGISTRY = Path("~/.fedlora/registry")


class RegistryError(ValueError):
    """The registry is missing, unreadable or asked something it cannot do; the text says what."""


def coordinator_user(run_id: str) -> str:
    """The broker login of run ``run_id``'s coordinator."""
    if not RUN_ID.match(run_id or ""):
        raise RegistryError(f"run id {run_id!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return f"{COORDINATOR_ID}@{run_id}"


def coordinator_scope(username: str | None) -> str | None:
    """The topic prefix a coordinator login may use: ``fedlora/R/`` for ``coordinator@R``,
    ``fedlora/`` for the registry-wide ``coordinator`` (a broker configured by hand); None when
    ``username`` is not a coordinator login."""
    if username == COORDINATOR_ID:
        return "fedlora/"
    if username and username.startswith(COORDINATOR_ID + "@") and RUN_ID.match(username[len(COORDINATOR_ID) + 1:]):
        return f"fedlora/{username[len(COORDINATOR_ID) + 1:]}/"
    return None


class RunLock:
    """An OS lock on ``runs/<run>.lock`` in the registry, held while one coordinator runs ``run``
    (released by :meth:`release`, or by the OS when the process ends, however it ends)."""

    def __init__(self, folder: Path, run_id: str):
        import fcntl

        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{run_id}.lock"
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.seek(0)
            holder = self._fh.read().strip()[:200] or "another process"
            self._fh.close()
            raise RegistryError(f"run '{run_id}' is already being coordinated from this registry ({holder}; lock "
                                f"{self.path}): two coordinators of one run would take each other's connection "
                                "and updates; give this run its own transport.run_id") from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket_host()} since {_now()}")
        self._fh.flush()

    def release(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()  # closing the file releases the lock


def socket_host() -> str:
    import socket

    return socket.gethostname()


def default_registry() -> Path:
    return Path(os.environ.get("FEDLORA_REGISTRY") or DEFAULT_REGISTRY).expanduser()


def check_device_id(device: str) -> str:
    if not isinstance(device, str) or not DEVICE_ID.match(device) or device == COORDINATOR_ID:
        raise RegistryError(f"device id {device!r}: use 1-64 letters, digits, '.', '_' or '-' (starting with a "
                            f"letter or digit), not '{COORDINATOR_ID}'")
    return device


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS) -> str:
    """PBKDF2-HMAC-SHA512 in Mosquitto's ``$7$iterations$salt$hash`` format (base64 fields).  The
    salt is 12 bytes (Mosquitto takes no other length), chosen as 12 URL-safe characters so that
    EMQX can take the same hash (salt as text, hash as hex)."""
    salt = secrets.token_urlsafe(9).encode()
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def parse_hash(stored: str) -> tuple[int, bytes, bytes]:
    """(iterations, salt, digest) of a ``$7$`` hash."""
    parts = stored.split("$")
    if len(parts) != 5 or parts[1] != "7":
        raise RegistryError("password hash is not in the $7$ (PBKDF2-SHA512) format")
    return int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])


def verify_password(password: str | bytes | None, stored: str) -> bool:
    if password is None:
        return False
    pw = password.encode() if isinstance(password, str) else bytes(password)
    try:
        iterations, salt, digest = parse_hash(stored)
    except (RegistryError, ValueError):
        return False
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha512", pw, salt, iterations), digest)


@dataclass(frozen=True)
class Enrolled:
    id: str
    public_key: bytes
    password_hash: str
    max_examples: int | None = None  # the aggregation-weight cap granted at enrolment (None: the run's default)
    enrolled_at: str = ""
    revoked_at: str | None = None
    cert_serial: int | None = None   # the client certificate issued for mutual TLS, if any

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict:
        return {"public_key": b64(self.public_key), "password_hash": self.password_hash,
                "max_examples": self.max_examples, "enrolled_at": self.enrolled_at, "revoked_at": self.revoked_at,
                "cert_serial": self.cert_serial}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Registry:
    """The enrolled devices of one deployment and the coordinator's identity (see the module text)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.file = self.folder / REGISTRY_FILE
        if not self.file.is_file():
            raise RegistryError(f"no device registry in {self.folder}: create one with `fedlora devices init "
                                f"--registry {self.folder}`, then enrol devices with `fedlora devices add ID`")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self.coordinator_key = b""
        self.coordinator_password_hash = ""
        self.devices: dict[str, Enrolled] = {}
        self.runs: dict[str, dict] = {}  # run id -> {"added_at": ...}: the runs whose coordinator logins brokers get
        self.reload()

    # ------------------------------------------------------------------------------- on disk

    @classmethod
    def create(cls, folder: str | Path) -> Registry:
        """A new registry with a fresh coordinator identity and TLS authority."""
        from .pki import create_ca

        folder = Path(folder).expanduser()
        if (folder / REGISTRY_FILE).exists():
            raise RegistryError(f"{folder} already holds a registry (use it, or choose another folder)")
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        password = new_secret()
        creds = Credentials(COORDINATOR_ID, "coordinator", new_signing_key(), None, COORDINATOR_ID, password)
        save_credentials(folder / COORDINATOR_FILE, creds)
        create_ca(folder)
        durable.write_json(folder / REGISTRY_FILE, {
            "fedlora_registry": REGISTRY_VERSION,
            "coordinator": {"id": COORDINATOR_ID, "public_key": b64(creds.public_key),
                            "password_hash": hash_password(password)},
            "devices": {}})
        return cls(folder)

    def reload(self) -> None:
        try:
            obj = durable.read_json(self.file)
        except durable.CorruptFile as exc:
            raise RegistryError(f"registry: {exc}") from None
        if obj.get("fedlora_registry") != REGISTRY_VERSION:
            raise RegistryError(f"{self.file}: not a fedlora-edge registry of version {REGISTRY_VERSION}")
        try:
            coord = obj["coordinator"]
            devices = {d: Enrolled(d, unb64(v["public_key"], f"device {d} public_key"), v["password_hash"],
                                   v.get("max_examples"), v.get("enrolled_at", ""), v.get("revoked_at"),
                                   v.get("cert_serial"))
                       for d, v in obj["devices"].items()}
            key = unb64(coord["public_key"], "coordinator public_key")
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise RegistryError(f"{self.file}: malformed ({exc})") from None
        st = self.file.stat()
        runs = obj.get("runs") or {}
        with self._lock:
            self.coordinator_key, self.coordinator_password_hash = key, coord["password_hash"]
            self.devices = devices
            self.runs = {r: v for r, v in runs.items() if isinstance(r, str) and RUN_ID.match(r)} \
                if isinstance(runs, dict) else {}
            self._stamp = (st.st_mtime_ns, st.st_size)

    def refresh(self) -> None:
        """Read the file again if it changed since it was last read (a revocation, an enrolment)."""
        try:
            st = self.file.stat()
        except OSError:
            return
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            try:
                self.reload()
            except RegistryError:
                pass  # a file caught mid-edit by hand: keep the last good view

    def _save(self) -> None:
        durable.write_json(self.file, {
            "fedlora_registry": REGISTRY_VERSION,
            "coordinator": {"id": COORDINATOR_ID, "public_key": b64(self.coordinator_key),
                            "password_hash": self.coordinator_password_hash},
            "devices": {d: e.to_json() for d, e in sorted(self.devices.items())},
            "runs": dict(sorted(self.runs.items()))})
        self.reload()

    # ----------------------------------------------------------------------------------- runs

    def add_run(self, run_id: str) -> bool:
        """Record run ``run_id`` (its coordinator gets a broker login and ACL from `broker-config`);
        True when it is new (a broker configured before it needs `broker-config` again)."""
        coordinator_user(run_id)  # checks the id
        self.refresh()
        if run_id in self.runs:
            return False
        self.runs[run_id] = {"added_at": _now()}
        self._save()
        return True

    def lock_run(self, run_id: str) -> RunLock:
        """Hold run ``run_id`` for this coordinator (RegistryError, naming the holder, if another holds it)."""
        coordinator_user(run_id)
        return RunLock(self.folder / "runs", run_id)

    # ----------------------------------------------------------------------------- enrolment

    def add(self, device: str, max_examples: int | None = None, client_cert: bool = False,
            replace: bool = False) -> Credentials:
        """Enrol ``device``: a new key pair and broker password; returns its credentials (to be
        written to a file for that device: the registry keeps only the public half and a hash)."""
        creds = self._enrol(device, max_examples, client_cert, replace)
        self._save()
        return creds

    def add_many(self, devices, max_examples: int | None = None, replace: bool = False) -> list[Credentials]:
        """:meth:`add` for many devices, the registry written once (enrolling a fleet of thousands)."""
        creds = [self._enrol(d, max_examples, False, replace) for d in devices]
        self._save()
        return creds

    def _enrol(self, device: str, max_examples: int | None, client_cert: bool, replace: bool) -> Credentials:
        check_device_id(device)
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise RegistryError(f"max_examples must be a positive integer, got {max_examples!r}")
        old = self.devices.get(device)
        if old is not None and old.active and not replace:
            raise RegistryError(f"device '{device}' is already enrolled (revoke it first, or re-issue with --replace)")
        from .pki import issue_client, load_ca

        key, password = new_signing_key(), new_secret()
        ca_pem = (self.folder / "ca.pem").read_text() if (self.folder / "ca.pem").is_file() else None
        cert_pem = key_pem = serial = None
        if client_cert:
            cert_pem, key_pem, serial = issue_client(load_ca(self.folder), device)
        creds = Credentials(device, "device", key, self.coordinator_key, device, password, ca_pem, cert_pem, key_pem)
        self.devices[device] = Enrolled(device, creds.public_key, hash_password(password), max_examples, _now(),
                                        None, serial)
        return creds

    def revoke(self, device: str) -> Enrolled:
        e = self.devices.get(device)
        if e is None:
            raise RegistryError(f"device '{device}' is not enrolled; enrolled: {', '.join(sorted(self.devices)) or 'none'}")
        if e.active:
            self.devices[device] = Enrolled(e.id, e.public_key, e.password_hash, e.max_examples, e.enrolled_at, _now(),
                                            e.cert_serial)
            self._save()
        return self.devices[device]

    # -------------------------------------------------------------------------------- lookups

    def active(self, device: str, fresh: bool = True) -> Enrolled | None:
        """The device's enrolment if it is active; ``fresh=False`` skips re-checking the file (for a
        scan over many devices after one :meth:`refresh`)."""
        if fresh:
            self.refresh()
        e = self.devices.get(device)
        return e if e is not None and e.active else None

    def key_of(self, sender: str) -> bytes | None:
        """The public key that signs ``sender``'s messages; None if unknown or revoked."""
        if sender == COORDINATOR_ID:
            return self.coordinator_key
        e = self.active(sender)
        return e.public_key if e else None

    def check_login(self, username: str | None, password: str | bytes | None) -> bool:
        """Does this broker login belong to the coordinator or an active enrolled device?"""
        if not username:
            return False
        if coordinator_scope(username) is not None:  # 'coordinator' or 'coordinator@<run>'
            self.refresh()
            return verify_password(password, self.coordinator_password_hash)
        e = self.active(username)
        return e is not None and verify_password(password, e.password_hash)

    def coordinator_login(self, broker, ca_file: str | None = None, run_id: str | None = None):
        """``broker`` (a BrokerAddress) logged in as the coordinator of run ``run_id`` (user
        ``coordinator@<run>``; without a run, the registry-wide ``coordinator``), unless the address
        names a user already: its password (or $FEDLORA_MQTT_PASSWORD), the registry's CA unless
        ``ca_file`` is given, and its client certificate when `broker-config --mtls` issued one."""
        import dataclasses

        creds = self.coordinator_credentials()
        user = coordinator_user(run_id) if run_id is not None else creds.mqtt_username
        address = dataclasses.replace(broker, username=broker.username or user,
                                      password=os.environ.get("FEDLORA_MQTT_PASSWORD") or creds.mqtt_password,
                                      ca_file=ca_file)
        if address.tls:
            cert, key = self.folder / "coordinator-client.pem", self.folder / "coordinator-client.key"
            address = dataclasses.replace(address, ca_pem=None if ca_file else (self.folder / "ca.pem").read_text(),
                                          cert_pem=cert.read_text() if cert.is_file() else None,
                                          key_pem=key.read_text() if key.is_file() else None)
        return address

    def coordinator_credentials(self) -> Credentials:
        try:
            return load_credentials(self.folder / COORDINATOR_FILE, role="coordinator")
        except ValueError as exc:
            raise RegistryError(str(exc)) from None
