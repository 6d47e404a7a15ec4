"""The fault table: what a run does under each fault an operator or an attacker meets, and what is lost.

Every row runs the real thing on tiny-llama: the `fedlora coordinator` process (its embedded broker
inside, or Mosquitto), real `fedlora client` processes, or hand-driven devices that sign what they
send (tests/mqttkit.py), and is checked against an uninterrupted run of the same seed where the
fault could change the result ("adapter bitwise equal").  It prints a markdown table:

    python bench/faults.py                 # every scenario, about 10 minutes on 2 cores
    python bench/faults.py --only disk     # the scenarios whose name contains "disk"

Disk full and a read-only state folder use a small tmpfs (mount needs root; without it those rows
say so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

IDS = ["d1", "d2", "d3", "d4"]
RUN_ID = "faults"


# ------------------------------------------------------------------------------------ harness

class Bench:
    def __init__(self, tmp: Path):
        from fleets import FAST_PROFILE, fleet

        from fedlora_edge.coordinator.registry import Registry
        from fedlora_edge.core.data import generate_task, write_jsonl
        from fedlora_edge.core.identity import save_credentials
        from fedlora_edge.core.profile import DeviceProfile, save_profile

        self.tmp = tmp
        self.reg = Registry.create(tmp / "registry")
        self.fleet = fleet(tmp, IDS)
        self.creds = {}
        for k, cid in enumerate(IDS):
            folder = tmp / "devices" / cid
            folder.mkdir(parents=True)
            write_jsonl(folder / "data.jsonl", generate_task(["add", "upper"][k % 2], 8, k))
            save_profile(DeviceProfile(name="p", **FAST_PROFILE), folder / "profile.yaml")
            self.creds[cid] = self.reg.add(cid, max_examples=8)
            save_credentials(folder / "credentials.json", self.creds[cid])

    def coordinator(self, out: Path, port: int, *extra, resume=False, crash=None, broker=None, env=None):
        cmd = [sys.executable, "-m", "fedlora_edge.coordinator.cli", "coordinator", "--model", "tiny-llama", "--method", "fedit",
               "--fleet", self.fleet, "--rounds", "2", "--clients-per-round", "4", "--registry",
               str(self.reg.folder), "--out", str(out), "--set", f"transport.run_id={RUN_ID}",
               "--set", "train.steps=2", "--set", "train.batch_size=4", "--set", "data.tasks=[add,upper]",
               "--set", "data.samples_per_client=8", "--set", "data.eval_per_domain=2", "--set", "max_new_tokens=2",
               "--set", "lora.rank=2", "--set", "lora.max_rank=4", "--set", "transport.round_timeout_s=300",
               "--set", "transport.wait_for_devices_s=120", *extra]
        cmd += ["--broker", broker] if broker else ["--port", str(port)]
        if resume:
            cmd.append("--resume")
        e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
        e.pop("FEDLORA_CRASH_AT", None)
        if crash:
            e["FEDLORA_CRASH_AT"] = crash
        out.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(cmd, stdout=(self.tmp / f"{out.name}.log").open("a"), stderr=subprocess.STDOUT, env=e)

    def device(self, cid: str, url: str, state: Path, *extra):
        from fleets import FAST_PROFILE

        from fedlora_edge.coordinator.emulate import device_command
        from fedlora_edge.core.mqtt import parse_broker
        from fedlora_edge.core.profile import DeviceProfile

        folder = self.tmp / "devices" / cid
        cmd, _ = device_command(parse_broker(url), RUN_ID, cid, folder, DeviceProfile(name="p", **FAST_PROFILE),
                                1.0, 1.0, 1)
        cmd[cmd.index("--state-dir") + 1] = str(state / cid)
        return subprocess.Popen(cmd + list(extra), stdout=(state.parent / f"{state.name}-{cid}.log").open("a"),
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def devices(self, url: str, state: Path):
        return {cid: self.device(cid, url, state) for cid in IDS}

    def log(self, out: Path) -> str:
        return (self.tmp / f"{out.name}.log").read_text()


def adapter(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def equal(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def finish(coord, devs, timeout=600) -> int:
    rc = coord.wait(timeout)
    for p in devs.values():
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
    return rc


def kill_all(devs):
    for p in devs.values():
        if p.poll() is None:
            p.kill()


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def rounds_line(out: Path) -> str:
    r = report(out)
    return ", ".join(f"round {x['round']} {x['status']} {x['valid_updates']}/4" for x in r["rounds"])


def free_port() -> int:
    from fedlora_edge.coordinator.broker import free_port as fp

    return fp()


def wait_for(pred, timeout=300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------- scenarios

def uninterrupted(b: Bench):
    out, port = b.tmp / "reference", free_port()
    devs = b.devices(f"mqtt://127.0.0.1:{port}", b.tmp / "state-ref")
    rc = finish(b.coordinator(out, port), devs)
    assert rc == 0, b.log(out)[-3000:]
    return adapter(out)


def crash_and_resume(b: Bench, ref, name: str, crash: str | None = None, damage=None, kill_when=None):
    out, port = b.tmp / name, free_port()
    devs = b.devices(f"mqtt://127.0.0.1:{port}", b.tmp / f"state-{name}")
    try:
        coord = b.coordinator(out, port, crash=crash)
        if kill_when:
            wait_for(lambda: kill_when(out) or coord.poll() is not None)
            coord.send_signal(signal.SIGKILL)
        rc1 = coord.wait(300)
        if damage:
            damage(out)
        rc2 = finish(b.coordinator(out, port, resume=True), devs)
    finally:
        kill_all(devs)
    said = [line for line in b.log(out).splitlines()
            if line.startswith(("warning:", "resuming", "re-opened", "resuming from"))]
    same = rc2 == 0 and equal(adapter(out), ref)
    return (f"killed (status {rc1}); `--resume`: {'; '.join(s.strip()[:110] for s in said[:3])}; {rounds_line(out)}; "
            f"exit {rc2}", "nothing (adapter bitwise equal to the uninterrupted run)" if same else "DIFFERENT ADAPTER")


def sigkill_mid_round(b, ref):
    return crash_and_resume(b, ref, "sigkill-ack", crash="ack:6")


def sigkill_training(b, ref):
    return crash_and_resume(b, ref, "sigkill-training", crash="plans-sent:2")


def sigkill_aggregate(b, ref):
    return crash_and_resume(b, ref, "sigkill-aggregate", crash="aggregate:1")


def sigkill_state_write(b, ref):
    return crash_and_resume(b, ref, "sigkill-state", crash="state-write:2")


def sigkill_secure(b, stage: str):
    """SIGKILL at a secure-aggregation stage of round 2 (of 3), then ``--resume``: the round it was in
    fails, saying why (its key exchange was only in memory), and the run goes on."""
    out, port = b.tmp / f"sigkill-secagg-{stage}", free_port()
    extra = ("--set", "privacy.secure_aggregation.enabled=true", "--clients-per-round", "4", "--rounds", "3")
    devs = b.devices(f"mqtt://127.0.0.1:{port}", b.tmp / f"state-secagg-{stage}")
    try:
        rc1 = b.coordinator(out, port, *extra, crash=f"secagg-{stage}:2").wait(300)
        rc2 = finish(b.coordinator(out, port, *extra, resume=True), devs)
    finally:
        kill_all(devs)
    rounds = report(out)["rounds"]
    why = next((f["reason"] for r in rounds if r["status"] == "failed" for f in r["failed"]), "")
    clean = ([r["status"] for r in rounds] == ["ok", "failed", "ok"] and "restarted during this secure" in why
             and rc2 == 4)
    return (f"killed (status {rc1}); `--resume`: {rounds_line(out)}; round 2: \"{why[:90]}...\"; exit {rc2}",
            "the round it was in (failed on resume, saying why; the run went on)" if clean else "UNEXPECTED")


def sigkill_secure_keys(b, ref):
    return sigkill_secure(b, "keys")


def sigkill_secure_shares(b, ref):
    return sigkill_secure(b, "shares")


def sigkill_secure_masked(b, ref):
    return sigkill_secure(b, "masked")


def corrupt_snapshot(b, ref):
    def damage(out):
        snaps = sorted((out / "state").glob("snap-*"))
        f = snaps[-1] / "global.safetensors"
        f.write_bytes(f.read_bytes()[:50])  # the newest snapshot torn

    return crash_and_resume(b, ref, "corrupt-snapshot", crash="plans-sent:2", damage=damage)


def garbage_run_json(b, ref):
    def damage(out):
        (sorted((out / "state").glob("snap-*"))[-1] / "run.json").write_text("garbage")

    return crash_and_resume(b, ref, "garbage-run-json", crash="plans-sent:2", damage=damage)


def device_torn_state(b, ref):
    out, port = b.tmp / "device-torn", free_port()
    state = b.tmp / "state-torn"
    for cid in IDS[:2]:
        (state / cid / "pending").mkdir(parents=True)
        (state / cid / "state.json").write_text('{"nonce": "x", "trai')
        (state / cid / "pending" / f"{uuid.uuid4().hex}.json").write_text("{")
    devs = b.devices(f"mqtt://127.0.0.1:{port}", state)
    rc = finish(b.coordinator(out, port), devs)
    logs = " ".join((b.tmp / f"state-torn-{c}.log").read_text() for c in IDS[:2])
    aside = sum(1 for _ in state.rglob("*.corrupt-*"))
    return (f"each device set its torn files aside ({aside} files, warning logged: {'set aside' in logs}) and took part; "
            f"{rounds_line(out)}; exit {rc}", "nothing" if rc == 0 and equal(adapter(out), ref) else "DIFFERENT ADAPTER")


def reuse_run_id(b, ref):
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    state = b.tmp / "state-reuse"
    first = b.tmp / "reuse-first"
    rc1 = finish(b.coordinator(first, port), b.devices(url, state))
    devs = b.devices(url, state)  # started before the next coordinator, with the first run's state
    time.sleep(2)
    second = b.tmp / "reuse-second"
    rc2 = finish(b.coordinator(second, port), devs)
    return (f"second run with the same run id and the devices' old state: {rounds_line(second)}; exits {rc1}, {rc2}",
            "nothing" if rc2 == 0 and equal(adapter(second), ref) else "DIFFERENT ADAPTER")


def all_rounds_failed(b, ref):
    out, port = b.tmp / "all-failed", free_port()
    devs = {c: b.device(c, f"mqtt://127.0.0.1:{port}", b.tmp / "state-failed") for c in IDS[:1]}
    rc = finish(b.coordinator(out, port, "--set", "transport.min_devices=1", "--set", "min_updates=2",
                              "--set", "transport.round_timeout_s=15"), devs)
    tail = [line for line in b.log(out).splitlines() if "failed" in line][-1:]
    return (f"1 of 4 devices online, min_updates 2: {rounds_line(out)}; exit status {rc}: {' '.join(tail)[:120]}",
            "the rounds (reported: exit 4, not 0)")


def plans_dropped(b, ref):
    from mqttkit import Mosquitto

    m = Mosquitto(b.reg, b.tmp / "mosq-small", tls=False, extra="message_size_limit 2000\n")
    try:
        out = b.tmp / "dropped"
        url = f"mqtt://127.0.0.1:{m.port}"
        devs = b.devices(url, b.tmp / "state-dropped")
        t0 = time.monotonic()
        coord = b.coordinator(out, 0, "--set", "transport.plan_ack_s=5", "--set", "transport.round_timeout_s=20",
                              "--set", "rounds=1", broker=url)
        seen = wait_for(lambda: "dropped by the broker" in b.log(out), 120)
        dt = time.monotonic() - t0
        rc = finish(coord, devs)
    finally:
        kill_all(devs)
        m.stop()
    return (f"broker message_size_limit 2000 B < a plan chunk: warning 'dropped by the broker? check its message size "
            f"limit' {'shown' if seen else 'NOT shown'} ({dt:.0f} s after start, plan_ack_s 5); exit status {rc}",
            "the round (the broker drops the plans; reported, exit 4)")


def tls_mistakes(b, ref):
    from mqttkit import Mosquitto

    from fedlora_edge.coordinator.registry import Registry
    from fedlora_edge.core.identity import save_credentials

    rows = []
    other = Registry.create(b.tmp / "other-reg")
    tls, plain = Mosquitto(b.reg, b.tmp / "mosq-tls"), Mosquitto(b.reg, b.tmp / "mosq-plain", tls=False)
    creds = b.tmp / "devices" / "d1" / "credentials.json"
    save_credentials(creds, b.creds["d1"])
    try:
        for case, url, extra in (("wrong CA", f"mqtts://127.0.0.1:{tls.port}", ["--ca-file", str(other.folder / "ca.pem")]),
                                 ("plain to a TLS port", f"mqtt://127.0.0.1:{tls.port}", []),
                                 ("TLS to a plain port", f"mqtts://127.0.0.1:{plain.port}", []),
                                 ("missing CA file", f"mqtts://127.0.0.1:{tls.port}", ["--ca-file", "/nonexistent.pem"])):
            t0 = time.monotonic()
            p = subprocess.run([sys.executable, "-m", "fedlora_edge.edge_client.client", "--broker", url, "--credentials", str(creds),
                                "--data", str(b.tmp / "devices" / "d1" / "data.jsonl"), "--state-dir",
                                str(b.tmp / "tls-state"), "--profile", str(b.tmp / "devices" / "d1" / "profile.yaml"),
                                *extra], capture_output=True, text=True, timeout=120)
            rows.append(f"{case}: exit {p.returncode} in {time.monotonic() - t0:.1f} s, "
                        f"'{p.stderr.strip().split(': ', 1)[-1][:70]}'")
    finally:
        tls.stop()
        plain.stop()
    return "; ".join(rows), "nothing (the device never joined; the cause is named)"


def last_will(b, ref):
    out, port = b.tmp / "last-will", free_port()
    url = f"mqtt://127.0.0.1:{port}"
    devs = b.devices(url, b.tmp / "state-will")
    devs["d4"].kill()
    devs["d4"] = b.device("d4", url, b.tmp / "state-will", "--slowdown", "500")
    coord = b.coordinator(out, port, "--set", "transport.offline_grace_s=3", "--set", "rounds=1",
                          "--set", "transport.round_timeout_s=600")
    wait_for(lambda: b.log(out).count("accepted") >= 0 and "round 1" in (b.tmp / "state-will-d1.log").read_text())
    wait_for(lambda: "update accepted" in (b.tmp / "state-will-d3.log").read_text())
    devs["d4"].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    rc = finish(coord, devs)
    r = report(out)["rounds"][0]
    why = [f["reason"] for f in r["failed"]]
    return (f"a device SIGKILLed while training: its Last Will ended the wait {time.monotonic() - t0:.0f} s later "
            f"(deadline 600 s): {why[0][:80] if why else '-'}; {r['valid_updates']}/4 updates; exit {rc}",
            "that device's round only (it never sent it)")


def broker_sigkill(b, ref):
    from mqttkit import Mosquitto

    m = Mosquitto(b.reg, b.tmp / "mosq-kill", tls=False)
    out = b.tmp / "broker-kill"
    url = f"mqtt://127.0.0.1:{m.port}"
    devs = b.devices(url, b.tmp / "state-bkill")
    try:
        coord = b.coordinator(out, 0, broker=url)
        log = out / "state" / "round-000002" / "updates.log"
        wait_for(lambda: log.is_file() and log.stat().st_size > 0)
        m.stop(signal.SIGKILL)
        time.sleep(3)
        m.start()
        rc = finish(coord, devs)
    finally:
        kill_all(devs)
        m.stop()
    return (f"Mosquitto SIGKILLed in round 2 and restarted 3 s later: {rounds_line(out)}; exit {rc}",
            "nothing" if rc == 0 and equal(adapter(out), ref) else "DIFFERENT ADAPTER")


def half_the_devices_killed(b, ref):
    out, port = b.tmp / "half-killed", free_port()
    url = f"mqtt://127.0.0.1:{port}"
    state = b.tmp / "state-half"
    devs = b.devices(url, state)
    coord = b.coordinator(out, port)
    wait_for(lambda: (out / "state" / "round-000002" / "open.json").exists())
    for c in ("d1", "d2"):
        devs[c].send_signal(signal.SIGKILL)
        devs[c].wait()
    for c in ("d1", "d2"):
        devs[c] = b.device(c, url, state)  # restarted within the offline grace
    rc = finish(coord, devs)
    return (f"2 of 4 devices SIGKILLed as round 2 opened, restarted at once: {rounds_line(out)}; exit {rc}",
            "nothing" if rc == 0 and equal(adapter(out), ref) else "DIFFERENT ADAPTER")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def disk_full(b, ref):
    fs = b.tmp / "small-fs"
    if not _tmpfs(fs, "8m"):
        return "not run: mounting a tmpfs needs root", "-"
    out, port = fs / "out", free_port()
    devs = b.devices(f"mqtt://127.0.0.1:{port}", b.tmp / "state-full")
    try:
        coord = b.coordinator(out, port)
        wait_for(lambda: (out / "state" / "snap-000001").exists() or coord.poll() is not None)
        filler = fs / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)  # until full
        rc1 = coord.wait(300)
        said = [line for line in b.log(out).splitlines() if "error" in line][-1:]
        filler.unlink()
        rc2 = finish(b.coordinator(out, port, resume=True), devs)
        same = rc2 == 0 and equal(adapter(out), ref)
        return (f"disk filled after round 1: the coordinator stopped with exit {rc1} ({' '.join(said)[:140]}); space "
                f"freed, `--resume`: {rounds_line(out)}, exit {rc2}",
                "nothing (adapter bitwise equal)" if same else "DIFFERENT ADAPTER")
    finally:
        kill_all(devs)
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def read_only_state(b, ref):
    fs = b.tmp / "ro-fs"
    if not _tmpfs(fs, "8m"):
        return "not run: mounting a tmpfs needs root", "-"
    try:
        (fs / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        t0 = time.monotonic()
        rc = b.coordinator(fs / "out", free_port()).wait(120)
        said = [line for line in b.log(fs / "out").splitlines() if "error" in line][-1:]
        return (f"refused before anything started ({time.monotonic() - t0:.0f} s), exit {rc}: {' '.join(said)[:120]}",
                "nothing (no round started)")
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def hostile_messages(b, ref):
    """The hand-driven rows: malformed, oversize, contradicting and memory-hungry messages at a live coordinator."""
    import psutil
    from mqttkit import CoordThread, FakeDevice, config, coordinator, deployment, report_of

    from fedlora_edge.core.wire import decode_tensors, encode_tensors

    dep = deployment("embedded", b.tmp / "hostile")
    try:
        ids = ["good", "evil"]
        cfg = config(b.tmp / "hostile", ids)
        creds = dep.enrol(*ids)
        coord = coordinator(dep, cfg, b.tmp / "hostile" / "out")
        th = CoordThread(coord)
        th.start()
        devs = {i: FakeDevice(dep, cfg.transport.run_id, i, creds=creds[i]) for i in ids}
        plans = {i: d.next_plan() for i, d in devs.items()}
        e = devs["evil"]
        rows, rss0 = [], psutil.Process().memory_info().rss
        no_first = {k: v for k, v in report_of(1).items() if k != "first_loss"}
        rows.append(("report without first_loss", e.wait_ack(e.send(1, plans["evil"].data, report=no_first))))
        rows.append(("5 MiB update", e.wait_ack(e.send(1, b"x" * (5 << 20), chunk_bytes=900 * 1024))))
        rows.append(("steps -1", e.wait_ack(e.send(1, plans["evil"].data, report={**report_of(1), "steps": -1}))))
        rows.append(("meta round 7 in a round-1 transfer", e.wait_ack(e.send(
            1, plans["evil"].data, meta={"round": 7, "update_id": "x", "report": report_of(1)}))))
        t = decode_tensors(plans["evil"].data)
        k = sorted(t)[0]
        t[k] = t[k].clone().fill_(float("nan"))
        rows.append(("NaN tensor", e.wait_ack(e.send(1, encode_tensors(t)))))
        big = b"y" * (7 << 20)
        for _ in range(30):  # 30 transfers left incomplete, each claiming 7 MiB: only their first chunk goes
            first = next(e.outbox.chunks(f"fedlora/{cfg.transport.run_id}/dev/evil/up", big, kind="update",
                                         round_idx=1, device="evil", transfer=uuid.uuid4().hex, meta={}))
            e.raw(first)
        e.event(type="failure", round=1, reason="x", device="good")  # names another device: refused
        uid = e.send(1, plans["evil"].data)
        final = e.wait_ack(uid)
        g = devs["good"]
        g.wait_ack(g.send(1, plans["good"].data))
        rep = th.result()
        grown = (psutil.Process().memory_info().rss - rss0) / 2**20
    finally:
        dep.close()
    said = "; ".join(f"{name}: {a['status']} ({a['reason'][:60]})" for name, a in rows)
    return (f"each acknowledged at once with its reason: {said}; 30 incomplete 7 MiB transfers: peak buffered "
            f"{coord.reassembler.peak_buffered / 2**20:.2f} MiB, RSS of the process (sender included) +{grown:.0f} MiB; then the genuine update: "
            f"{final['status']}; round {rep['rounds'][0]['status']} with {rep['rounds'][0]['valid_updates']} updates",
            "nothing: no bad update aggregated, the genuine ones counted")


def _bench_devices(b: Bench, ids: list[str]) -> str:
    """More devices enrolled in the bench's registry (data, profile, credentials), and their fleet file."""
    from fleets import FAST_PROFILE, fleet

    from fedlora_edge.core.data import generate_task, write_jsonl
    from fedlora_edge.core.identity import save_credentials
    from fedlora_edge.core.profile import DeviceProfile, save_profile

    for k, cid in enumerate(ids):
        folder = b.tmp / "devices" / cid
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        write_jsonl(folder / "data.jsonl", generate_task(["add", "upper"][k % 2], 8, k))
        save_profile(DeviceProfile(name="p", **FAST_PROFILE), folder / "profile.yaml")
        b.creds[cid] = b.reg.add(cid, max_examples=8)
        save_credentials(folder / "credentials.json", b.creds[cid])
    (b.tmp / f"fleet-{ids[0]}").mkdir(exist_ok=True)
    return fleet(b.tmp / f"fleet-{ids[0]}", ids)


def two_runs_one_broker(b, ref):
    """Two coordinators on one Mosquitto and one registry, each with its own devices and run id."""
    from mqttkit import Mosquitto

    fleet_b = _bench_devices(b, ["d5", "d6", "d7", "d8"])
    for run in (RUN_ID, "faults-b"):
        b.reg.add_run(run)
    m = Mosquitto(b.reg, b.tmp / "mosq-two", tls=False)
    url = f"mqtt://127.0.0.1:{m.port}"
    out_a, out_b = b.tmp / "two-a", b.tmp / "two-b"
    devs = b.devices(url, b.tmp / "state-two-a")
    for cid in ("d5", "d6", "d7", "d8"):
        from fleets import FAST_PROFILE

        from fedlora_edge.coordinator.emulate import device_command
        from fedlora_edge.core.mqtt import parse_broker
        from fedlora_edge.core.profile import DeviceProfile

        cmd, _ = device_command(parse_broker(url), "faults-b", cid, b.tmp / "devices" / cid,
                                DeviceProfile(name="p", **FAST_PROFILE), 1.0, 1.0, 1)
        cmd[cmd.index("--state-dir") + 1] = str(b.tmp / "state-two-b" / cid)
        devs[cid] = subprocess.Popen(cmd, stdout=(b.tmp / f"two-b-{cid}.log").open("a"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        ca = b.coordinator(out_a, 0, broker=url)
        cb = b.coordinator(out_b, 0, "--fleet", fleet_b, "--set", "transport.run_id=faults-b", broker=url)
        rc_a, rc_b = ca.wait(600), cb.wait(600)
        finish(ca, devs)
    finally:
        kill_all(devs)
        m.stop()
    same = rc_a == 0 and equal(adapter(out_a), ref)
    return (f"run '{RUN_ID}': {rounds_line(out_a)}, exit {rc_a}; run 'faults-b' (4 other devices): "
            f"{rounds_line(out_b)}, exit {rc_b}; each coordinator logged in as coordinator@<its run>",
            "nothing (run 'faults' bitwise equal to the uninterrupted run)" if same and rc_b == 0 else "A ROUND LOST")


def one_device_floods(b, ref):
    """One enrolled device sends thousands of signed hostile messages of each kind the issue lists."""
    import psutil
    from fleets import FAST_PROFILE
    from mqttkit import CoordThread, FakeDevice, config, coordinator, deployment, report_of

    from fedlora_edge.core.framing import chunk_transfer
    from fedlora_edge.core.mqtt import device_topic
    from fedlora_edge.core.profile import DeviceProfile

    n = 3000
    dep = deployment("embedded", b.tmp / "flood")
    rows = []
    try:
        ids = ["good", "evil"]
        cfg = config(b.tmp / "flood", ids, **{"transport.round_timeout_s": 900})
        creds = dep.enrol(*ids)
        coord = coordinator(dep, cfg, b.tmp / "flood" / "out")
        th = CoordThread(coord)
        th.start()
        devs = {i: FakeDevice(dep, cfg.transport.run_id, i, creds=creds[i]) for i in ids}
        plans = {i: d.next_plan() for i, d in devs.items()}
        e, run = devs["evil"], cfg.transport.run_id
        t_up = device_topic(run, "evil", "up")
        me, broker = psutil.Process(), psutil.Process(dep.broker.pid) if getattr(dep.broker, "pid", None) else None

        def chunk(transfer, round_idx=1, total=None, nbytes=None, seq=0, data=b""):
            body = next(chunk_transfer(data, kind="update", run=run, nonce=e.outbox.nonce, round_idx=round_idx,
                                       device="evil", transfer=transfer,
                                       meta={"round": round_idx, "update_id": transfer, "report": report_of(1)},
                                       next_ctr=e.outbox.counter.next))
            if total is not None or nbytes is not None or seq:
                k = int.from_bytes(body[:4], "big")
                h = json.loads(body[4:4 + k])
                h.update({x: v for x, v in (("total", total), ("nbytes", nbytes), ("seq", seq)) if v is not None})
                if seq:
                    h.pop("meta", None)
                hb = json.dumps(h, separators=(",", ":")).encode()
                body = len(hb).to_bytes(4, "big") + hb + body[4 + k:]
            return e.outbox.signer.seal(t_up, body)

        long_id = chunk("x" * 20_000, round_idx=0)
        uid = uuid.uuid4().hex
        limit = coord._expected_bytes(coord.round.assignments["evil"]) if coord.round else 1 << 20
        kinds = (("re-sends of one stale chunk with a 20 KB id", lambda i: long_id),
                 ("stale updates, each a new id", lambda i: chunk(uuid.uuid4().hex, round_idx=0)),
                 ("empty chunks of one 30,000-chunk transfer", lambda i: chunk(uid, total=30_000, nbytes=1000, seq=i + 1)),
                 ("updates refused at their first chunk (oversize)", lambda i: chunk(uuid.uuid4().hex, nbytes=limit + 1,
                                                                                   data=b"z" * 5000)))
        for name, make in kinds:
            acks0 = len(e.acks)
            rss0, brss0 = me.memory_info().rss, broker.memory_info().rss if broker else 0
            for i in range(n):
                e.raw(make(i))
            e._read(2.0)
            while e._read(0.2):
                pass
            grown = (me.memory_info().rss - rss0) / n
            bgrown = (broker.memory_info().rss - brss0) / n if broker else float("nan")
            rows.append(f"{n} {name}: {len(e.acks) - acks0} answered, RSS of the coordinator's process {grown:+.0f} "
                        f"B/message, of the broker's {bgrown:+.0f} B/message")
        t = device_topic(run, "evil", "hello")
        sent0 = coord.round.plan_sent.get("evil") if coord.round else None
        for k in range(200):
            e.link.publish(t, e.outbox.json(t, {"type": "hello", "device": "evil", "session": f"storm-{k}",
                                                "profile": DeviceProfile(name="fake", **FAST_PROFILE).to_dict(),
                                                "examples": 8}), retain=True)
        et = DeviceProfile(name="fake", trainer="executorch", **FAST_PROFILE).to_dict()
        e.link.publish(t, e.outbox.json(t, {"type": "hello", "device": "evil", "session": "et", "profile": et,
                                            "examples": 8}), retain=True)
        # the coordinator works through what the flood queued: wait until it has seen the last hello
        refused_et = wait_for(lambda: any("not allowed" in x["reason"] for x in coord.events), 300)
        resent = coord.round and coord.round.plan_sent.get("evil") != sent0
        rows.append(f"200 hellos with new sessions: plan re-sent {'once (then held back for the interval)' if resent else 'not yet'}; "
                    f"a hello naming executorch: {'refused' if refused_et else 'ACCEPTED'}")
        for i, d in sorted(devs.items()):
            assert d.wait_ack(d.send(1, trained(plans[i].data, 0 if i == 'good' else 1)))["status"] == "accepted"
        rep = th.result()
    finally:
        dep.close()
    r1 = rep["rounds"][0]
    size = len(json.dumps(r1["protocol_rejections"])) + len(json.dumps(r1["rejected"]))
    return ("; ".join(rows) + f"; then both genuine updates accepted, round {r1['status']} "
            f"{r1['valid_updates']}/2; the round's refusal record {size / 1024:.1f} KB "
            f"({sum(x['count'] for x in r1['protocol_rejections'])} refusals in {len(r1['protocol_rejections'])} entries)",
            "nothing: memory flat, answers and records bounded, the round completed")


def trained(data: bytes, k: int) -> bytes:
    from mqttkit import trained as t

    return t(data, k)


def idle_sockets_at_start(b, ref):
    """1,100 idle TCP connections (no credentials, never a CONNECT) opened as the coordinator starts."""
    out, port = b.tmp / "idle-sockets", free_port()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import socket, sys, time\n"
        "port = int(sys.argv[1]); held = []\n"
        "end = time.time() + 60\n"
        "while len(held) < 1100 and time.time() < end:\n"
        "    try:\n"
        "        held.append(socket.create_connection(('127.0.0.1', port), 1))\n"
        "    except OSError:\n"
        "        time.sleep(0.05)\n"
        "print(len(held), flush=True)\n"
        "time.sleep(120)\n"
        "closed = 0\n"
        "for s in held:\n"
        "    s.setblocking(False)\n"
        "    try:\n"
        "        closed += s.recv(1) == b''\n"
        "    except BlockingIOError:\n"
        "        pass\n"
        "    except OSError:\n"
        "        closed += 1\n"
        "print(closed, flush=True)\n"), str(port)], stdout=subprocess.PIPE, text=True)
    try:
        coord = b.coordinator(out, port)
        opened = int(holder.stdout.readline() or 0)
        devs = b.devices(f"mqtt://127.0.0.1:{port}", b.tmp / "state-idle")
        rc = finish(coord, devs)
        closed = holder.stdout.readline().strip()
    finally:
        holder.kill()
    same = rc == 0 and equal(adapter(out), ref)
    return (f"{opened} idle sockets held against the embedded broker as the coordinator started (its broker runs in a "
            f"process of its own, no select() beside it; a socket that sends no CONNECT is closed after 5 s: "
            f"{closed} of them found closed); {rounds_line(out)}; exit {rc}",
            "nothing (adapter bitwise equal)" if same else "DIFFERENT ADAPTER")


def frozen_device(b, ref):
    """A device frozen (SIGSTOP: a hung process, a half-open link) while it trains, embedded broker."""
    out, port = b.tmp / "frozen", free_port()
    url = f"mqtt://127.0.0.1:{port}"
    devs = b.devices(url, b.tmp / "state-frozen")
    devs["d4"].kill()
    devs["d4"] = b.device("d4", url, b.tmp / "state-frozen", "--slowdown", "500")
    coord = b.coordinator(out, port, "--set", "transport.offline_grace_s=3", "--set", "rounds=1",
                          "--set", "transport.round_timeout_s=600")
    try:  # d4 (500 times slower) is still training when d3's update is accepted
        wait_for(lambda: "update accepted" in (b.tmp / "state-frozen-d3.log").read_text())
        devs["d4"].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        rc = coord.wait(700)
        dt = time.monotonic() - t0
    finally:
        devs["d4"].send_signal(signal.SIGCONT)
        kill_all(devs)
    r = report(out)["rounds"][0]
    why = [f["reason"] for f in r["failed"]]
    return (f"d4 SIGSTOPped while training (keepalive 30 s): the embedded broker published its Last Will and the run "
            f"(the round, its evaluation, the outputs) ended {dt:.0f} s later (deadline 600 s): "
            f"{why[0][:70] if why else '-'}; {r['valid_updates']}/4; exit {rc}",
            "that device's round only (it never sent it)")


def revoked_mid_round(b, ref):
    out, port = b.tmp / "revoked", free_port()
    url = f"mqtt://127.0.0.1:{port}"
    devs = b.devices(url, b.tmp / "state-revoked")
    devs["d4"].kill()
    devs["d4"] = b.device("d4", url, b.tmp / "state-revoked", "--slowdown", "500")
    coord = b.coordinator(out, port, "--set", "rounds=1", "--set", "transport.round_timeout_s=600")
    try:  # d4 (500 times slower) is still training when d3's update is accepted
        wait_for(lambda: "update accepted" in (b.tmp / "state-revoked-d3.log").read_text())
        b.reg.revoke("d4")
        t0 = time.monotonic()
        rc = coord.wait(700)
        dt = time.monotonic() - t0
    finally:
        kill_all(devs)
        b.creds["d4"] = b.reg.add("d4", max_examples=8, replace=True)  # enrolled again for later rows
        from fedlora_edge.core.identity import save_credentials

        save_credentials(b.tmp / "devices" / "d4" / "credentials.json", b.creds["d4"])
    r = report(out)["rounds"][0]
    why = [f["reason"] for f in r["failed"]]
    return (f"d4 revoked (`fedlora devices revoke`) while it trained: the run (the round, its evaluation, the "
            f"outputs) ended {dt:.0f} s later (deadline 600 s): {why[0][:60] if why else '-'}; "
            f"{r['valid_updates']}/4; exit {rc}",
            "that device's round only (it was revoked)")


def sigkill_at_outputs(b, ref):
    """SIGKILL while the final outputs are written, then every device gone: `--resume` writes them."""
    out, port = b.tmp / "kill-outputs", free_port()
    devs = b.devices(f"mqtt://127.0.0.1:{port}", b.tmp / "state-kout")
    try:
        rc1 = b.coordinator(out, port, crash="outputs").wait(600)
        partial = (out / "adapter").is_dir(), (out / "report.json").is_file()
    finally:
        kill_all(devs)  # the devices never saw 'done'; they are gone now
    t0 = time.monotonic()
    rc2 = b.coordinator(out, port, resume=True).wait(300)
    said = [line for line in b.log(out).splitlines() if "every round" in line][-1:]
    same = rc2 == 0 and equal(adapter(out), ref)
    return (f"killed (status {rc1}) with the adapter written ({partial[0]}) and report.json not ({not partial[1]}); no "
            f"device left; `--resume`: '{' '.join(said)[:70]}', outputs written in {time.monotonic() - t0:.0f} s "
            f"without waiting for devices; exit {rc2}",
            "nothing (adapter bitwise equal; 'done' was not said before the outputs were complete)" if same
            else "DIFFERENT ADAPTER")


def disk_full_at_outputs(b, ref):
    """ENOSPC at the first fsync of the final outputs (hand-driven devices), then a resume without devices."""
    import errno

    from mqttkit import CoordThread, FakeDevice, config, coordinator, deployment

    import fedlora_edge.core.durable as durable
    from fedlora_edge.coordinator.errors import StorageError

    dep = deployment("embedded", b.tmp / "full-outputs")
    real = durable.fsync_tree if hasattr(durable, "fsync_tree") else None
    try:
        ids = ["p", "q"]
        cfg = config(b.tmp / "full-outputs", ids, rounds=1)
        out = b.tmp / "full-outputs" / "out"
        creds = dep.enrol(*ids)

        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

        if real is not None:
            durable.fsync_tree = full
        th = CoordThread(coordinator(dep, cfg, out))
        th.start()
        devs = {i: FakeDevice(dep, cfg.transport.run_id, i, creds=creds[i]) for i in ids}
        plans = {i: d.next_plan() for i, d in devs.items()}
        for k, (i, d) in enumerate(sorted(devs.items())):
            d.wait_ack(d.send(1, trained(plans[i].data, k)))
        try:
            th.result()
            err = "no error"
        except StorageError as exc:
            err = str(exc)
        done_said = any(r.get("state") == "done" for d in devs.values() for r in d.rounds)
        half = [p.name for p in out.glob("*.tmp*")] + [p.name for p in out.glob(".*tmp*")]
        for d in devs.values():
            d.close()
        if real is not None:
            durable.fsync_tree = real
        rep = CoordThread(coordinator(dep, cfg, out, resume=True))
        rep.start()
        rec = rep.result()
    finally:
        if real is not None:
            durable.fsync_tree = real
        dep.close()
    return (f"ENOSPC as the outputs were written: StorageError (the CLI's exit 6): '{err[:90]}'; 'done' said: "
            f"{done_said}; temporary files left: {len(half)}; the devices gone, `--resume`: round 1 "
            f"{rec['rounds'][0]['status']}, outputs written without devices",
            "nothing (no half-written output; the resume wrote them all)")


def missing_start_blob(b, ref):
    def damage(out):
        for blob in (out / "state").glob("round-*/start-*.safetensors"):
            blob.unlink()

    return crash_and_resume(b, ref, "missing-blob", crash="plans-sent:2", damage=damage)


SCENARIOS = [
    ("malformed, oversize, contradicting and memory-hungry messages", hostile_messages),
    ("SIGKILL after some acks (round 2)", sigkill_mid_round),
    ("SIGKILL while the devices train (round 2)", sigkill_training),
    ("SIGKILL during aggregation", sigkill_aggregate),
    ("SIGKILL during the state write", sigkill_state_write),
    ("newest state snapshot torn (truncated global.safetensors)", corrupt_snapshot),
    ("newest run.json garbage", garbage_run_json),
    ("a device's state.json and pending/*.json torn", device_torn_state),
    ("a run id reused (old retained messages, old device state)", reuse_run_id),
    ("every round fails", all_rounds_failed),
    ("the broker drops the plans (message size limit)", plans_dropped),
    ("TLS mistakes", tls_mistakes),
    ("a device dies mid-round (Last Will)", last_will),
    ("broker SIGKILL mid-round", broker_sigkill),
    ("50% of the devices SIGKILLed mid-round", half_the_devices_killed),
    ("disk full", disk_full),
    ("read-only state folder", read_only_state),
    ("one enrolled device floods the coordinator", one_device_floods),
    ("two runs on one Mosquitto and one registry", two_runs_one_broker),
    ("1,100 idle sockets at the embedded broker as the coordinator starts", idle_sockets_at_start),
    ("a device frozen mid-round (SIGSTOP), embedded broker", frozen_device),
    ("a device revoked mid-round", revoked_mid_round),
    ("SIGKILL while the final outputs are written, devices gone", sigkill_at_outputs),
    ("disk full while the final outputs are written", disk_full_at_outputs),
    ("the open round's start blobs missing from the journal", missing_start_blob),
    ("secure aggregation: SIGKILL after the rosters went out (round 2)", sigkill_secure_keys),
    ("secure aggregation: SIGKILL after the shares were relayed (round 2)", sigkill_secure_shares),
    ("secure aggregation: SIGKILL after the unmasking was asked for (round 2)", sigkill_secure_masked),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="run the scenarios whose name contains this text (comma-separated: any of them)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-faults-"))
    b = Bench(tmp)
    print(f"working in {tmp}", file=sys.stderr)
    ref = uninterrupted(b)
    rows = []
    for name, fn in SCENARIOS:
        if args.only and not any(o in name or o in fn.__name__ for o in args.only.split(",")):
            continue
        t0 = time.monotonic()
        try:
            happened, lost = fn(b, ref)
        except Exception as exc:  # noqa: BLE001 - a broken scenario is a row, not the end of the table
            happened, lost = f"SCENARIO ERROR: {type(exc).__name__}: {exc}", "?"
        rows.append((name, happened, lost))
        print(f"[{time.monotonic() - t0:5.0f} s] {name}: {lost}", file=sys.stderr, flush=True)
    print("| scenario | what happened | what was lost |\n|---|---|---|")
    for name, happened, lost in rows:
        print(f"| {name} | {happened.replace('|', '/')} | {lost} |")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(lost.startswith(("nothing", "the round", "that device", "-")) for _, _, lost in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
