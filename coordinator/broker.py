"""An MQTT broker in the coordinator's process (amqtt), so a run needs no set-up: ``--broker
embedded``.  It listens on loopback only.  For anything beyond one machine use a real broker
(Mosquitto, EMQX) by URL."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

from edge_client.mqtt import BrokerAddress


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """``with EmbeddedBroker() as b: ... b.address`` runs an amqtt broker on a thread."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        self.host, self.port = host, port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(self.host, self.port)

    def start(self) -> EmbeddedBroker:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)

        def serve():
            from amqtt.broker import Broker

            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            cfg = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}",
                                             "max_connections": 1000}},
                   "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}}
            try:
                self._broker = Broker(cfg, loop=self._loop)
                self._loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fedlora-broker", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error:
            raise RuntimeError(f"the embedded MQTT broker could not start on {self.host}:{self.port}: {self._error}")
        return self

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
