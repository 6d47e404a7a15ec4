"""``--engine ray``: clients train in Ray workers around a shared base; the adapter is the local
engine's, bit for bit; a worker that dies costs one client's update; compare's runs as Ray tasks."""

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch
from fleets import fleet

from fedlora_edge.coordinator.config import ConfigError, load_config
from fedlora_edge.coordinator.simulate import Simulation

pytestmark = pytest.mark.integration


def _ray():
    if os.environ.get("FEDLORA_REQUIRE_RAY") == "1":
        import ray
    else:
        ray = pytest.importorskip("ray")
    return ray


@pytest.fixture(scope="module")
def cluster():
    """One Ray cluster on this machine for the module (it starts in about ten seconds)."""
    from fedlora_edge.coordinator.ray_engine import connect

    ray = _ray()
    connect(cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The local engine at one torch thread, as each worker (--cpus-per-worker 1): some kernels
    (FedLEASE's router) sum in another order on more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hetero_fleet(tmp: Path) -> str:
    # two devices whose memory holds rank 20 and 17 of the global 32 on tiny-llama: Fed-PLoRA
    # folds the rest into their base weights, HetLoRA truncates
    return fleet(tmp, ["a", "b", "c", "d", "e"], c={"memory_usable_gb": 0.3557}, d={"memory_usable_gb": 0.35566})


def _cfg(tmp: Path, **overrides):
    return load_config(None, overrides={"model": "tiny-llama", "fleet": hetero_fleet(tmp), "rounds": 2,
                                        "clients_per_round": 5, "train.steps": 2, **overrides})


def _adapter(out: Path) -> str:
    files = sorted(out.rglob("*.safetensors"))
    assert files, f"no adapter written under {out}"
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


CASES = {
    "fed-plora": {"method": "fed-plora"},  # folds components into the base: a worker's private target weights
    "fedlease": {"method": "fedlease", "rounds": 3},
    "hetlora-buffered-int4": {"method": "hetlora", "schedule.mode": "buffered", "schedule.buffer": 2,
                              "schedule.concurrency": 3, "rounds": 3, "transport.compression": "int4"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_ray_workers_give_the_local_engines_adapter_bit_for_bit(tmp_path, cluster, one_thread, case):
    cfg = _cfg(tmp_path, **CASES[case])
    local = Simulation(cfg, tmp_path / "local").run()
    sim = Simulation(cfg, tmp_path / "ray")
    sim.use_ray(workers=2)
    groups = sim.pool.groups
    remote = sim.run()
    assert _adapter(tmp_path / "local") == _adapter(tmp_path / "ray")
    assert remote["final_accuracy"]["loss"] == local["final_accuracy"]["loss"]
    trained = [c["rank"] for r in remote["rounds"] for c in r["clients"]]
    assert len(set(trained)) > 1 or case == "fedlease", f"the fleet should train several ranks: {trained}"
    # the device classes (one profile each here) share the two workers, each reserving its classes' largest need
    assert sum(g.workers for g in groups) == 2
    assert sorted(c for g in groups for c in g.clients) == sorted(c.id for c in sim.engine.participants)


def test_a_worker_that_dies_costs_that_clients_update_and_the_run_goes_on(tmp_path, cluster):
    cfg = _cfg(tmp_path, method="fedit")
    sim = Simulation(cfg, tmp_path / "ray")
    sim.use_ray(workers=2, kill_on={"c"})
    report = sim.run()
    first, second = report["rounds"]
    assert [f["client"] for f in first["failed"]] == ["c"]
    assert "its training worker died" in first["failed"][0]["reason"]
    assert first["status"] == "ok" and first["valid_updates"] == 4
    # a new worker took the dead one's place: the next round trains every device
    assert second["failed"] == [] and second["valid_updates"] == 5


def test_secure_aggregation_runs_on_ray_workers(tmp_path, cluster):
    # SecAgg+'s stochastic rounding draws from the OS, so no engine repeats it bit for bit: it completes
    cfg = _cfg(tmp_path, method="fedit", **{"privacy.secure_aggregation.enabled": True})
    sim = Simulation(cfg, tmp_path / "ray")
    sim.use_ray(workers=2)
    report = sim.run()
    assert [r["valid_updates"] for r in report["rounds"]] == [5, 5]


def test_compare_runs_each_method_as_a_ray_task_and_reuses_finished_runs(tmp_path, cluster, one_thread):
    from fedlora_edge.coordinator.compare import compare

    base = _cfg(tmp_path, rounds=1)
    local = compare(base, ["fedit", "hetlora"], tmp_path / "local")
    remote = compare(base, ["fedit", "hetlora"], tmp_path / "ray", ray={"cpus": 1})
    for a, b in zip(local, remote):
        assert a["run"] == b["run"]
        assert a["loss"] == b["loss"]
    assert (tmp_path / "ray" / "compare.md").is_file()
    for label in ("fedit", "hetlora"):
        assert (tmp_path / "ray" / label / "report.json").is_file()
        assert _adapter(tmp_path / "ray" / label) == _adapter(tmp_path / "local" / label)
    again = compare(base, ["fedit", "hetlora"], tmp_path / "ray", ray={"cpus": 1})
    assert [r["loss"] for r in again] == [r["loss"] for r in remote]
    assert [r["wall_seconds"] for r in again] == [r["wall_seconds"] for r in remote]  # reused, not run again


def test_engine_ray_without_ray_installed_says_how_to_install_it(monkeypatch):
    from fedlora_edge.coordinator.ray_engine import ray_module

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedlora-edge\[ray\]'"):
        ray_module()


def test_the_command_joins_a_running_cluster_by_its_address(tmp_path, cluster):
    """`fedlora simulate --engine ray --address ...` as on a second machine: a process of its own
    that connects to the cluster this module started."""
    import json
    import subprocess

    address = cluster.get_runtime_context().gcs_address
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "fedlora_edge.coordinator.cli", "simulate", "--engine", "ray",
                           "--address", address, "--workers", "1", "--model", "tiny-llama", "--preset", "quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ray: 1 training worker(s)" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["status"] for r in report["rounds"]] == ["ok", "ok"]


def test_workers_no_node_can_place_are_named_not_waited_for(tmp_path, cluster, monkeypatch):
    from fedlora_edge.coordinator import ray_engine

    real = ray_engine.device_groups

    def huge(engine, workers, base_bytes):
        groups = real(engine, workers, base_bytes)
        for g in groups:
            g.memory = 2**50  # a petabyte: no node has it
        return groups

    monkeypatch.setattr(ray_engine, "device_groups", huge)
    monkeypatch.setattr(ray_engine.RayPool, "READY_S", 3.0)
    sim = Simulation(_cfg(tmp_path, method="fedit"), tmp_path / "ray")
    with pytest.raises(ConfigError, match=r"not started within 3 s: .* reserves 1 CPU\(s\) and 1048576\.0 GiB"):
        sim.use_ray(workers=2)
