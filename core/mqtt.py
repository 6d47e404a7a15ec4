"""MQTT plumbing shared by the edge client and the coordinator: broker URLs, topic names, and a
small blocking link over paho-mqtt (QoS 1, a Last Will renewed per connection, capped reconnect
backoff, an inbox queue, an optional bandwidth cap, TLS and mutual TLS).  The topics and
messages are specified in docs/protocol.md; signing is :mod:`fedlora_edge.core.identity`'s.

Connection failures are named: refused credentials stop at once (:class:`BrokerAuthError`); a
TLS mistake (a certificate the CA does not vouch for, TLS to a plain port, a plain connection to
a TLS port, a broker that wants a client certificate) stops within seconds with its cause
(:class:`BrokerTLSError`); an unreachable broker is retried, and the error after the wait
says what the last attempt met.
"""

from __future__ import annotations

import os
import queue
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote, urlparse

TOPIC_ROOT = "fedlora"
DEVICE_LEAVES = ("hello", "status", "up", "event")   # what a device publishes
COORDINATOR_LEAVES = ("down", "ack")                 # what the coordinator publishes to one device


class BrokerAuthError(RuntimeError):
    """The broker refused our credentials: retrying would not help, so the link stops."""


class BrokerTLSError(RuntimeError):
    """The TLS set-up cannot work (wrong CA, TLS to a plain port, the reverse, missing client
    certificate): the message says which."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    ca_pem: str | None = None     # the CA as PEM text (from a credentials file)
    cert_pem: str | None = None   # client certificate and key for mutual TLS
    key_pem: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(url: str, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None) -> BrokerAddress:
    """``mqtt://host[:port]`` or ``mqtts://...`` (TLS).  Credentials in the URL are refused: a URL
    ends up on command lines and in logs, and a password must not."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
        raise ValueError(f"broker URL '{url}': expected mqtt://host:port or mqtts://host:port")
    if u.password:
        raise ValueError("broker URL: put no password in the URL (it would show on the command line and in "
                         "logs); it comes from the credentials file or FEDLORA_MQTT_PASSWORD")
    if ca_file is not None and not os.path.isfile(ca_file):
        raise ValueError(f"CA file {ca_file} not found (--ca-file)")
    tls = u.scheme in ("mqtts", "ssl")
    try:
        port = u.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker URL '{url}': the port is not a number in 1-65535") from None
    return BrokerAddress(u.hostname, port, tls, username if username is not None else
                         (unquote(u.username) if u.username else None), password, ca_file)


def publish_packet_bytes(topic_name: str, payload_len: int) -> int:
    """Bytes of an MQTT 3.1.1 QoS 1 PUBLISH packet on the wire, plus its 4-byte PUBACK."""
    remaining = 2 + len(topic_name.encode()) + 2 + payload_len
    varint = 1 if remaining < 128 else 2 if remaining < 16384 else 3 if remaining < 2097152 else 4
    return 1 + varint + remaining + 4


def topic(run: str, *parts: str) -> str:
    """``fedlora/<run>/...``; device topics are ``fedlora/<run>/dev/<id>/<leaf>``."""
    return "/".join((TOPIC_ROOT, run, *parts))


def device_topic(run: str, device: str, leaf: str) -> str:
    if not device or any(c in device for c in "/+#"):
        raise ValueError(f"device id '{device}' must be non-empty and contain no '/', '+' or '#'")
    return topic(run, "dev", device, leaf)


def sender_of(run: str, topic_name: str) -> tuple[str, str] | None:
    """(sender, leaf) of a topic of run ``run``: the coordinator for ``round``, ``down`` and
    ``ack``; device D for what it publishes under ``dev/D/``; None for any other topic."""
    parts = topic_name.split("/")
    if parts[:2] != [TOPIC_ROOT, run]:
        return None
    if parts[2:] == ["round"]:
        return "coordinator", "round"
    if len(parts) == 5 and parts[2] == "dev" and parts[3]:
        if parts[4] in DEVICE_LEAVES:
            return parts[3], parts[4]
        if parts[4] in COORDINATOR_LEAVES:
            return "coordinator", parts[4]
    return None


def _tls_context(address: BrokerAddress) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=address.ca_file, cadata=address.ca_pem)
    if address.cert_pem and address.key_pem:
        # ssl loads a certificate chain from files only: a private folder, gone once loaded
        with tempfile.TemporaryDirectory(prefix="fedlora-tls-") as d:
            cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            for path, text in ((cert, address.cert_pem), (key, address.key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(text)
            ctx.load_cert_chain(cert, key)
    return ctx


def describe_tls_error(address: BrokerAddress, exc: ssl.SSLError) -> str:
    text = str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS: certificate verify failed for {address.url} ({exc.verify_message}): is the CA file the one "
                "that signed the broker's certificate, and the host name one the certificate names?")
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text or "record layer failure" in text:
        return f"TLS: {address.url} does not speak TLS on port {address.port} (a plain MQTT port? use mqtt://)"
    if "CERTIFICATE_REQUIRED" in text or "certificate required" in text:
        return (f"TLS: {address.url} requires a client certificate (mutual TLS): enrol the device with "
                "`fedlora devices add ID --client-cert`")
    return f"TLS handshake with {address.url} failed: {text}"


class Link:
    """A connected MQTT client whose incoming messages land in :attr:`inbox` as (topic, payload).

    ``connect`` blocks until the first connection or raises: BrokerAuthError at once on bad
    credentials (no reconnect storm), BrokerTLSError at once on a TLS mistake, TimeoutError if
    the broker cannot be reached in time (``timeout_s=None``: keep trying, reporting the cause
    every 30 s through ``log``).  After that, paho reconnects with backoff capped at
    ``max_backoff_s`` and re-subscribes.  ``will``, if given, is called before every connection
    attempt for the Last Will (topic, payload), so each connection can carry its own.
    """

    def __init__(self, address: BrokerAddress, client_id: str, *, will=None, uplink_mbps: float | None = None,
                 max_backoff_s: float = 30.0, keepalive: int = 30, log=None):
        import paho.mqtt.client as mqtt

        self.address = address
        self.inbox: queue.Queue = queue.Queue()
        self.uplink_mbps = uplink_mbps
        self.log = log or (lambda _msg: None)
        self._subs: list[str] = []
        self._connected = threading.Event()
        self._fatal: Exception | None = None
        self._send_lock = threading.Lock()
        self._will = will
        self._early_drops = 0  # connections closed by the broker before it answered CONNECT
        self._answered = False  # the broker answered this connection's CONNECT (a refusal included)
        self.on_connect_hooks: list = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                        clean_session=False)
        if address.username is not None:
            c.username_pw_set(address.username, address.password)
        if address.tls:
            try:
                c.tls_set_context(_tls_context(address))
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise BrokerTLSError(f"TLS set-up for {address.url}: {exc}") from None
        self._arm_will(c)
        c.reconnect_delay_set(min_delay=1, max_delay=int(max_backoff_s))
        c.max_inflight_messages_set(20)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_pre_connect = lambda client, userdata: self._arm_will(client)
        self._client = c
        self._keepalive = keepalive

    def _arm_will(self, client) -> None:
        if self._will is not None:
            t, payload = self._will()
            client.will_set(t, payload, qos=1, retain=True)

    # paho callbacks (its network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if reason_code.value in (4, 5, 134, 135):  # bad user name or password / not authorised
                self._fatal = BrokerAuthError(f"broker {self.address.url} refused the connection: {reason_code}")
                client.disconnect()
                self._connected.set()
            else:  # "server unavailable" (a busy broker) and the like: paho tries again after its backoff
                self._answered = True
            return
        self._early_drops = 0
        for t in self._subs:
            client.subscribe(t, qos=1)
        for hook in self.on_connect_hooks:
            hook()
        self._connected.set()

    def _on_message(self, client, userdata, msg):
        import paho.mqtt.client as mqtt

        # Deliver only what matches a subscription: amqtt 0.12 has been seen handing a client other
        # topics' retained messages, and nothing on an unexpected topic should reach the handlers.
        if any(mqtt.topic_matches_sub(s, msg.topic) for s in self._subs):
            self.inbox.put((msg.topic, msg.payload))

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self._fatal:
            return  # a refused login: connect() reports it (clearing here would race with its wait)
        if not self._connected.is_set() and not self._answered:
            self._early_drops += 1
        self._answered = False
        self._connected.clear()

    def _cause_of_early_drops(self) -> str:
        return (f"{self.address.url} closed the connection {self._early_drops} time(s) before answering CONNECT"
                + ("" if self.address.tls else " (a plain connection to a TLS port? use mqtts://)"))

    def connect(self, timeout_s: float | None = 30.0) -> None:
        """Connect (see the class text); the first attempt runs here, so its error is ours to name."""
        start = time.monotonic()
        deadline = None if timeout_s is None else start + timeout_s
        cause, said, delay, resets = "", start, 0.5, 0
        while True:
            try:
                self._client.connect(self.address.host, self.address.port, keepalive=self._keepalive)
                break
            except ssl.SSLError as exc:
                raise BrokerTLSError(describe_tls_error(self.address, exc)) from None
            except (ssl.CertificateError, ValueError) as exc:
                raise BrokerTLSError(f"TLS: {exc}") from None
            except OSError as exc:
                if self.address.tls and isinstance(exc, (ConnectionResetError, ConnectionAbortedError)):
                    resets += 1  # the TCP connection was taken, the TLS handshake was not
                    if resets >= 3:
                        raise BrokerTLSError(f"TLS: {self.address.url} does not speak TLS on port {self.address.port}, "
                                             f"it seems (it reset the TLS handshake {resets} times): a plain MQTT "
                                             "port? use mqtt://") from None
                cause = (f"connection refused (nothing listening on {self.address.host}:{self.address.port}?)"
                         if isinstance(exc, ConnectionRefusedError) else
                         f"no answer ({exc.strerror or type(exc).__name__})" if isinstance(exc, (socket.timeout, TimeoutError))
                         else f"{exc.strerror or exc}")
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"could not reach the MQTT broker at {self.address.url} within {timeout_s:.0f} s: "
                                   f"{cause}")
            if now - said >= 30:
                self.log(f"still trying to reach the MQTT broker at {self.address.url}: {cause}")
                said = now
            time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - now)))
            delay = min(5.0, delay * 2)
        self._client.loop_start()
        said = time.monotonic()
        while not self._connected.wait(0.5) and not self._fatal:
            now = time.monotonic()
            if self._early_drops >= 3:
                self._client.loop_stop()
                raise BrokerTLSError(self._cause_of_early_drops())
            if deadline is not None and now >= deadline:
                self._client.loop_stop()
                raise TimeoutError(f"could not reach the MQTT broker at {self.address.url} within {timeout_s:.0f} s: "
                                   + (self._cause_of_early_drops() if self._early_drops else "no answer to CONNECT"))
            if now - said >= 30:
                self.log(f"still waiting for the MQTT broker at {self.address.url} to answer")
                said = now
        if self._fatal:
            self._client.loop_stop()
            raise self._fatal

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def subscribe(self, topic_filter: str) -> None:
        self._subs.append(topic_filter)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=1)

    def publish(self, topic_name: str, payload: bytes, *, retain: bool = False, timeout_s: float = 120.0,
                wait: bool = True):
        """Publish at QoS 1 and wait for the broker's PUBACK; the uplink cap (if any) is paid first.

        A connection lost on the way is waited out (paho reconnects) and the message sent again:
        at least once, as QoS 1 promises, so receivers must be idempotent (they are).  TimeoutError
        when no connection comes back within ``timeout_s``.  ``wait=False`` hands the message to
        paho (which delivers it at QoS 1) without waiting for the PUBACK: for messages whose loss
        the protocol recovers anyway (an ack: the device sends its update again), or that the
        caller waits for later (it gets paho's message info back, ``wait_for_publish`` on it).
        """
        deadline = time.monotonic() + timeout_s
        paid = False
        while True:
            if self._fatal:
                raise self._fatal
            if not self._connected.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"publish to {topic_name}: no connection to {self.address.url} "
                                   f"within {timeout_s:.0f} s")
            with self._send_lock:
                if self.uplink_mbps and not paid:
                    time.sleep(len(payload) * 8 / (self.uplink_mbps * 1e6))
                    paid = True
                info = self._client.publish(topic_name, payload, qos=1, retain=retain)
            if not wait:
                return info
            try:
                while not info.is_published():
                    if self._fatal:
                        raise self._fatal
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"publish to {topic_name} not acknowledged within {timeout_s:.0f} s")
                    info.wait_for_publish(0.5)
                return
            except (RuntimeError, ValueError):  # the connection dropped under this message: send it again
                time.sleep(0.2)

    def get(self, timeout_s: float):
        """The next (topic, payload), or None after ``timeout_s``."""
        if self._fatal:
            raise self._fatal
        try:
            return self.inbox.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
