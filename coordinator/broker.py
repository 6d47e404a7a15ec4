"""An MQTT broker in the coordinator's process (amqtt), so a run needs no set-up: ``--broker
embedded``.  It is closed by default:

- **authentication** from the device registry (:mod:`.registry`): the coordinator and each active
  enrolled device log in with their own password; anonymous and unknown clients are refused;
  a revoked device is refused at its next connection and its publishes are dropped at once;
- **the MQTT client id is bound to the user name**, before the broker looks up any session: a
  client cannot take over (or delete) another's session by using its id.  (amqtt looks sessions
  up before it authenticates; the binding is done as the CONNECT is read, see ``_Binding``);
- **per-device topic ACLs**: a device publishes only ``fedlora/<run>/dev/<its id>/{hello,status,
  up,event}``, subscribes and receives only its own ``down`` and ``ack`` and the runs' ``round``,
  never with a wildcard; its Last Will may only be its own ``status``.  The coordinator may use
  every ``fedlora/`` topic;
- **TLS** with ``tls_cert``/``tls_key`` (``fedlora coordinator --tls-cert --tls-key``, or
  ``emulate --tls``, which issues a certificate from the registry's CA).

``insecure=True`` (``--insecure-broker``) opens it to anyone, for development only, and says so
loudly.  For anything beyond one machine a real broker works the same way
(``fedlora broker-config mosquitto|emqx``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from edge_client.mqtt import BrokerAddress

from .registry import COORDINATOR_ID, Registry

DEVICE_PUBLISH = re.compile(r"^fedlora/[^/+#]+/dev/(?P<dev>[^/+#]+)/(hello|status|up|event)$")
DEVICE_RECEIVE = re.compile(r"^fedlora/[^/+#]+/(round|dev/(?P<dev>[^/+#]+)/(down|ack))$")
INSECURE_WARNING = ("WARNING: the embedded broker is OPEN (--insecure-broker): anyone who can reach it can read "
                    "every message and publish on every topic. Messages are still signed and checked, but use "
                    "this for development on a closed machine only.")


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
        return bool(m) and m.group("dev") == device
    m = DEVICE_RECEIVE.match(topic_name)  # subscribe (a filter: no wildcard may pass) and receive
    return bool(m) and m.group("dev") in (None, device)


def _plugin_bases():
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

    return BaseAuthPlugin, BaseTopicPlugin


@dataclass
class _PluginConfig:
    registry: str = ""


class RegistryAuthPlugin(*_plugin_bases()):
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
        if user == COORDINATOR_ID:
            return topic.startswith("fedlora/")
        if self.registry.active(user) is None:
            return False
        return device_may(getattr(action, "value", str(action)), user, topic)

    async def close(self) -> None:
        return None


def _make_binding_handler():
    """A CONNECT reader that binds the client id to the user name before amqtt looks up sessions."""
    import amqtt.broker as ab
    from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

    if getattr(ab.BrokerProtocolHandler, "fedlora_binding", False):
        return

    class _Binding(BrokerProtocolHandler):
        fedlora_binding = True

        @classmethod
        async def init_from_connect(cls, reader, writer, plugins_manager, loop=None):
            handler, session = await super().init_from_connect(reader, writer, plugins_manager, loop)
            broker = getattr(plugins_manager.app_context, "_broker_instance", None)
            bind = getattr(broker, "fedlora_bind", None)
            if bind is not None:
                bind(session)
            return handler, session

    ab.BrokerProtocolHandler = _Binding


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
    from amqtt.broker import Broker
    from amqtt.contexts import Action

    class _Broker(Broker):
        async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
            """amqtt 0.12 calls this at every connection for *every* client's subscription filter and
            sends what matches, unchecked: a device would receive others' retained hellos.  Here each
            retained message goes only where the receive ACL allows."""
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


class EmbeddedBroker:
    """``with EmbeddedBroker(registry=...) as b: ... b.address`` runs an amqtt broker on a thread."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, registry: Registry | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None, insecure: bool = False,
                 log=print):
        if registry is None and not insecure:
            raise ValueError("the embedded broker needs the device registry (or insecure=True for development)")
        self.host, self.port = host, port or free_port(host)
        self.registry, self.insecure, self.log = registry, insecure, log
        self.tls = (str(tls_cert), str(tls_key)) if tls_cert else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(self.host, self.port, tls=self.tls is not None)

    def _bind(self, session) -> None:
        """As the CONNECT is read: a valid login gets its user name as client id; anything else a
        random one (it is refused later, and can touch no one's session); a Last Will that is not
        the device's own status topic is a refusal too."""
        ok = self.registry.check_login(session.username, session.password)
        if ok and session.username != COORDINATOR_ID and session.will_flag and not (
                device_may("publish", session.username, session.will_topic or "")
                and (session.will_topic or "").endswith("/status")):
            ok = False
        if ok:
            session.client_id = session.username
        else:
            session.client_id = f"refused-{secrets.token_hex(8)}"
            session.clean_session = True
            session.username = None

    def start(self) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if self.tls:
            for f in self.tls:
                if not Path(f).is_file():
                    raise FileNotFoundError(f"TLS file {f} not found (--tls-cert / --tls-key)")
        listener = {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 10000}
        if self.tls:
            listener.update({"ssl": True, "certfile": self.tls[0], "keyfile": self.tls[1]})
        if self.insecure:
            plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
            self.log(INSECURE_WARNING)
        else:
            _make_binding_handler()
            plugins = {f"{__name__}.RegistryAuthPlugin": {"registry": str(self.registry.folder)}}
        cfg = {"listeners": {"default": listener}, "plugins": plugins}

        def serve():
            Broker = _broker_class()

            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._broker = Broker(cfg, loop=self._loop)
                self._broker._subscriptions = _CopyOnIterate(self._broker._subscriptions)
                if not self.insecure:
                    self._broker.fedlora_bind = self._bind
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fedlora-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(120):
            raise RuntimeError(f"the embedded MQTT broker did not start on {self.host}:{self.port} within 120 s")
        if self._error:
            raise RuntimeError(f"the embedded MQTT broker could not start on {self.host}:{self.port}: {self._error}")
        return self  # its listener is bound and serving: clients may come

    def stop(self) -> None:
        if self._loop and self._broker:
            fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                fut.result(10)
            except Exception:  # noqa: BLE001 - shutting down anyway
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(10)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
