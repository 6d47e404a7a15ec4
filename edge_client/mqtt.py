"""MQTT plumbing shared by the edge client and the coordinator: broker URLs, topic names, and a
small blocking link over paho-mqtt (QoS 1, Last Will, capped reconnect backoff, an inbox queue,
an optional bandwidth cap).  The topics and messages are specified in docs/protocol.md.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

TOPIC_ROOT = "fedlora"


class BrokerAuthError(RuntimeError):
    """The broker refused our credentials: retrying would not help, so the link stops."""


class LinkClosed(RuntimeError):
    """The link was closed (or failed for good) while waiting."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(url: str, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None) -> BrokerAddress:
    """``mqtt://[user:pass@]host[:port]`` or ``mqtts://...`` (TLS); flags override the URL's user."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not u.hostname:
        raise ValueError(f"broker URL '{url}': expected mqtt://host:port or mqtts://host:port")
    tls = u.scheme in ("mqtts", "ssl")
    return BrokerAddress(u.hostname, u.port or (8883 if tls else 1883), tls,
                         username if username is not None else (unquote(u.username) if u.username else None),
                         password if password is not None else (unquote(u.password) if u.password else None),
                         ca_file)


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


class Link:
    """A connected MQTT client whose incoming messages land in :attr:`inbox` as (topic, payload).

    ``connect`` blocks until the first connection or raises: BrokerAuthError at once on bad
    credentials (no reconnect storm), TimeoutError if the broker cannot be reached in time.
    After that, paho reconnects with backoff capped at ``max_backoff_s`` and re-subscribes.
    """

    def __init__(self, address: BrokerAddress, client_id: str, *, will: tuple[str, bytes] | None = None,
                 uplink_mbps: float | None = None, max_backoff_s: float = 30.0, keepalive: int = 30):
        import paho.mqtt.client as mqtt

        self.address = address
        self.inbox: queue.Queue = queue.Queue()
        self.uplink_mbps = uplink_mbps
        self._subs: list[str] = []
        self._connected = threading.Event()
        self._fatal: Exception | None = None
        self._send_lock = threading.Lock()
        self.on_connect_hooks: list = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                        clean_session=False)
        if address.username is not None:
            c.username_pw_set(address.username, address.password)
        if address.tls:
            c.tls_set(ca_certs=address.ca_file)
        if will:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=int(max_backoff_s))
        c.max_inflight_messages_set(20)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c
        self._keepalive = keepalive

    # paho callbacks (its network thread)
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if reason_code.value in (4, 5, 134, 135):  # bad user name or password / not authorised
                self._fatal = BrokerAuthError(f"broker {self.address.url} refused the connection: {reason_code}")
                client.disconnect()
                client.loop_stop()
                self._connected.set()
            return
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
        self._connected.clear()

    def connect(self, timeout_s: float = 30.0) -> None:
        self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive)
        self._client.loop_start()
        if not self._connected.wait(timeout_s):
            self._client.loop_stop()
            raise TimeoutError(f"could not reach the MQTT broker at {self.address.url} within {timeout_s:.0f} s")
        if self._fatal:
            raise self._fatal

    def subscribe(self, topic_filter: str) -> None:
        self._subs.append(topic_filter)
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=1)

    def publish(self, topic_name: str, payload: bytes, *, retain: bool = False, timeout_s: float = 120.0) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK; the uplink cap (if any) is paid first.

        A connection lost on the way is waited out (paho reconnects) and the message sent again:
        at least once, as QoS 1 promises, so receivers must be idempotent (they are).
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
            return self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
