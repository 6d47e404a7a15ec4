"""`fedlora broker-auth`: RabbitMQ's HTTP auth backend answered from the registry (logins, the
vhost, queues, the per-device topic ACL), and `fedlora broker-config rabbitmq`'s files.  The
cluster itself runs in tests/test_rabbitmq.py (slow tier)."""

from __future__ import annotations

import urllib.parse
import urllib.request

import pytest

from fedlora_edge.coordinator.broker_auth import AuthService, decide, mqtt_topic
from fedlora_edge.coordinator.brokerconf import rabbitmq
from fedlora_edge.coordinator.registry import Registry


@pytest.fixture
def reg(tmp_path):
    r = Registry.create(tmp_path / "registry")
    r.add_run("run-a")
    return r


def test_routing_keys_read_back_as_the_mqtt_topics_rabbitmq_routed():
    assert mqtt_topic("fedlora.run-a.dev.pi5.up") == "fedlora/run-a/dev/pi5/up"
    assert mqtt_topic("fedlora.run/1.dev.pi/5.up") == "fedlora/run.1/dev/pi.5/up"  # '.' in ids: '/' in keys
    assert mqtt_topic("fedlora.run-a.dev.*.up") == "fedlora/run-a/dev/+/up"


def test_logins_are_the_registrys_and_a_revoked_device_is_refused(reg):
    pi5 = reg.add("pi5")
    assert decide(reg, "/auth/user", {"username": "pi5", "password": pi5.mqtt_password})[0]
    assert not decide(reg, "/auth/user", {"username": "pi5", "password": "wrong"})[0]
    assert not decide(reg, "/auth/user", {"username": "nobody", "password": pi5.mqtt_password})[0]
    from fedlora_edge.core.mqtt import BrokerAddress

    coord = reg.coordinator_login(BrokerAddress("127.0.0.1", 1), run_id="run-a")
    assert decide(reg, "/auth/user", {"username": "coordinator@run-a", "password": coord.password})[0]
    # the client id must be the user name: a device cannot take over another's session by its id
    assert not decide(reg, "/auth/user", {"username": "pi5", "password": pi5.mqtt_password,
                                          "client_id": "coordinator@run-a"})[0]
    assert decide(reg, "/auth/user", {"username": "pi5", "password": pi5.mqtt_password, "client_id": "pi5"})[0]
    assert not decide(reg, "/auth/topic", {"username": "pi5", "variable_map.client_id": "pi4", "name": "amq.topic",
                                           "permission": "write", "routing_key": "fedlora.run-a.dev.pi5.up"})[0]
    reg.revoke("pi5")
    assert not decide(reg, "/auth/user", {"username": "pi5", "password": pi5.mqtt_password})[0]
    assert not decide(reg, "/auth/vhost", {"username": "pi5", "vhost": "/"})[0]


def test_a_device_uses_its_own_topics_and_queues_a_coordinator_its_runs(reg):
    reg.add("pi5")
    reg.add("pi4")

    def topic(user, key, perm):
        return decide(reg, "/auth/topic", {"username": user, "vhost": "/", "resource": "topic", "name": "amq.topic",
                                           "permission": perm, "routing_key": key})[0]

    assert topic("pi5", "fedlora.run-a.dev.pi5.up", "write")
    assert not topic("pi5", "fedlora.run-a.dev.pi4.up", "write")      # another device's update topic
    assert not topic("pi5", "fedlora.run-a.dev.pi5.down", "write")    # forging its own plan
    assert not topic("pi5", "fedlora.run-a.round", "write")
    assert topic("pi5", "fedlora.run-a.dev.pi5.down", "read") and topic("pi5", "fedlora.run-a.round", "read")
    assert not topic("pi5", "fedlora.run-a.dev.pi4.down", "read") and not topic("pi5", "fedlora.run-a.dev.*.down", "read")
    assert topic("coordinator@run-a", "fedlora.run-a.dev.*.up", "read")
    assert topic("coordinator@run-a", "fedlora.run-a.round", "write")
    assert not topic("coordinator@run-a", "fedlora.run-b.round", "write")  # another run's topics

    def res(user, kind, name, perm):
        return decide(reg, "/auth/resource", {"username": user, "vhost": "/", "resource": kind, "name": name,
                                              "permission": perm})[0]

    assert res("pi5", "queue", "mqtt-subscription-pi5qos1", "configure")
    assert not res("pi5", "queue", "mqtt-subscription-pi4qos1", "configure")  # a client id not its own
    assert res("pi5", "exchange", "amq.topic", "write") and not res("pi5", "exchange", "amq.direct", "write")
    assert not decide(reg, "/auth/vhost", {"username": "pi5", "vhost": "other"})[0]


def test_the_service_answers_over_http_and_logs_refusals_without_the_password(reg):
    pi5 = reg.add("pi5")
    said: list[str] = []
    svc = AuthService(reg.folder, "127.0.0.1", 0, log=said.append).start()
    try:
        def ask(path, **fields):
            data = urllib.parse.urlencode(fields).encode()
            with urllib.request.urlopen(f"{svc.url()}/{path}", data=data, timeout=10) as r:
                return r.read().decode()

        assert ask("user", username="pi5", password=pi5.mqtt_password) == "allow"
        assert ask("user", username="pi5", password="not-the-password") == "deny"
        assert ask("topic", username="pi5", vhost="/", resource="topic", name="amq.topic", permission="write",
                   routing_key="fedlora.run-a.dev.pi4.up") == "deny"
        assert ask("nonsense", username="pi5") == "deny"
        assert ask("user", username="pi5", password=pi5.mqtt_password, pad="x" * 9000) == "deny"  # over 8 KiB
        reg.add("pi4")  # a device enrolled while the service runs counts at once (the registry is read again)
        pi4 = reg.add("pi4", replace=True)
        assert ask("user", username="pi4", password=pi4.mqtt_password) == "allow"
        assert said and all("not-the-password" not in line and pi5.mqtt_password not in line for line in said)
        assert any("fedlora/run-a/dev/pi4/up" in line or "fedlora.run-a.dev.pi4.up" in line for line in said)
    finally:
        svc.stop()


def test_broker_config_rabbitmq_writes_the_nodes_files(reg, tmp_path):
    conf = rabbitmq(reg, tmp_path / "broker", port=18883, bind="127.0.0.1", hosts=["localhost"],
                    auth_url="http://127.0.0.1:8099/auth")
    text = conf.read_text()
    for line in ("auth_backends.1 = cache", "auth_cache.cached_backend = http",
                 "auth_http.topic_path = http://127.0.0.1:8099/auth/topic", "mqtt.allow_anonymous = false",
                 "mqtt.listeners.tcp = none", "mqtt.listeners.ssl.default = 127.0.0.1:18883", "listeners.tcp = none"):
        assert line in text.splitlines(), line
    assert (tmp_path / "broker" / "enabled_plugins").read_text().strip() == \
        "[rabbitmq_mqtt,rabbitmq_auth_backend_http,rabbitmq_auth_backend_cache]."
    assert (tmp_path / "broker" / "server.pem").is_file() and (tmp_path / "broker" / "ca.pem").is_file()
