"""SIGKILL the real coordinator process, then ``--resume``: nothing is lost.

The coordinator runs as `fedlora coordinator` with its embedded broker (which dies with it), three
real `fedlora client` processes train tiny-llama with one thread each.  The coordinator is killed
at a named point (``FEDLORA_CRASH_AT``, :mod:`fedlora_edge.coordinator.faults`): while the devices train, after
some acks, after aggregation, half-way through a state write, or from outside once an update is
in the round's journal; then started again with ``--resume``.  The run must end with a final
adapter bitwise equal to an uninterrupted run with the same seed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fleets import FAST_PROFILE, fleet
from mqttkit import wait_for
from safetensors.torch import load_file

from fedlora_edge.coordinator.broker import free_port
from fedlora_edge.coordinator.emulate import device_command
from fedlora_edge.coordinator.registry import Registry
from fedlora_edge.core.data import generate_task, write_jsonl
from fedlora_edge.core.identity import save_credentials
from fedlora_edge.core.profile import DeviceProfile, save_profile

pytestmark = pytest.mark.integration
IDS = ["d1", "d2", "d3"]
RUN_ID = "crash-test"


def _setup(tmp: Path):
    reg = Registry.create(tmp / "registry")
    f = fleet(tmp, IDS)
    for k, cid in enumerate(IDS):
        folder = tmp / cid
        folder.mkdir()
        write_jsonl(folder / "data.jsonl", generate_task(["add", "upper", "add"][k], 8, k))
        save_profile(DeviceProfile(name="p", **FAST_PROFILE), folder / "profile.yaml")
        save_credentials(folder / "credentials.json", reg.add(cid, max_examples=8))
    return reg, f


def _coordinator(tmp: Path, f: str, port: int, resume=False, crash=None, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fedlora_edge.coordinator.cli", "coordinator", "--model", "tiny-llama", "--method", "fedit",
           "--fleet", f, "--rounds", "3", "--clients-per-round", "3", "--registry", str(tmp / "registry"),
           "--port", str(port), "--out", str(tmp / "out"), "--set", f"transport.run_id={RUN_ID}",
           "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "data.tasks=[add,upper]",
           "--set", "data.samples_per_client=8", "--set", "data.eval_per_domain=2", "--set", "max_new_tokens=2",
           "--set", "lora.rank=2", "--set", "lora.max_rank=4", "--set", "transport.round_timeout_s=300", *extra]
    if resume:
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("FEDLORA_CRASH_AT", None)
    if crash:
        env["FEDLORA_CRASH_AT"] = crash
    log = (tmp / "fedlora_edge.coordinator.log").open("a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _devices(tmp: Path, port: int) -> dict[str, subprocess.Popen]:
    from fedlora_edge.core.mqtt import BrokerAddress

    procs = {}
    for cid in IDS:
        cmd, _ = device_command(BrokerAddress("127.0.0.1", port), RUN_ID, cid, tmp / cid,
                                DeviceProfile(name="p", **FAST_PROFILE), 1.0, 1.0, 1)
        procs[cid] = subprocess.Popen(cmd, stdout=(tmp / cid / "client.log").open("a"), stderr=subprocess.STDOUT,
                                      env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return procs


def _run(tmp: Path, crash: str | None = None, kill_when=None, extra=()) -> dict[str, torch.Tensor]:
    """One run; with ``crash`` (or ``kill_when``, a condition after which the test kills it) the
    coordinator dies once and is resumed.  Returns the final adapter."""
    _, f = _setup(tmp)
    port = free_port()
    devices = _devices(tmp, port)
    try:
        coord = _coordinator(tmp, f, port, crash=crash, extra=extra)
        if crash or kill_when:
            if kill_when:
                wait_for(lambda: kill_when(tmp) or coord.poll() is not None, timeout=300, what="the kill point")
                coord.send_signal(signal.SIGKILL)
            assert coord.wait(300) == -signal.SIGKILL, (tmp / "fedlora_edge.coordinator.log").read_text()[-3000:]
            coord = _coordinator(tmp, f, port, resume=True, extra=extra)
        assert coord.wait(600) == 0, (tmp / "fedlora_edge.coordinator.log").read_text()[-3000:]
        for cid, p in devices.items():
            assert p.wait(120) == 0, (tmp / cid / "client.log").read_text()[-2000:]
    finally:
        for p in devices.values():
            p.kill()
    return load_file(str(tmp / "out" / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("uninterrupted"))


def _update_in_journal(round_idx: int):
    def seen(tmp) -> bool:  # an accepted update is in the round's log (and acknowledged: it is fsynced first)
        log = tmp / "out" / "state" / f"round-{round_idx:06d}" / "updates.log"
        return log.is_file() and log.stat().st_size > 0
    return seen


@pytest.mark.parametrize("point", [
    "ack:5",            # round 2: after two of its three updates were acknowledged
    "state-write:3",    # round 2's snapshot half-written (snapshot 0 is the first write)
    pytest.param("plans-sent:2", marks=pytest.mark.slow),   # round 2's plans out, the devices training
    pytest.param("aggregate:2", marks=pytest.mark.slow),    # round 2 aggregated, nothing written yet
    pytest.param("outside", marks=pytest.mark.slow),        # the test's own SIGKILL, once round 3 has an update
])
def test_sigkill_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path, uninterrupted, point):
    if point == "outside":
        got = _run(tmp_path, kill_when=_update_in_journal(3))
    else:
        got = _run(tmp_path, crash=point)
    log = (tmp_path / "fedlora_edge.coordinator.log").read_text()
    assert "resuming run" in log
    assert got.keys() == uninterrupted.keys()
    assert all(torch.equal(got[k], uninterrupted[k]) for k in got), {
        k: float((got[k] - uninterrupted[k]).abs().max()) for k in got}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["status"] for r in report["rounds"]] == ["ok"] * 3
    assert [r["valid_updates"] for r in report["rounds"]] == [3, 3, 3]


# buffered rounds: one device trains at a time (so the arrivals, and with them every version's buffer,
# are the same in every run), two accepted updates fold into each version
BUFFERED = ("--set", "schedule.mode=buffered", "--set", "schedule.buffer=2", "--set", "schedule.concurrency=1")


@pytest.fixture(scope="module")
def uninterrupted_buffered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted-buffered")
    return _run(tmp, extra=BUFFERED), json.loads((tmp / "out" / "report.json").read_text())


def _order(report: dict) -> list[list[str]]:
    return [[c["client"] for c in r["clients"]] for r in report["rounds"]]


def test_buffered_rounds_over_mqtt_fold_every_version_from_their_journal(uninterrupted_buffered):
    _, report = uninterrupted_buffered
    assert [r["status"] for r in report["rounds"]] == ["ok"] * 3
    assert [r["valid_updates"] for r in report["rounds"]] == [2, 2, 2]
    assert all(c["staleness"] == 0 for r in report["rounds"] for c in r["clients"])  # one device at a time
    assert all(len(set(o)) == 2 for o in _order(report))  # a device has one update in a version at most


@pytest.mark.parametrize("point", [
    "ack:3",            # version 2: after the first of its two updates was acknowledged (its buffer half full)
    pytest.param("state-write:2", marks=pytest.mark.slow),  # version 2 folded, its snapshot half-written
    pytest.param("aggregate:1", marks=pytest.mark.slow),    # version 1 folded, nothing written yet
])
def test_buffered_sigkill_then_resume_ends_bitwise_equal_given_the_same_arrivals(tmp_path, uninterrupted_buffered,
                                                                                point):
    want, want_report = uninterrupted_buffered
    got = _run(tmp_path, crash=point, extra=BUFFERED)
    log = (tmp_path / "fedlora_edge.coordinator.log").read_text()
    assert "resuming run" in log
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert _order(report) == _order(want_report)  # the same arrivals, version by version
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got), {k: float((got[k] - want[k]).abs().max()) for k in got}


def test_buffered_plans_out_are_carried_across_versions_and_a_restart(tmp_path):
    # three devices train at once, two updates fold into a version: the third plan of version 1 is
    # still out (or its update waits) when version 1 closes, and it is carried into version 2, through
    # the coordinator's SIGKILL after version 2's first ack: its update comes one version old, past
    # schedule.max_staleness 0, and is refused with that reason; the run goes on to its three versions
    _run(tmp_path, crash="ack:3", extra=("--set", "schedule.mode=buffered", "--set", "schedule.buffer=2",
                                        "--set", "schedule.concurrency=3", "--set", "schedule.max_staleness=0"))
    log = (tmp_path / "fedlora_edge.coordinator.log").read_text()
    assert "resuming run" in log and "re-opened version 2" in log
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["status"] for r in report["rounds"]] == ["ok"] * 3
    assert [r["valid_updates"] for r in report["rounds"]] == [2, 2, 2]
    assert report["rounds"][0]["plans_out"] == 1
    # the plan ends with the refusal, journaled (the round's `rejected` lists it too when it came after the restart)
    ended = [x for r in report["rounds"] for x in r["failed"] if "past schedule.max_staleness 0" in x["reason"]]
    assert ended and "planned on version 0," in ended[0]["reason"]
    assert all(c["staleness"] == 0 and c["planned_on_version"] == r["round"] - 1
               for r in report["rounds"] for c in r["clients"])
