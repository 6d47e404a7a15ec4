"""Runs on a RabbitMQ cluster (two nodes with the MQTT plugin on loopback, users and the topic ACL
from the registry through `fedlora broker-auth`): devices on both nodes, two runs, a node killed
mid-round.  Skipped where rabbitmq-server is not installed (CI installs it)."""


import pytest
from mqttkit import CoordThread, Deployment, FakeDevice, config, coordinator, trained
from rabbitkit import RabbitCluster

from fedlora_edge.coordinator.registry import Registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path):
    reg = Registry.create(tmp_path / "registry")
    c = RabbitCluster(reg, tmp_path / "rabbit")
    yield c
    c.stop()


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
        for r in (1, 2):
            plans = {i: d.next_plan() for i, d in devs.items()}
            uids = {i: d.send(r, trained(plans[i].data, k)) for k, (i, d) in enumerate(sorted(devs.items()))}
            for i, d in devs.items():
                assert d.wait_ack(uids[i])["status"] == "accepted"
        for th in threads.values():
            report = th.result()
            assert [(x["round"], x["status"], x["valid_updates"]) for x in report["rounds"]] == [(1, "ok", 2), (2, "ok", 2)]
    finally:
        for dep in deps:
            for link in dep.links:
                link.close()
