"""``fedlora broker-auth``: the registry as RabbitMQ's user database and topic ACL.

RabbitMQ keeps users in its own database with its own password hashes; the registry keeps PBKDF2
hashes (Mosquitto's format), which RabbitMQ cannot take.  Its HTTP auth backend
(``rabbitmq_auth_backend_http``, shipped with RabbitMQ) asks a web service instead, and this is
that service: run one beside each broker node, on loopback (``--listen 127.0.0.1:8099``), with
``fedlora broker-config rabbitmq`` pointing the node at it.  The node asks:

- every question: the client id RabbitMQ sends with it (``client_id``, ``variable_map.client_id``)
  must be the user name, as Mosquitto's ``use_username_as_clientid`` makes it (a device cannot take
  over another client's session by its id);
- ``/auth/user`` (``username``, ``password``): an active enrolled device, or run R's coordinator
  ``coordinator@R`` with the registry's coordinator password (the same check as the embedded
  broker and Mosquitto's password file);
- ``/auth/vhost``: the default vhost ``/`` only;
- ``/auth/resource``: the topic exchange ``amq.topic`` (read, write) and the client's own MQTT
  subscription queues, ``mqtt-subscription-<user>qos0|1`` (RabbitMQ names them after the client id);
- ``/auth/topic`` (``routing_key``, ``permission`` read or write): the topic ACL of
  ``fedlora broker-config mosquitto``: a coordinator ``coordinator@R`` only ``fedlora/R/...``; a
  device publishes only on its own ``hello``, ``status``, ``up`` and ``event`` and reads its own
  ``down`` and ``ack`` and the runs' ``round``.

The registry file is read again when it changes, so ``fedlora devices add|revoke`` takes effect
without reloading the broker (within ``auth_cache.cache_ttl``: the backend cache in front of this
service, which ``broker-config rabbitmq`` turns on).  Every answer is ``allow`` or ``deny``;
a refusal is logged with the user and what was asked, never a password.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from .broker import device_may
from .registry import Registry, coordinator_scope

MAX_BODY = 8192  # a request is a handful of short form fields
_SWAP = str.maketrans("./*", "/.+")


def mqtt_topic(routing_key: str) -> str:
    """The MQTT topic (or filter) RabbitMQ's MQTT plugin routed as ``routing_key``: it swaps '/' and
    '.' and writes the single-level wildcard '+' as '*'."""
    return routing_key.translate(_SWAP)


def decide(registry: Registry, path: str, q: dict[str, str]) -> tuple[bool, str]:
    """``(allowed, why)`` for one of RabbitMQ's questions (``path`` as asked, ``q`` its fields)."""
    user = q.get("username") or ""
    client_id = q.get("client_id", q.get("variable_map.client_id"))
    if client_id is not None and client_id != user:  # RabbitMQ says which client id asks (3.10 does, every time)
        return False, f"client id {client_id[:80]!r} is not the user name (they must be the same)"
    scope = coordinator_scope(user)
    known = scope is not None or registry.active(user) is not None
    if path == "/auth/user":
        ok = registry.check_login(user, q.get("password"))
        return ok, "" if ok else "not an active device or coordinator login, or a wrong password"
    if not known:
        return False, "not an active device or coordinator login"
    if path == "/auth/vhost":
        return q.get("vhost") == "/", "only the default vhost '/'"
    if path == "/auth/resource":
        kind, name, perm = q.get("resource"), q.get("name", ""), q.get("permission")
        if kind == "exchange":
            return name == "amq.topic" and perm in ("read", "write"), "only amq.topic, read and write"
        if kind == "queue":
            own = name in (f"mqtt-subscription-{user}qos0", f"mqtt-subscription-{user}qos1")
            return own, "only its own MQTT subscription queues (client id = user name)"
        return False, f"no {kind} resources"
    if path == "/auth/topic":
        if q.get("name") != "amq.topic":
            return False, "only amq.topic"
        topic, perm = mqtt_topic(q.get("routing_key", "")), q.get("permission")
        if scope is not None:
            return topic.startswith(scope), f"a coordinator login uses {scope}... only"
        action = "publish" if perm == "write" else "subscribe"
        return device_may(action, user, topic), f"a device {action}s its own topics and the runs' round only"
    return False, f"unknown question {path}"


class AuthService:
    """The HTTP service (``start()`` / ``stop()``); ``address`` is ``(host, port)``."""

    def __init__(self, registry_folder: str | Path, host: str = "127.0.0.1", port: int = 8099, log=print):
        self.registry = Registry(registry_folder)
        self.lock = threading.Lock()  # the registry object is shared between the handler threads
        self.log = log
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                self._answer(self._body())

            def do_GET(self):  # noqa: N802
                self._answer(self.path.partition("?")[2])

            def _body(self) -> str:
                try:
                    n = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    n = -1
                if not 0 <= n <= MAX_BODY:  # judged on the whole question or not at all
                    self.close_connection = True
                    return "\x00too-long"
                return self.rfile.read(n).decode("utf-8", "replace")

            def _answer(self, form: str) -> None:
                path = self.path.partition("?")[0]
                try:
                    if form == "\x00too-long":
                        raise ValueError(f"a question over {MAX_BODY} bytes (or of no stated length)")
                    q = {k: v[0] for k, v in parse_qs(form, keep_blank_values=True).items()}
                    with service.lock:
                        ok, why = decide(service.registry, path, q)
                except Exception as exc:  # noqa: BLE001 - a bad question is a refusal, never a dead service
                    ok, why, q = False, f"{type(exc).__name__}: {exc}", {}
                if not ok:
                    asked = {k: q[k] for k in ("vhost", "resource", "name", "permission", "routing_key") if k in q}
                    service.log(f"broker-auth: denied {path} for {q.get('username')!r} {asked}: {why}")
                body = b"allow" if ok else b"deny"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format, *args):  # noqa: A002 - http.server's signature; no access log
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        host_port = self.server.server_address
        self.address: tuple[str, int] = (str(host_port[0]), int(host_port[1]))
        self._thread: threading.Thread | None = None

    def start(self) -> AuthService:
        self._thread = threading.Thread(target=self.server.serve_forever, name="broker-auth", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}/auth"
