"""Runs on a RabbitMQ cluster (two nodes with the MQTT plugin on loopback, users and the topic ACL
from the registry through `fedlora broker-auth`): devices on both nodes, two runs, a node killed
mid-round.  Skipped where rabbitmq-server is not installed (CI installs it)."""


import threading

import pytest
from mqttkit import CoordThread, Deployment, FakeDevice, config, coordinator, trained, two_runs_train
from rabbitkit import RabbitCluster

from fedlora_edge.coordinator.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path):
    reg = Registry.create(tmp_path / "registry")
    c = RabbitCluster(reg, tmp_path / "rabbit")
    yield c
    c.stop()


class RoundsClosed:
    """A reporter that says when round 1 closed (an event to wait on)."""

    def __init__(self):
        self.first = threading.Event()

    def round_end(self, record: dict) -> None:
        self.first.set()

    def __getattr__(self, name):
        return lambda *a, **k: None


def on(cluster, i: int) -> Deployment:
    """The cluster as seen through node ``i`` (the devices and coordinators that connect there)."""
    return Deployment("rabbitmq", cluster.registry, cluster.nodes[i].address, cluster)


def test_two_runs_with_devices_on_both_nodes_complete_every_round(tmp_path, cluster):
    runs = {"run-a": {"a1": 0, "a2": 1}, "run-b": {"b1": 1, "b2": 0}}  # device -> the node it connects to
    creds = {i: cluster.registry.add(i, replace=True, max_examples=8) for ids in runs.values() for i in ids}
    threads, devs, deps = {}, {}, []
    for k, (run, ids) in enumerate(runs.items()):
        (tmp_path / run).mkdir()
        cfg = config(tmp_path / run, list(ids), rounds=2, **{"transport.run_id": run, "transport.announce_every_s": 1})
        dep = on(cluster, k)  # run-a's coordinator on node 0, run-b's on node 1
        deps.append(dep)
        threads[run] = CoordThread(coordinator(dep, cfg, tmp_path / run / "out"))
        threads[run].start()
    try:
        for run, ids in runs.items():
            for i, node in ids.items():
                dep = on(cluster, node)
                deps.append(dep)
                devs[i] = FakeDevice(dep, run, i, creds=creds[i])
        two_runs_train(devs, threads)
        # the registry's ACL holds on the cluster: a device publishing on another device's topic is refused
        from fedlora_edge.core.mqtt import device_topic

        devs["a1"].link.publish(device_topic("run-a", "a2", "up"), b"forged", wait=False)
        assert cluster.wait_denial(lambda line: "'a1'" in line and "fedlora.run-a.dev.a2.up" in line), cluster.denials
        # a message of nearly the broker's limit (a 900 KiB chunk and more) crosses from one node to the other
        from fedlora_edge.core.mqtt import Link

        coord = Link(cluster.registry.coordinator_login(cluster.nodes[0].address, run_id="run-a"), "coordinator@run-a")
        deps[0].links.append(coord)
        coord.subscribe("fedlora/run-a/dev/+/up")
        coord.connect()
        big = bytes(range(256)) * (7 * 1024)  # 1.75 MiB, under max_message_size (2 MiB)
        devs["a2"].link.publish(device_topic("run-a", "a2", "up"), big)
        got = coord.get(60)
        assert got is not None and got[0] == device_topic("run-a", "a2", "up") and got[1] == big
    finally:
        for dep in deps:
            for link in dep.links:
                link.close()


@pytest.mark.parametrize("killed", ["devices-node", "coordinators-node"])
def test_a_node_killed_mid_round_costs_the_updates_that_cannot_reach_the_coordinator(tmp_path, cluster, killed):
    """Node 1 (one device) or node 0 (the coordinator and the other device) is SIGKILLed once
    round 1's plans are out and one update is in; it comes back after round 1 closes."""
    import time

    ids = {"k0": 0, "k1": 1}  # device -> node
    creds = {i: cluster.registry.add(i, replace=True, max_examples=8) for i in ids}
    cfg = config(tmp_path, list(ids), rounds=2, **{"transport.run_id": "run-k", "transport.announce_every_s": 1,
                                                    "transport.round_timeout_s": 20, "transport.offline_grace_s": 3,
                                                    "min_updates": 1})
    deps = [on(cluster, 0)] + [on(cluster, n) for n in ids.values()]
    closed = RoundsClosed()
    th = CoordThread(coordinator(deps[0], cfg, tmp_path / "out", reporter=closed))
    th.start()
    try:
        devs = {i: FakeDevice(deps[1 + k], "run-k", i, creds=creds[i]) for k, i in enumerate(ids)}
        plans = {i: d.next_plan() for i, d in devs.items()}
        survivor, lost = ("k0", "k1") if killed == "devices-node" else ("k1", "k0")
        assert devs[survivor].wait_ack(devs[survivor].send(1, trained(plans[survivor].data, 0)))["status"] == "accepted"
        node = cluster.nodes[1 if killed == "devices-node" else 0]
        t_kill = time.monotonic()
        node.kill()
        # round 1 closes at its deadline without the device on the killed node (that node cannot publish
        # its Last Will, so nobody says it went offline); the node comes back; round 2 trains both
        assert closed.first.wait(120), "round 1 did not close"
        round1_s = time.monotonic() - t_kill
        t_restart = time.monotonic()
        node.start()
        restart_s = time.monotonic() - t_restart
        plans = {i: d.next_plan() for i, d in devs.items()}
        for k, (i, d) in enumerate(sorted(devs.items())):
            assert d.wait_ack(d.send(2, trained(plans[i].data, k)))["status"] == "accepted"
        report = th.result()
        first, second = report["rounds"]
        print(killed, "round 1 closed", round(round1_s, 1), "s after the kill;", first["failed"], first["status"],
              "; the node restarted in", round(restart_s, 1), "s")
        assert first["status"] == "ok" and first["valid_updates"] == 1
        assert [f["client"] for f in first["failed"]] == [lost]
        assert second["status"] == "ok" and second["valid_updates"] == 2
    finally:
        for dep in deps:
            for link in dep.links:
                link.close()
