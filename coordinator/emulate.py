"""``fedlora emulate``: a whole deployment on one machine: a broker (embedded unless one is
given), the coordinator, and one OS process per device of the fleet, each held to its profile:

- threads: the profile's, at most this host's share per concurrently training device (cores /
  devices per round), so that the host is not oversubscribed;
- memory: past the profile's usable memory in resident size, the process reports out of memory
  and exits (a watchdog every 20 ms), so a plan that does not fit fails with a clear report, not
  a hang.  (An address-space cap, ``RLIMIT_AS``, was tried first: OpenBLAS aborts the process
  under it without a word, and devices run out of physical memory, not address space.);
- compute: each training step is stretched by ``host GFLOPS / profile GFLOPS`` (at least 1, at
  most ``transport.max_slowdown``), measured on this host at start;
- bandwidth: uploads and downloads are paced to the profile's uplink and downlink.

The devices' data is the same partition ``simulate`` makes (written to ``OUT/devices/<id>/``),
and their assignments the same, so with the same config and seed ``emulate`` and ``simulate``
end with the same global adapter, to floating-point tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from edge_client.data import write_jsonl
from edge_client.mqtt import BrokerAddress
from edge_client.profile import measure_gflops, save_profile

from .broker import EmbeddedBroker
from .config import RunConfig
from .service import Coordinator


class DeviceProcessError(RuntimeError):
    """An emulated device's process died before it could take part; the message names its log."""


def device_command(address: BrokerAddress, run_id: str, device: str, folder: Path, profile, host_gflops: float,
                   max_slowdown: float, max_threads: int) -> tuple[list[str], dict]:
    slowdown = min(max_slowdown, max(1.0, host_gflops / profile.compute_gflops))
    threads = max(1, min(profile.threads, max_threads))
    cmd = [sys.executable, "-m", "edge_client.client", "--broker", address.url, "--device-id", device,
           "--data", str(folder / "data.jsonl"), "--profile", str(folder / "profile.yaml"), "--run", run_id,
           "--state-dir", str(folder / "state"), "--threads", str(threads), "--slowdown", f"{slowdown:.3f}",
           "--uplink-mbps", str(profile.uplink_mbps), "--downlink-mbps", str(profile.downlink_mbps),
           "--memory-gb", str(profile.memory_usable_gb)]
    if address.username:
        cmd += ["--username", address.username, "--password", address.password or ""]
    return cmd, {"threads": threads, "slowdown": round(slowdown, 3), "memory_cap_gb": profile.memory_usable_gb,
                 "uplink_mbps": profile.uplink_mbps, "downlink_mbps": profile.downlink_mbps}


def emulate(cfg: RunConfig, out_dir: str | Path, broker: BrokerAddress | None = None, reporter=None,
            log=print) -> dict:
    out = Path(out_dir)
    embedded = None
    if broker is None:
        embedded = EmbeddedBroker().start()
        broker = embedded.address
        log(f"embedded MQTT broker on {broker.url}")
    procs: dict[str, subprocess.Popen] = {}
    try:
        def watch(ready: set[str]) -> None:
            for cid, p in procs.items():
                if cid not in ready and p.poll() is not None:
                    raise DeviceProcessError(f"device {cid} exited with code {p.returncode} before saying hello; "
                                       f"see {out / 'devices' / cid / 'client.log'}")

        coord = Coordinator(cfg, out, broker, reporter, log=log, watch=watch)
        host = measure_gflops(seconds=0.5)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = max(1, cores // max(1, min(cfg.clients_per_round, len(coord.engine.clients))))
        limits = {}
        for c in coord.engine.clients:
            folder = out / "devices" / c.id
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(folder / "data.jsonl", c.train)
            save_profile(c.device.profile, folder / "profile.yaml")
            cmd, limits[c.id] = device_command(broker, cfg.transport.run_id, c.id, folder, c.device.profile, host,
                                               cfg.transport.max_slowdown, share)
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
            with (folder / "client.log").open("w") as fh:
                procs[c.id] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
            time.sleep(0.2)  # staggered: amqtt 0.12 can drop a connection when many arrive at once
        log(f"started {len(procs)} device processes (host {host:.0f} GFLOPS); logs in {out / 'devices'}")
        report = coord.run()
        deadline = time.monotonic() + 30
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
        report["devices"] = {cid: {**limits[cid], "exit_code": procs[cid].returncode,
                                   **_timings(report, cid)} for cid in procs}
        coord.engine.write_report(report)
        return report
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        if embedded:
            embedded.stop()


def _timings(report: dict, cid: str) -> dict:
    rows = [c for r in report["rounds"] for c in r["clients"] if c["client"] == cid]
    secs = [c["local_seconds"] for c in rows if c.get("local_seconds") is not None]
    failed = [f for r in report["rounds"] for f in r.get("failed", []) if f["client"] == cid]
    return {"rounds_trained": len(rows), "rounds_failed": len(failed),
            "mean_local_seconds": round(sum(secs) / len(secs), 2) if secs else None,
            "failures": [f["reason"] for f in failed]}
