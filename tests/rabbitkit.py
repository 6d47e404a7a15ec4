"""A RabbitMQ cluster on loopback for the tests: nodes configured by `fedlora broker-config
rabbitmq`, users and the topic ACL from `fedlora broker-auth` (one per node, on the registry)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
from mqttkit import wait_accepting

from fedlora_edge.coordinator.broker import free_port
from fedlora_edge.coordinator.broker_auth import AuthService
from fedlora_edge.coordinator.brokerconf import rabbitmq as rabbitmq_conf
from fedlora_edge.coordinator.registry import Registry
from fedlora_edge.core.mqtt import BrokerAddress

SBIN = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_server() -> Path:
    exe = SBIN / "rabbitmq-server"
    if not exe.exists():
        if os.environ.get("FEDLORA_REQUIRE_RABBITMQ") == "1":
            pytest.fail("rabbitmq-server is required (FEDLORA_REQUIRE_RABBITMQ=1) but not installed")
        pytest.skip("rabbitmq-server not installed (apt-get install rabbitmq-server)")
    return exe


class Node:
    def __init__(self, cluster: RabbitCluster, i: int):
        self.cluster, self.i = cluster, i
        self.name = f"fl{i}-{cluster.tag}@localhost"
        self.folder = cluster.folder / f"node{i}"
        self.port = free_port()
        self.auth = AuthService(cluster.registry.folder, "127.0.0.1", free_port(), log=cluster.denied).start()
        rabbitmq_conf(cluster.registry, self.folder, port=self.port, bind="127.0.0.1", tls=True,
                      hosts=["127.0.0.1", "localhost"], auth_url=self.auth.url())
        self.env = dict(os.environ, HOME=str(cluster.folder), RABBITMQ_NODENAME=self.name,
                        RABBITMQ_DIST_PORT=str(free_port()), RABBITMQ_CONFIG_FILE=str(self.folder / "rabbitmq"),
                        RABBITMQ_ENABLED_PLUGINS_FILE=str(self.folder / "enabled_plugins"),
                        RABBITMQ_MNESIA_BASE=str(self.folder / "mnesia"), RABBITMQ_LOG_BASE=str(self.folder / "log"),
                        RABBITMQ_PID_FILE=str(self.folder / "pid"))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([str(rabbitmq_server())], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        wait_accepting(self.port, self.proc, tls=True)

    def ctl(self, *args: str) -> str:
        return subprocess.run([str(SBIN / "rabbitmqctl"), "-n", self.name, *args], env=self.env, check=True,
                              capture_output=True, text=True, timeout=120).stdout

    def kill(self) -> None:
        """SIGKILL the node (its whole process group: the Erlang VM)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        self.kill()
        self.auth.stop()

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.port, tls=True)


class RabbitCluster:
    """``n`` RabbitMQ nodes joined into one cluster; node 0 first (it makes the Erlang cookie)."""

    def __init__(self, registry: Registry, folder: Path, n: int = 2):
        rabbitmq_server()
        self.registry, self.folder, self.tag = registry, folder, uuid.uuid4().hex[:6]
        self.denials: list[str] = []  # what the nodes' broker-auth refused (its log lines)
        self._said = threading.Condition()
        folder.mkdir(parents=True, exist_ok=True)
        self.nodes = [Node(self, i) for i in range(n)]
        try:
            self.nodes[0].start()
            for node in self.nodes[1:]:
                node.start()
                node.ctl("stop_app")
                node.ctl("join_cluster", self.nodes[0].name)
                node.ctl("start_app")
                wait_accepting(node.port, node.proc, tls=True)
        except BaseException:
            self.stop()
            raise

    def denied(self, line: str) -> None:
        with self._said:
            self.denials.append(line)
            self._said.notify_all()

    def wait_denial(self, match, timeout: float = 60) -> bool:
        """Until broker-auth refused something ``match(line)`` accepts (an event, not a sleep)."""
        with self._said:
            return self._said.wait_for(lambda: any(match(line) for line in self.denials), timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
