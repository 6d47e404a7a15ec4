"""An MQTT broker (amqtt) that the coordinator starts itself, so a run needs no set-up: ``--broker
embedded``.  It runs in a process of its own (``python -m fedlora_edge.coordinator.broker``, started and
stopped by :class:`EmbeddedBroker`): the coordinator's MQTT client (paho) waits on its socket with
``select()``, which cannot watch a descriptor above 1023, so the process that holds every device's
connection must not be the coordinator's.  The broker's process waits with epoll, raises its limit
of open files as far as the system allows, and exits as soon as the coordinator's process is gone.

It is closed by default:

- **authentication** from the device registry (:mod:`.registry`): the coordinator and each active
  enrolled device log in with their own password; anonymous and unknown clients are refused;
  a revoked device is refused at its next connection and its publishes are dropped at once
  (the registry file is read again whenever it changes);
- **the MQTT client id is bound to the user name**, before the broker looks up any session: a
  client cannot take over (or delete) another's session by using its id.  (amqtt looks sessions
  up before it authenticates; the binding is done as the CONNECT is read, see ``_Handler``);
- **per-device topic ACLs**: a device publishes only ``fedlora/<run>/dev/<its id>/{hello,status,
  up,event}``, subscribes and receives only its own ``down`` and ``ack`` and the runs' ``round``,
  never with a wildcard; its Last Will may only be its own ``status``.  The coordinator of run
  ``R`` (user ``coordinator@R``) may use every ``fedlora/R/`` topic, the registry-wide
  ``coordinator`` every ``fedlora/`` topic;
- **TLS** with ``tls_cert``/``tls_key`` (``fedlora coordinator --tls-cert --tls-key``, or
  ``emulate --tls``, which issues a certificate from the registry's CA).

It is bounded against clients that misbehave or vanish (amqtt 0.12 bounds none of this itself):

- a connection that has not sent a whole CONNECT within ``CONNECT_TIMEOUT_S`` (the TLS handshake
  included), or whose CONNECT is larger than ``MAX_CONNECT_BYTES``, is closed;
- at most ``MAX_PENDING`` connections may be waiting for their CONNECT: a new one beyond that
  closes the *oldest* waiting one, so a flood of idle sockets cannot lock devices out (a device's
  CONNECT follows its TCP handshake at once; a flooder's sockets are the old ones).  The one
  closed is told "server unavailable" (a CONNACK with return code 3) first: when a whole fleet
  connects at once it is a device whose CONNECT the broker had no time to read, and it retries;
- at most ``MAX_CONNECTIONS`` connections in all (fewer where the open-file limit is lower): one
  more is closed at once, before it costs anything;
- a packet larger than ``MAX_PACKET_BYTES`` (2 MiB, what ``fedlora broker-config`` sets on
  Mosquitto and EMQX) ends its connection before its body is read;
- **keepalive** (MQTT 3.1.1 section 3.1.2.10): a client that sends nothing at all for 1.5 times the
  keepalive of its CONNECT (a frozen process, a link half-open after a power loss, a packet cut
  off half-way) is disconnected and its Last Will is published, as for any connection lost
  without a DISCONNECT.  Keepalive 0 means none, as the standard says;
- a refused login leaves nothing behind (amqtt 0.12 kept its session, as connected, for ever);
  every refused or failed connection is closed.

``insecure=True`` (``--insecure-broker``) opens it to anyone, for development only, and says so
loudly.  For anything beyond one machine a real broker works the same way
(``fedlora broker-config mosquitto|emqx``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from fedlora_edge.core.mqtt import BrokerAddress

from .brokerconf import MAX_PACKET_BYTES
from .registry import Registry, coordinator_scope

DEVICE_PUBLISH = re.compile(r"^fedlora/[^/+#]+/dev/(?P<dev>[^/+#]+)/(hello|status|up|event)$")
DEVICE_RECEIVE = re.compile(r"^fedlora/[^/+#]+/(round|dev/(?P<dev>[^/+#]+)/(down|ack))$")
INSECURE_WARNING = ("WARNING: the embedded broker is OPEN (--insecure-broker): anyone who can reach it can read "
                    "every message and publish on every topic. Messages are still signed and checked, but use "
                    "this for development on a closed machine only.")
CONNECT_TIMEOUT_S = 5.0     # from the TCP accept to a whole CONNECT (a device sends it at once; TLS included)
CONNACK_SERVER_UNAVAILABLE = b"\x20\x02\x00\x03"  # what a connection turned away by MAX_PENDING is told
MAX_PENDING = 256           # connections accepted and still waiting for their CONNECT
MAX_CONNECTIONS = 10000     # in all, lowered to what the open-file limit leaves room for
MAX_CONNECT_BYTES = 64 * 1024  # a CONNECT (ids, password, the Last Will) is well under 1 KiB from our clients
KEEPALIVE_FACTOR = 1.5      # MQTT 3.1.1 section 3.1.2.10: silent for 1.5x the keepalive is gone
CLOSE_TIMEOUT_S = 2.0       # flushing a closing connection: a peer that reads nothing is cut off after it
FD_RESERVE = 64             # descriptors kept free of connections (the registry file, the listener, TLS files)
BACKLOG = 1024              # the listener's queue of connections not yet accepted (a fleet reconnecting at once)
START_TIMEOUT_S = 120.0     # the broker's process has this long to bind its listener
WIND_DOWN_S = 5.0           # on stop, how long the connections still open may take to finish

log = logging.getLogger(__name__)


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of source ports for outgoing connections (Linux; the usual default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port for a broker to listen on, outside the ephemeral range.

    A port handed out by ``bind(0)`` lies inside the range the kernel draws source ports from, so
    while the broker is not yet listening (starting, or restarting after a crash) a device that
    retries its connection can be given that very port as its own source port and connect to
    itself, and then the broker cannot bind.  A port outside the range is never a source port."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(20000, 32768) if not low <= p <= high] or list(range(1024, 65536))
    pick = secrets.SystemRandom()
    for _ in range(200):
        port = pick.choice(candidates)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port on {host} outside the ephemeral range {low}-{high}")


def device_may(action: str, device: str, topic_name: str) -> bool:
    """The embedded broker's ACL for an enrolled device (see the module text)."""
    if action == "publish":
        m = DEVICE_PUBLISH.match(topic_name)
        return m is not None and m.group("dev") == device
    m = DEVICE_RECEIVE.match(topic_name)  # subscribe (a filter: no wildcard may pass) and receive
    return m is not None and m.group("dev") in (None, device)


@dataclass
class _PluginConfig:
    registry: str = ""


class RegistryAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):
    """amqtt authentication and topic plugin over the registry (amqtt loads it by dotted path,
    and takes only subclasses of its plugin bases)."""

    Config = _PluginConfig

    def __init__(self, context):
        super().__init__(context)
        self.registry = Registry(context.config.registry)

    async def authenticate(self, *, session) -> bool:
        ok = bool(session.username) and session.client_id == session.username and \
            self.registry.check_login(session.username, session.password)
        if not ok:
            self.context.logger.info(f"refused a connection as {session.username!r}")
        return ok

    async def topic_filtering(self, *, session=None, topic=None, action=None) -> bool:
        user = session.username if session else None
        if not user or not topic:
            return False
        scope = coordinator_scope(user)  # 'fedlora/R/' for coordinator@R, 'fedlora/' for the registry-wide one
        if scope is not None:
            return topic.startswith(scope)
        if self.registry.active(user) is None:
            return False
        return device_may(getattr(action, "value", str(action)), user, topic)

    async def close(self) -> None:
        return None


def _stream_adapters():
    """The connection's reader and writer (amqtt's asyncio adapters, bounded): see the module text."""
    from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
    from amqtt.errors import NoDataError

    class _Reader(StreamReaderAdapter):
        """Reads a CONNECT within a deadline and a byte budget.  After it, gives up (TimeoutError, which
        amqtt's reader loop hands to ``handle_read_timeout``) when no byte at all comes for ``idle`` s,
        and follows the packets' fixed headers so that one larger than ``MAX_PACKET_BYTES`` ends the
        connection (NoDataError, which amqtt takes for a lost connection) before its body is read."""

        def __init__(self, reader: asyncio.StreamReader, connect_timeout_s: float):
            super().__init__(reader)
            self.deadline: float | None = asyncio.get_running_loop().time() + connect_timeout_s
            self.budget = MAX_CONNECT_BYTES
            self.idle: float | None = None
            self._body_left = 0         # bytes of the current packet's body still to come
            self._length: int | None = None  # the remaining length being decoded (None: not in a header's)
            self._shift = 0

        def connected(self, keep_alive_s: float) -> None:
            """The CONNECT was read: from now on only silence or an oversized packet ends the connection."""
            self.deadline = None
            self.idle = keep_alive_s if keep_alive_s > 0 else None

        def _follow(self, data: bytes) -> None:
            i, n = 0, len(data)
            while i < n:
                if self._body_left:
                    step = min(self._body_left, n - i)
                    self._body_left -= step
                    i += step
                elif self._length is None:  # a packet's first byte: its type and flags
                    self._length, self._shift = 0, 0
                    i += 1
                else:  # MQTT's variable-length remaining length, 7 bits a byte
                    b = data[i]
                    i += 1
                    self._length |= (b & 0x7F) << self._shift
                    self._shift += 7
                    if not b & 0x80 or self._shift >= 28:
                        length, self._length = self._length, None
                        size = 1 + self._shift // 7 + length
                        if size > MAX_PACKET_BYTES:
                            raise NoDataError(f"a packet of {size} bytes (at most {MAX_PACKET_BYTES})")
                        self._body_left = length

        async def read(self, n: int = -1) -> bytes:
            if self.deadline is not None:
                left = self.deadline - asyncio.get_running_loop().time()
                if n < 0 or n > self.budget or left <= 0:
                    raise NoDataError("no CONNECT within the time and size allowed")
                self.budget -= n
                try:
                    return await asyncio.wait_for(self._reader.readexactly(n), left)
                except asyncio.TimeoutError:
                    raise NoDataError("no CONNECT within the time allowed") from None
            if n < 0:
                return await super().read(n)
            if self.idle is None:
                data = await self._reader.readexactly(n)
            else:
                # in pieces, each with its own timer: "silent" means no byte at all, however slowly a
                # large packet trickles in over a thin link; a packet cut off half-way times out like silence
                parts: list[bytes] = []
                left = n
                while left:
                    got = await asyncio.wait_for(self._reader.read(left), self.idle)
                    if not got:
                        raise asyncio.IncompleteReadError(b"".join(parts), n)
                    parts.append(got)
                    left -= len(got)
                data = parts[0] if len(parts) == 1 else b"".join(parts)
            self._follow(data)
            return data

    class _Writer(StreamWriterAdapter):
        """amqtt's close waits for the peer to take what is still buffered, for ever if it reads nothing
        (a frozen device): here that wait is bounded, then the connection is cut."""

        async def close(self) -> None:
            if self.is_closed:
                return
            try:
                await asyncio.wait_for(super().close(), CLOSE_TIMEOUT_S)
            except asyncio.CancelledError:
                self.abort()
                raise
            except Exception:  # noqa: BLE001 - a timeout, a reset: the connection is cut either way
                self.abort()

        def abort(self) -> None:
            self.is_closed = True
            self._writer.transport.abort()

        def busy(self) -> None:
            """Turn away a connection whose CONNECT was not read yet: a CONNACK "server unavailable"
            (MQTT 3.1.1 return code 3; four bytes, whatever the client sent) and the close.  A client
            told so retries with its backoff; one cut off without a word could take the close for a
            mistake of its own (a plain connection to a TLS port) and give up."""
            self.is_closed = True
            transport = self._writer.transport
            try:
                transport.write(CONNACK_SERVER_UNAVAILABLE)
            finally:
                transport.close()

    return _Reader, _Writer


def _install_handler() -> None:
    """Make amqtt build its connection handlers from ``_Handler`` (this is the broker's own process)."""
    import amqtt.broker as ab
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    if getattr(ab.BrokerProtocolHandler, "fedlora", False):
        return

    class _Handler(BrokerProtocolHandler):
        """Binds the client id to the user name as the CONNECT is read (before amqtt looks sessions
        up), and ends a connection that went silent (amqtt 0.12 ignores the read timeout)."""

        fedlora = True

        @classmethod
        async def init_from_connect(cls, reader, writer, plugins_manager, loop=None):
            handler, session = await super().init_from_connect(reader, writer, plugins_manager, loop)
            broker = getattr(plugins_manager.app_context, "_broker_instance", None)
            bind = getattr(broker, "fedlora_bind", None)
            if bind is not None:
                bind(session)
            return handler, session

        def handle_read_timeout(self) -> None:
            # Nothing came for 1.5x the keepalive: the client is gone without a DISCONNECT.  Ending the
            # wait for a disconnect with None is what a lost connection does: the broker publishes the
            # Last Will and stops this handler, which closes the socket.
            waiter = self._disconnect_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    ab.BrokerProtocolHandler = _Handler


def _binder(registry: Registry):
    """As the CONNECT is read: a valid login gets its user name as client id; anything else a random
    one (it is refused later, and can touch no one's session); a Last Will that is not the device's
    own status topic is a refusal too."""

    def bind(session) -> None:
        ok = registry.check_login(session.username, session.password)
        if ok and coordinator_scope(session.username) is None and session.will_flag and not (
                device_may("publish", session.username, session.will_topic or "")
                and (session.will_topic or "").endswith("/status")):
            ok = False
        if ok:
            session.client_id = session.username
        else:
            session.client_id = f"refused-{secrets.token_hex(8)}"
            session.clean_session = True
            session.username = None

    return bind


class _CopyOnIterate(dict):
    """amqtt 0.12 iterates its subscriptions across awaits while a new subscription can change them,
    and loses that message ("dictionary changed size during iteration"): iterate over a copy.  It
    also keeps the filters with wildcards apart, so a message is matched against its own topic's
    filter and those, not against every device's (:meth:`candidates`)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.wild = {k for k in self if "+" in k or "#" in k}

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if "+" in key or "#" in key:
            self.wild.add(key)

    def __delitem__(self, key):
        super().__delitem__(key)
        self.wild.discard(key)

    def pop(self, key, *default):
        self.wild.discard(key)
        return super().pop(key, *default)

    def clear(self):
        super().clear()
        self.wild.clear()

    def items(self):
        return list(super().items())

    def __iter__(self):
        return iter(list(super().keys()))

    def candidates(self, topic_name: str) -> list:
        """(filter, subscriptions) that can match ``topic_name``: its exact filter and the wildcard ones."""
        keys = ([topic_name] if dict.__contains__(self, topic_name) else []) + sorted(self.wild)
        return [(k, dict.__getitem__(self, k)) for k in keys if dict.__contains__(self, k)]


def _broker_class():
    from functools import partial

    from amqtt.broker import Broker
    from amqtt.contexts import Action, ListenerType
    from amqtt.events import BrokerEvents
    from amqtt.mqtt.disconnect import DisconnectPacket

    _Reader, _Writer = _stream_adapters()

    class _Broker(Broker):
        """amqtt 0.12's broker with the limits of the module text and the fixes named below.  Set
        ``fedlora_bind`` (see :func:`_binder`), ``connect_timeout_s``, ``max_pending`` and
        ``max_connections`` before ``start``."""

        fedlora_bind = None
        connect_timeout_s = CONNECT_TIMEOUT_S
        max_pending = MAX_PENDING
        max_connections = MAX_CONNECTIONS

        def fedlora_init(self) -> None:
            self._subscriptions: _CopyOnIterate = _CopyOnIterate(self._subscriptions)
            self.fedlora_pending: collections.OrderedDict = collections.OrderedDict()  # writer -> None, oldest first
            self.fedlora_open = 0
            self.fedlora_idle = asyncio.Event()  # set while no connection is open
            self.fedlora_idle.set()

        async def _create_server_instance(self, listener_name, listener_type, address, port, ssl_context):
            if listener_type != ListenerType.TCP:
                return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
            # amqtt's, with a queue long enough for a fleet reconnecting at once, and a TLS handshake
            # held to the CONNECT's time (asyncio's default waits 60 s for a silent socket)
            return await asyncio.start_server(
                partial(self.stream_connected, listener_name=listener_name), address, port, reuse_address=True,
                ssl=ssl_context, backlog=BACKLOG, ssl_handshake_timeout=self.connect_timeout_s if ssl_context else None)

        async def stream_connected(self, reader, writer, listener_name) -> None:
            await self._client_connected(listener_name, _Reader(reader, self.connect_timeout_s), _Writer(writer))

        async def _client_connected(self, listener_name, reader, writer) -> None:
            """One connection, from accept to close.  Whatever a client sends, its connection ends
            and nothing escapes: the writer is closed on every path (amqtt 0.12 left it open when
            the CONNECT could not be read)."""
            if self.fedlora_open >= self.max_connections:
                writer.abort()
                return
            self.fedlora_open += 1
            self.fedlora_idle.clear()
            self.fedlora_pending[writer] = None
            if len(self.fedlora_pending) > self.max_pending:
                oldest, _ = self.fedlora_pending.popitem(last=False)
                oldest.busy()  # told to come back later; its CONNECT read ends (NoDataError) and closes it
            try:
                await super()._client_connected(listener_name, reader, writer)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - garbage from a client ends its connection, nothing else
                log.debug("connection ended: %r", exc)
            finally:
                self.fedlora_pending.pop(writer, None)
                await writer.close()
                self.fedlora_open -= 1
                if not self.fedlora_open:
                    self.fedlora_idle.set()

        async def _initialize_client_session(self, reader, writer, remote_address, remote_port):
            try:
                handler, session = await super()._initialize_client_session(reader, writer, remote_address,
                                                                             remote_port)
            finally:
                self.fedlora_pending.pop(writer, None)
            # amqtt waits keep_alive seconds for each packet and ignores the timeout; the allowance is
            # 1.5x (MQTT 3.1.1 section 3.1.2.10), and ``_Handler.handle_read_timeout`` acts on it
            session.keep_alive = session.keep_alive * KEEPALIVE_FACTOR if session.keep_alive > 0 else 0
            if isinstance(reader, _Reader):
                reader.connected(session.keep_alive)
            return handler, session

        async def _delete_session(self, client_id) -> None:
            """A clean session replaces the one of its id: amqtt 0.12 forgot the old one but left its
            connection open (MQTT 3.1.1 section 3.1.4 says to close it); it is ended here as a lost one
            (its Will goes out) before it is forgotten."""
            session, handler = self._sessions.get(client_id, (None, None))
            if handler is not None and session.transitions.is_connected():
                handler.fedlora_taken_over = True
                await handler.handle_connection_closed()
                await handler.stop()
            await super()._delete_session(client_id)

        async def _handle_client_session(self, reader, writer, client_session, handler, server, listener_name):
            """amqtt 0.12's, changed where it went wrong:

            - a refused login is answered and closed without its session ever being registered (amqtt
              kept it, as connected, for ever: memory that anyone could grow);
            - the Last Will published when a connection is lost is the one that connection carried
              (amqtt copied the new connection's Will onto a taken-over session first, and published
              that: a device that reconnected was reported offline in its new session);
            - a taken-over connection does not mark the session disconnected under its new connection;
            - a connection whose message loop ends without a disconnect being handled (an invalid
              topic, an error) is ended as a lost one: Will published, handler stopped;
            - at connection, retained messages are sent for the session's own subscriptions (amqtt sent
              them for every filter of every client, a cost growing with the square of the fleet).
            """
            authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
            if not authenticated or not client_session.client_id:
                handler.attach(client_session, reader, writer)
                await handler.mqtt_connack_authorize(False)
                return  # the caller closes the connection
            if client_session.transitions.is_connected():
                _, old = self._sessions.get(client_session.client_id, (None, None))
                if old is not None:
                    old.fedlora_taken_over = True
                    await old.handle_connection_closed()
                    await old.stop()
            else:
                client_session.transitions.connect()
            handler.fedlora_will = ((client_session.will_topic, client_session.will_message, client_session.will_qos,
                                     client_session.will_retain) if client_session.will_flag else None)
            handler.attach(client_session, reader, writer)
            self._sessions[client_session.client_id] = (client_session, handler)
            try:
                await handler.mqtt_connack_authorize(True)
                await self.plugins_manager.fire_event(BrokerEvents.CLIENT_CONNECTED, client_id=client_session.client_id,
                                                      client_session=client_session)
                await handler.start()
                await self._publish_session_retained_messages(client_session)
                if client_session.parent:  # a session that existed: its subscriptions stayed with it
                    for a_filter, subscriptions in self._subscriptions.items():
                        for sub_session, qos in list(subscriptions):
                            if sub_session is client_session:
                                await self._publish_retained_messages_for_subscription((a_filter, qos),
                                                                                       client_session)
                await self._client_message_loop(client_session, handler)
            finally:
                _, current = self._sessions.get(client_session.client_id, (None, None))
                if current is handler and client_session.transitions.is_connected() \
                        and not getattr(handler, "fedlora_taken_over", False):
                    lost = asyncio.get_running_loop().create_future()
                    lost.set_result(None)
                    await self._handle_disconnect(client_session, handler, lost)

        async def _handle_disconnect(self, client_session, handler, disconnect_waiter) -> None:
            """amqtt 0.12's, with the Will that this connection carried (see ``_handle_client_session``),
            published at most once, and a taken-over session left connected."""
            result = disconnect_waiter.result()
            will, handler.fedlora_will = getattr(handler, "fedlora_will", None), None
            if will is not None and not isinstance(result, DisconnectPacket):
                topic_name, message, qos, retain = will
                await self._broadcast_message(client_session, topic_name, message, qos)
                if retain:
                    await self.retain_message(client_session, topic_name, message, qos)
            await self._stop_handler(handler)
            if getattr(handler, "fedlora_taken_over", False):
                return
            if client_session.transitions.is_connected():
                client_session.transitions.disconnect()
            await self.plugins_manager.fire_event(BrokerEvents.CLIENT_DISCONNECTED,
                                                  client_id=client_session.client_id, client_session=client_session)

        async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
            """amqtt 0.12 sends what matches, unchecked: a device would receive others' retained
            hellos.  Here each retained message goes only where the receive ACL allows."""
            topic_filter, qos = subscription
            tasks = []
            for t, retained in list(self._retained_messages.items()):
                if self._matches(t, topic_filter) and await self._topic_filtering(session, t, Action.RECEIVE):
                    handler = self._get_handler(session)
                    if handler:
                        tasks.append(asyncio.ensure_future(
                            handler.mqtt_publish(retained.topic, retained.data, min(qos, retained.qos or qos),
                                                 retain=True)))
            if tasks:
                await asyncio.wait(tasks)

        async def _run_broadcast(self, running_tasks) -> None:
            """amqtt 0.12's broadcast, the same steps, but over the filters that can match the topic
            (:meth:`_CopyOnIterate.candidates`): it matched every filter of every client against
            every message, which grows with the square of the fleet."""
            from amqtt.mqtt.constants import QOS_1, QOS_2

            broadcast = await self._broadcast_queue.get()
            subs = self._subscriptions
            pairs = subs.candidates(broadcast["topic"]) if isinstance(subs, _CopyOnIterate) else subs.items()
            for k_filter, subscriptions in pairs:
                if not self._matches(broadcast["topic"], k_filter):
                    continue
                for target_session, sub_qos in list(subscriptions):
                    qos = broadcast.get("qos", sub_qos)
                    if not await self._topic_filtering(target_session, topic=broadcast["topic"], action=Action.RECEIVE):
                        continue
                    if (target_session.transitions.state != "connected" and not target_session.clean_session
                            and qos in (QOS_1, QOS_2) and not target_session.is_anonymous):
                        await self._retain_broadcast_message(broadcast, qos, target_session)
                        continue
                    if target_session.transitions.state != "connected":
                        continue
                    handler = self._get_handler(target_session)
                    if handler:
                        running_tasks.append(asyncio.ensure_future(
                            handler.mqtt_publish(broadcast["topic"], broadcast["data"], qos, retain=False)))

    return _Broker


# --------------------------------------------------------------------------- the broker's own process


def _raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit where the system allows;
    returns the soft limit in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (hard, 1 << 20, 65536):  # an unlimited hard limit is refused by some systems: ask less
        if want == resource.RLIM_INFINITY or want <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError):
            continue
    return soft


def _follow_parent(parent: int, loop: asyncio.AbstractEventLoop, broker) -> None:
    """End this process with the coordinator's.  Standard input is a pipe whose other end only the
    parent holds: a ``stop`` line on it (``EmbeddedBroker.stop``) winds the broker down (see
    ``_wind_down``); EOF without it means the parent is gone, and this process exits at once (a
    coordinator started again with ``--resume`` binds the same port).  A process the parent forked
    could still hold that end, so the parent's id is watched as well."""

    def on_input() -> None:
        try:
            for line in sys.stdin.buffer:
                if line.strip() == b"stop":
                    asyncio.run_coroutine_threadsafe(_wind_down(broker), loop)
                    return
        except (OSError, ValueError):
            pass
        os._exit(0)  # the sockets close with the process; there is nobody left to shut down for

    def on_orphan() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=on_input, name="parent-input", daemon=True).start()
    threading.Thread(target=on_orphan, name="parent-id", daemon=True).start()


async def _wind_down(broker) -> None:
    """Stop accepting (the port is free at once), let the connections still open finish for up to
    ``WIND_DOWN_S`` (at a run's end the devices, told it is done, clear their retained messages and
    disconnect: cut off before their PUBACK, each would wait for a broker that is gone), then exit."""
    for server in list(broker._servers.values()):
        if server.instance is not None:
            server.instance.close()
    try:
        await asyncio.wait_for(broker.fedlora_idle.wait(), WIND_DOWN_S)
    except asyncio.TimeoutError:
        pass
    os._exit(0)


def _say(line: str) -> None:
    """One status line to the parent on standard output, which is then closed: nothing else is written
    there, so the pipe can never fill."""
    os.write(1, (line.replace("\n", " ") + "\n").encode())
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def serve(argv: list[str] | None = None) -> int:
    """``python -m fedlora_edge.coordinator.broker``: run the broker until the parent closes standard input or dies.
    Prints ``ready`` once the listener is bound, or ``error: <why>`` and exits 1."""
    p = argparse.ArgumentParser(prog="python -m fedlora_edge.coordinator.broker",
                                description="the embedded MQTT broker's own process (EmbeddedBroker starts it)")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--registry", help="the device registry folder (absent: --insecure)")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S)
    p.add_argument("--max-pending", type=int, default=MAX_PENDING)
    args = p.parse_args(argv)
    parent = os.getppid()
    # Ctrl-C reaches the whole process group: the coordinator handles it and stops this process itself
    # when it is done (it may still publish on the way out)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("amqtt", "transitions", "asyncio"):  # one line per refused or broken client is noise
        logging.getLogger(name).setLevel(logging.CRITICAL)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        fd_limit = _raise_fd_limit()
        listener = {"type": "tcp", "bind": f"{args.host}:{args.port}", "max_connections": -1}
        if args.tls_cert:
            listener.update({"ssl": True, "certfile": args.tls_cert, "keyfile": args.tls_key})
        if args.insecure:
            plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        else:
            plugins = {"fedlora_edge.coordinator.broker.RegistryAuthPlugin": {"registry": args.registry}}
        _install_handler()
        broker = _broker_class()({"listeners": {"default": listener}, "plugins": plugins}, loop=loop)
        broker.fedlora_init()
        if not args.insecure:
            broker.fedlora_bind = _binder(Registry(args.registry))
        broker.connect_timeout_s = args.connect_timeout
        broker.max_pending = max(1, args.max_pending)
        broker.max_connections = max(1, min(MAX_CONNECTIONS, fd_limit - FD_RESERVE))
        loop.run_until_complete(broker.start())
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        _say(f"error: {exc}")
        return 1
    _follow_parent(parent, loop, broker)
    _say("ready")
    loop.run_forever()
    return 0


class EmbeddedBroker:
    """``with EmbeddedBroker(registry=...) as b: ... b.address`` runs the broker (see the module text)
    in a child process.

    ``start`` returns once the child's listener is bound; it raises RuntimeError with the child's
    reason when it cannot start (a port taken, an unreadable certificate), FileNotFoundError for a
    missing TLS file.  ``stop`` ends the child: it stops accepting, gives the connections still open
    up to ``WIND_DOWN_S`` to finish, and exits (killed if it has not 10 s later); the child exits
    at once by itself when this process dies.  ``connect_timeout_s`` and ``max_pending``: see
    ``CONNECT_TIMEOUT_S`` and ``MAX_PENDING``.  ``log`` gets the insecure-mode warning and a line if
    the child exits while it should be serving."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, registry: Registry | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None, insecure: bool = False,
                 log=print, connect_timeout_s: float = CONNECT_TIMEOUT_S, max_pending: int = MAX_PENDING):
        if registry is None and not insecure:
            raise ValueError("the embedded broker needs the device registry (or insecure=True for development)")
        self.host, self.port = host, port or free_port(host)
        self.registry, self.insecure, self.log = registry, insecure, log
        self.tls = (str(tls_cert), str(tls_key)) if tls_cert else None
        self.connect_timeout_s, self.max_pending = connect_timeout_s, max_pending
        self._proc: subprocess.Popen | None = None
        self._stopping = False

    @property
    def address(self) -> BrokerAddress:
        """Where a client on this machine reaches the broker: a wildcard bind (``0.0.0.0``, ``::``)
        on the loopback address, which a TLS certificate can name (``broker-config`` names
        127.0.0.1) and ``0.0.0.0`` cannot."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return BrokerAddress(host, self.port, tls=self.tls is not None)

    @property
    def pid(self) -> int | None:
        """The broker process's id (None before ``start``)."""
        return self._proc.pid if self._proc else None

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-m", "fedlora_edge.coordinator.broker", "--host", self.host, "--port", str(self.port),
               "--connect-timeout", str(self.connect_timeout_s), "--max-pending", str(self.max_pending)]
        if self.insecure:
            cmd.append("--insecure")
        else:
            assert self.registry is not None, "only an insecure broker has no registry (__init__)"
            cmd += ["--registry", str(self.registry.folder)]
        if self.tls:
            cmd += ["--tls-cert", self.tls[0], "--tls-key", self.tls[1]]
        return cmd

    def start(self) -> EmbeddedBroker:
        if self.tls:
            for f in self.tls:
                if not Path(f).is_file():
                    raise FileNotFoundError(f"TLS file {f} not found (--tls-cert / --tls-key)")
        if self.insecure:
            self.log(INSECURE_WARNING)
        # the child imports this very copy of the code, whatever else is installed
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self._stopping = False
        proc = self._proc = subprocess.Popen(self._command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        stdout = proc.stdout
        assert stdout is not None, "stdout is a pipe"
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        where = f"{self.host}:{self.port}"
        try:
            line = lines.get(timeout=START_TIMEOUT_S).decode(errors="replace").strip()
        except queue.Empty:
            self._end()
            raise RuntimeError(f"the embedded MQTT broker did not start on {where} within {START_TIMEOUT_S:.0f} s") \
                from None
        if line != "ready":
            self._end()
            why = line[len("error:"):].strip() if line.startswith("error:") else \
                f"its process exited with code {proc.returncode} (its error is above)"
            raise RuntimeError(f"the embedded MQTT broker could not start on {where}: {why}")
        threading.Thread(target=self._watch, name="fedlora-broker-watch", daemon=True).start()
        return self  # its listener is bound and serving: clients may come

    def _watch(self) -> None:
        proc = self._proc
        assert proc is not None, "start() runs the process before it watches it"
        code = proc.wait()
        if not self._stopping and proc is self._proc:
            self.log(f"the embedded MQTT broker (process {proc.pid}) exited with code {code}: devices cannot reach "
                     "the coordinator")

    def _end(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        assert proc.stdin is not None and proc.stdout is not None, "start() opens both as pipes"
        try:
            proc.stdin.write(b"stop\n")  # wind down (EOF alone: exit at once, as when this process dies)
            proc.stdin.close()
        except (OSError, ValueError):  # it is gone already, or this is the second stop
            pass
        try:
            proc.wait(WIND_DOWN_S + 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def stop(self) -> None:
        self._end()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    # run as the module's proper name, so that amqtt's plugin path names the same classes
    from fedlora_edge.coordinator.broker import serve as _serve

    sys.exit(_serve())
