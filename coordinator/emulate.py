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

from fedlora_edge.core.data import write_jsonl
from fedlora_edge.core.identity import save_credentials
from fedlora_edge.core.mqtt import BrokerAddress, parse_broker
from fedlora_edge.core.profile import measure_gflops, save_profile

from .broker import EmbeddedBroker
from .config import RunConfig
from .pki import issue_server, load_ca
from .registry import Registry
from .service import Coordinator, check_deployable


class DeviceProcessError(RuntimeError):
    """An emulated device's process died before it could take part; the message names its log."""


def device_command(address: BrokerAddress, run_id: str, device: str, folder: Path, profile, host_gflops: float,
                   max_slowdown: float, max_threads: int, ca_file: str | None = None) -> tuple[list[str], dict]:
    """The command line of one emulated device: its credentials file is ``folder/credentials.json``
    (no secret is on the command line)."""
    slowdown = min(max_slowdown, max(1.0, host_gflops / profile.compute_gflops))
    threads = max(1, min(profile.threads, max_threads))
    cmd = [sys.executable, "-m", "fedlora_edge.edge_client.client", "--broker", address.url, "--credentials",
           str(folder / "credentials.json"), "--data", str(folder / "data.jsonl"), "--profile",
           str(folder / "profile.yaml"), "--run", run_id, "--state-dir", str(folder / "state"), "--threads",
           str(threads), "--slowdown", f"{slowdown:.3f}", "--uplink-mbps", str(profile.uplink_mbps),
           "--downlink-mbps", str(profile.downlink_mbps), "--memory-gb", str(profile.memory_usable_gb)]
    if ca_file:
        cmd += ["--ca-file", str(ca_file)]
    return cmd, {"threads": threads, "slowdown": round(slowdown, 3), "memory_cap_gb": profile.memory_usable_gb,
                 "uplink_mbps": profile.uplink_mbps, "downlink_mbps": profile.downlink_mbps}


def enrol_fleet(registry: Registry, engine, out: Path) -> None:
    """Each device of the fleet enrolled, its credentials in ``OUT/devices/<id>/credentials.json``,
    granted the weight of its data (so that emulate weighs devices as simulate does)."""
    for c in engine.clients:
        creds_file = out / "devices" / c.id / "credentials.json"
        e = registry.active(c.id)
        if e is None or not creds_file.is_file() or e.max_examples != len(c.train):
            save_credentials(creds_file, registry.add(c.id, max_examples=len(c.train), replace=True))


def emulate(cfg: RunConfig, out_dir: str | Path, broker: str | BrokerAddress | None = None,
            registry: str | Path | None = None, tls: bool = False, ca_file: str | None = None,
            insecure: bool = False, reporter=None, log=print) -> dict:
    """Run the deployment (see the module text).  ``registry``: the device registry to use (default
    ``OUT/registry``, made if missing); ``tls``: the embedded broker serves TLS with a certificate
    from the registry's CA; ``broker``: a real broker's URL instead of the embedded one."""
    check_deployable(cfg)
    out = Path(out_dir)
    reg_dir = Path(registry) if registry else out / "registry"
    reg = Registry(reg_dir) if (reg_dir / "registry.json").is_file() else Registry.create(reg_dir)
    embedded = None
    if broker is None:
        tls_files = None
        if tls:
            tls_files = (reg_dir / "broker-server.pem", reg_dir / "broker-server.key")
            issue_server(load_ca(reg_dir), ["127.0.0.1", "localhost"], *tls_files)
        embedded = EmbeddedBroker(registry=reg, tls_cert=tls_files and tls_files[0], tls_key=tls_files and tls_files[1],
                                  insecure=insecure, log=log).start()
        address = embedded.address
        log(f"embedded MQTT broker on {address.url}")
    else:
        address = parse_broker(broker, ca_file=ca_file) if isinstance(broker, str) else broker
    procs: dict[str, subprocess.Popen] = {}
    try:
        def watch(ready: set[str]) -> None:
            for cid, p in procs.items():
                if cid not in ready and p.poll() is not None:
                    raise DeviceProcessError(f"device {cid} exited with code {p.returncode} before saying hello; "
                                             f"see {out / 'devices' / cid / 'client.log'}")

        login = reg.coordinator_login(address, ca_file, run_id=cfg.transport.run_id)
        coord = Coordinator(cfg, out, login, reg, reporter, log=log, watch=watch,
                            enrol=lambda engine: enrol_fleet(reg, engine, out))
        host = measure_gflops(seconds=0.5)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        share = max(1, cores // max(1, min(cfg.clients_per_round, len(coord.engine.clients))))
        limits = {}
        coord.connect()  # the broker accepts the coordinator: the devices can come
        for c in coord.engine.clients:
            assert c.device is not None, "a fleet's client is a device (only the pooled participant has none)"
            folder = out / "devices" / c.id
            folder.mkdir(parents=True, exist_ok=True)
            write_jsonl(folder / "data.jsonl", c.train)
            save_profile(c.device.profile, folder / "profile.yaml")
            cmd, limits[c.id] = device_command(address, cfg.transport.run_id, c.id, folder, c.device.profile, host,
                                               cfg.transport.max_slowdown, share, ca_file)
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
            with (folder / "client.log").open("w") as fh:
                procs[c.id] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
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
