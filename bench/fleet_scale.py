"""How many devices one coordinator holds: one coordinator, one broker, N real protocol clients.

    python bench/fleet_scale.py [--sizes 100,300,1000] [--brokers embedded,mosquitto] [--rounds 3]
                                [--workers 4] [--out runs/fleet-scale]
                                [--secagg] [--dropouts 0,0.1,0.3]

With ``--secagg`` every cell runs twice or more: plain, and with ``privacy.secure_aggregation`` at
each ``--dropouts`` fraction.  Then a client also runs its half of SecAgg+ (its keys before its
update, its encrypted shares, its masked vector, its unmasking answer: the protocol of
docs/protocol.md, through :class:`fedlora_edge.core.secagg.DeviceSecAgg`); the dropping fraction
(chosen by id, the same in every round) is split in two: half say they failed after sharing their
keys (they send no masked vector), half never answer the unmasking, so the coordinator waits the
unmasking's deadline for them (``transport.secagg_unmask_s``, 10 s here): a silent device costs a
round that long, as it does over a real network.  The row adds the bytes each device sent and
received per round (MQTT payloads).

Per broker and N, in a fresh folder: a registry with N enrolled devices, a fleet of N devices,
``fedlora coordinator`` in its own process (tiny-llama, fedit at rank 2 on q/v: 4 KB updates;
every device in every round), and N lightweight protocol-2 clients in ``--workers`` processes,
each an asyncio loop over paho-mqtt sessions (one real MQTT session per device, logged in with its
own credentials, Last Will and all).  A client does what ``fedlora client`` does on the wire (the
signed round message, a retained hello, the plan's chunks, a ``received`` event, the update's
chunks, the ack) but does not train: its update is the start factors plus 0.001, sent at once.
The coordinator's broker is the embedded one (``--port``) or Mosquitto from
``fedlora broker-config mosquitto`` (plain MQTT on 127.0.0.1).

Printed per row: the enrolment time; the median and largest *round overhead* over the rounds that
do not evaluate (round seconds minus the slowest device's local seconds, which are ~0 here, so
the whole round is overhead: planning, signing and sending N plans, receiving, validating,
journalling and acknowledging N updates, aggregating, snapshotting); the coordinator process's
CPU seconds and peak RSS (``wait4``'s rusage; the embedded broker runs in a child of that
process: its CPU seconds count, once it has ended, and the peak RSS is the larger of the two);
and MQTT messages per second through the broker to and from the devices over the rounds.
A run that does not finish within ``--timeout`` seconds is stopped and its row says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUN_ID = "scale"
PROFILE = dict(name="bench-device", memory_total_gb=8.0, memory_usable_gb=6.0, compute_gflops=1e6,
               uplink_mbps=1e4, downlink_mbps=1e4, threads=1)


# ------------------------------------------------------------------------------------ devices

class Device:
    """One device's protocol session on an asyncio loop (see the module text)."""

    def __init__(self, creds, address, loop, stats: dict, done: asyncio.Event, drop: str = ""):
        import paho.mqtt.client as mqtt

        from fedlora_edge.core.framing import Reassembler
        from fedlora_edge.core.identity import Counter, ReplayGuard, Signer, Verifier
        from fedlora_edge.core.messages import Outbox
        from fedlora_edge.core.mqtt import device_topic, topic

        self.me, self.loop, self.stats, self.done = creds.id, loop, stats, done
        self.drop = drop  # secure aggregation: "before" (fails after its shares), "after" (no unmasking) or ""
        self.secagg: dict = {}   # round -> (DeviceSecAgg, its unmasked vector or None, inbox received)
        self.outbox = Outbox(Signer(creds.signing_key), Counter(), RUN_ID)
        self.verifier = Verifier(lambda s: creds.coordinator_key if s == "coordinator" else None)
        self.guard = ReplayGuard()
        self.reasm = Reassembler(1 << 26, max_open=2)
        self.t = {leaf: device_topic(RUN_ID, self.me, leaf) for leaf in ("hello", "status", "up", "event", "down", "ack")}
        self.t_round = topic(RUN_ID, "round")
        self.nonce = None
        self.session = ""
        self.finished = False
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.me, protocol=mqtt.MQTTv311,
                        clean_session=False)
        c.username_pw_set(creds.mqtt_username or creds.id, creds.mqtt_password)
        c.max_inflight_messages_set(20)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_socket_open = lambda client, ud, sock: loop.add_reader(sock, client.loop_read)
        c.on_socket_close = self._socket_closed
        c.on_socket_register_write = lambda client, ud, sock: loop.add_writer(sock, client.loop_write)
        c.on_socket_unregister_write = lambda client, ud, sock: loop.remove_writer(sock)
        self.client = c
        self.address = address
        self.connected = False
        self.backoff_s = 1.0

    def connect(self) -> None:
        """A connection attempt, a session of its own (as ``fedlora client``: the Last Will of a
        connection cut off while it was being opened must not mark the next one offline)."""
        self.session = os.urandom(8).hex()
        self.client.will_set(self.t["status"], self.outbox.json(self.t["status"], {
            "type": "status", "device": self.me, "session": self.session, "state": "offline"}, nonce=False),
            qos=1, retain=True)
        self.client.connect(self.address.host, self.address.port, keepalive=KEEPALIVE_S)
        self.client.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)

    def _socket_closed(self, client, userdata, sock) -> None:
        """The broker closed the connection (the embedded broker closes the oldest of more than 256
        connections waiting for their CONNACK when a fleet connects at once): connect again, as
        ``fedlora client`` does (paho's backoff: 1 s doubling to 30 s, here with jitter), unless this
        device is done."""
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)
        self.connected = False
        if not self.finished:
            self.stats["reconnects"] += 1
            self._later()

    def _later(self) -> None:
        self.loop.call_later(self.backoff_s * (0.5 + random.random()), self._retry)
        self.backoff_s = min(30.0, self.backoff_s * 2)

    def _retry(self) -> None:
        if self.finished or self.connected:
            return
        try:
            self.connect()
        except OSError:
            self._later()

    def _send(self, t: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(t, payload, qos=1, retain=retain)
        self.stats["sent"] += 1
        self.stats["bytes_sent"] += len(payload)

    def _event(self, **fields) -> None:
        self._send(self.t["event"], self.outbox.json(self.t["event"], {"device": self.me, **fields}))

    def _update(self, round_idx: int, update: bytes, t0: float) -> None:
        report = {"round": round_idx, "num_examples": 2, "steps": 1, "first_loss": 1.0, "last_loss": 1.0,
                  "losses": [1.0], "seconds": time.perf_counter() - t0}
        meta = {"round": round_idx, "update_id": os.urandom(16).hex(), "report": report}
        for chunk in self.outbox.chunks(self.t["up"], update, kind="update", round_idx=round_idx, device=self.me,
                                        transfer=meta["update_id"], meta=meta):
            self._send(self.t["up"], chunk)

    def _secure(self, tr) -> None:
        """A secure-aggregation transfer (the roster, the relayed shares, the unmasking request)."""
        import numpy as np

        got = self.secagg.get(tr.round)
        if got is None:
            return
        agent, vector = got
        body = json.loads(tr.data)
        stage = tr.meta.get("stage")
        if stage == "roster":
            self._event(type="secagg", round=tr.round, stage="shares", shares=agent.share(body["roster"], body["params"]))
        elif stage == "relay":
            agent.receive(body["inbox"])
            if self.drop == "before":
                self._event(type="failure", round=tr.round, reason="dropped out (bench)")
                return
            masked = agent.mask(np.frombuffer(vector, dtype="<u4").astype(np.uint32))
            self._update(tr.round, masked.astype("<u4").tobytes(), time.perf_counter())
        elif stage == "unmask" and self.drop != "after":
            self._event(type="secagg", round=tr.round, stage="unmask",
                        response=agent.unmask(body["survivors"], body["dropped"]))

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            if reason_code.value in (3, 136):  # "server unavailable" (paho gives 3.1.1's 3 as MQTT 5's 136): turned away while busy; the close brings a retry
                self.stats["busy"] += 1
                return
            self.stats["refused"] += 1
            self.stats["errors"].append(f"{self.me}: refused: {reason_code}")
            self._finish()
            return
        self.connected, self.backoff_s = True, 1.0
        for leaf in ("down", "ack"):
            client.subscribe(self.t[leaf], qos=1)
        client.subscribe(self.t_round, qos=1)
        if self.nonce is not None:  # a new session: announced again
            self._hello()

    def _hello(self) -> None:
        self._send(self.t["hello"], self.outbox.json(self.t["hello"], {
            "type": "hello", "device": self.me, "session": self.session, "profile": PROFILE_DICT,
            "examples": 2, "domains": {}, "client_version": "bench", "programs": []}), retain=True)

    def _on_message(self, client, userdata, msg):
        from fedlora_edge.core.framing import ProtocolError
        from fedlora_edge.core.messages import read_message

        self.stats["received"] += 1
        self.stats["bytes_received"] += len(msg.payload)
        if not msg.payload:
            return
        try:
            _, leaf, fields, data = read_message(self.verifier, self.guard, RUN_ID, msg.topic, msg.payload)
            if leaf == "round":
                if fields.get("state") == "done":
                    if self.nonce is not None:
                        for leaf_own in ("hello", "status"):
                            self._send(self.t[leaf_own], b"", retain=True)
                        self._finish()
                    return
                if fields["nonce"] != self.nonce:
                    self.nonce = self.outbox.nonce = fields["nonce"]
                    self._hello()
                return
            if leaf == "ack":
                self.stats["acks"][fields.get("status", "?")] = self.stats["acks"].get(fields.get("status", "?"), 0) + 1
                return
            plan = self.reasm.add(fields, data)
        except ProtocolError as exc:
            self.stats["errors"].append(f"{self.me}: {exc}"[:200])
            return
        if plan is not None and plan.kind == "secagg":
            self._secure(plan)
            return
        if plan is None or plan.kind != "plan":
            return
        self._event(type="received", round=plan.round, transfer=plan.transfer)
        t0 = time.perf_counter()
        update = trivial_update(plan.data)
        if plan.meta.get("secagg"):  # keys now; the masked vector once the shares are in
            from fedlora_edge.core.secagg import DeviceSecAgg
            from fedlora_edge.edge_client.work import secure_vector

            agent = DeviceSecAgg(self.me, plan.meta["secagg"]["context"].encode())
            self._event(type="secagg", round=plan.round, stage="keys", keys=agent.keys())
            self.secagg = {plan.round: (agent, secure_vector(plan.meta, _tensors(update), _tensors(plan.data)))}
            return
        self._update(plan.round, update, t0)

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self.loop.call_later(0.5, self.client.disconnect)
            self.stats["finished"] += 1
            if self.stats["finished"] == self.stats["devices"]:
                self.loop.call_later(1.0, self.done.set)


def _tensors(data: bytes) -> dict:
    from fedlora_edge.core.wire import decode_tensors

    return decode_tensors(data)


def trivial_update(start: bytes) -> bytes:
    """The start factors plus 0.001: what the independent test client sends (no training)."""
    import numpy as np
    from safetensors.numpy import load, save

    return save({k: (v + np.float32(0.001)).astype(np.float32) for k, v in load(start).items()})


PROFILE_DICT: dict = {}
# MQTT keepalive of the bench's devices: a worker's loop runs hundreds of devices' work in turn (at
# 30 % dropout tolerance of 1000 devices, minutes of Shamir sharing), longer than a phone's 60 s
KEEPALIVE_S = 900


def dropping(device: str, fraction: float) -> str:
    """Whether ``device`` drops out of secure aggregation, and when: "before" its masked vector,
    "after" it, or "" (a stable choice by id: the same devices in every round)."""
    import hashlib

    u = int(hashlib.sha256(device.encode()).hexdigest()[:8], 16) / 2**32
    return "before" if u < fraction / 2 else "after" if u < fraction else ""


async def run_devices(cred_files: list[str], address, deadline_s: float, dropout: float = 0.0,
                      progress: bool = False) -> dict:
    from fedlora_edge.core.identity import load_credentials

    loop = asyncio.get_running_loop()
    stats = {"devices": len(cred_files), "sent": 0, "received": 0, "refused": 0, "busy": 0, "reconnects": 0, "finished": 0,
             "acks": {},
             "errors": [], "bytes_sent": 0, "bytes_received": 0}
    done = asyncio.Event()
    devices = []
    for f in cred_files:
        creds = load_credentials(f, role="device")
        devices.append(Device(creds, address, loop, stats, done, dropping(creds.id, dropout)))
    for i, d in enumerate(devices):
        for _attempt in range(50):
            try:
                d.connect()
                break
            except OSError:
                await asyncio.sleep(0.2)
        if i % 50 == 49:
            await asyncio.sleep(0)  # let the sessions opened so far be served

    async def misc():
        while not done.is_set():
            for d in devices:
                d.client.loop_misc()
            if progress:  # where the devices are, every 5 s while the cell runs (the worker's log)
                print(json.dumps({"connected": sum(d.connected for d in devices),
                                  "in_run": sum(d.nonce is not None for d in devices),
                                  **{k: stats[k] for k in ("finished", "busy", "reconnects", "sent", "received")}}),
                      file=sys.stderr, flush=True)
            await asyncio.sleep(5.0 if progress else 1.0)

    task = loop.create_task(misc())
    try:
        await asyncio.wait_for(done.wait(), deadline_s)
    except asyncio.TimeoutError:
        stats["errors"].append(f"timed out with {stats['finished']} of {len(devices)} devices finished")
    task.cancel()
    stats["errors"] = stats["errors"][:20]
    return stats


def worker(args) -> int:
    import numpy  # noqa: F401  (imported before the first plan, not timed as a device's work)
    import safetensors.numpy  # noqa: F401

    if args.dropout is not None:  # secure aggregation's imports too (torch for the vector's layout)
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        import fedlora_edge.edge_client.work  # noqa: F401
        from fedlora_edge.core.secagg import DeviceSecAgg, SecAggError  # noqa: F401

        X25519PrivateKey.generate()

    from fedlora_edge.core.mqtt import BrokerAddress

    host, port = args.broker.rsplit(":", 1)
    PROFILE_DICT.update(json.loads(Path(args.profile_json).read_text()))
    files = Path(args.creds_list).read_text().split()
    stats = asyncio.run(run_devices(files, BrokerAddress(host, int(port)), args.timeout, args.dropout or 0.0,
                                    progress=True))
    Path(args.stats_out).write_text(json.dumps(stats))
    return 0


# ---------------------------------------------------------------------------------- one cell

def free_port() -> int:
    from fedlora_edge.coordinator.broker import free_port as pick

    return pick()


def wait_accepting(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing accepts on port {port}")


def cell(kind: str, n: int, args, out: Path, secure: float | None = None) -> dict:
    """One run: ``secure`` None for plain rounds, else the dropping fraction under secure aggregation."""
    from fedlora_edge.coordinator.brokerconf import mosquitto as mosquitto_conf
    from fedlora_edge.coordinator.registry import Registry
    from fedlora_edge.core.identity import save_credentials
    from fedlora_edge.core.profile import DeviceProfile, save_profile

    folder = out / (f"{kind}-{n}" if secure is None else f"{kind}-{n}-secagg-{secure:g}")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    reg = Registry.create(folder / "registry")
    ids = [f"d{i:04d}" for i in range(n)]
    creds = reg.add_many(ids)
    enrol_s = time.perf_counter() - t0
    for c in creds:
        save_credentials(folder / "devices" / f"{c.id}.json", c)
    profile = DeviceProfile(**PROFILE)
    save_profile(profile, folder / "profile.yaml")
    (folder / "profile.json").write_text(json.dumps(profile.to_dict()))
    (folder / "fleet.yaml").write_text("devices:\n" + "".join(f"  - {{id: {i}, profile: {folder / 'profile.yaml'}}}\n"
                                                              for i in ids))
    port = free_port()
    broker = None
    if kind == "mosquitto":
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = mosquitto_conf(reg, folder / "mosquitto", port=port, bind="127.0.0.1", tls=False,
                              hosts=["127.0.0.1"])
        text = conf.read_text().replace("persistence true", "persistence false")
        if os.geteuid() == 0:  # started as root, mosquitto drops to a user that cannot read its 0600 files
            text += "user root\n"
        conf.write_text(text + "max_queued_messages 10000\n")
        broker = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=open(folder / "mosquitto.log", "w"))
        wait_accepting(port, broker)
        where = ["--broker", f"mqtt://127.0.0.1:{port}"]
    else:
        where = ["--port", str(port)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "fedlora_edge.coordinator.cli", "coordinator", "--model", "tiny-llama", "--method", "fedit",
           "--fleet", str(folder / "fleet.yaml"), "--rounds", str(args.rounds), "--clients-per-round", str(n),
           "--registry", str(folder / "registry"), "--out", str(folder / "run"), *where,
           "--set", f"transport.run_id={RUN_ID}", "--set", "train.steps=1", "--set", "train.batch_size=1",
           "--set", "data.samples_per_client=2", "--set", "data.eval_per_domain=1", "--set", "max_new_tokens=1",
           "--set", "lora.rank=2", "--set", "lora.max_rank=2", "--set", f"eval_every={args.rounds}",
           "--set", f"transport.round_timeout_s={args.timeout}", "--set", f"transport.wait_for_devices_s={args.timeout}",
           "--progress-every", "10"]
    if secure is not None:
        cmd += ["--set", "privacy.secure_aggregation.enabled=true", "--set", f"transport.secagg_unmask_s={args.unmask}",
                "--set", f"privacy.secure_aggregation.dropout={max(secure, 0.1)}",
                "--set", "min_updates=1"]
    coord_log = open(folder / "fedlora_edge.coordinator.log", "w")
    t_start = time.perf_counter()
    coord = subprocess.Popen(cmd, stdout=coord_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if kind == "embedded":
        wait_accepting(port, coord, timeout=120)
    files = sorted(str(p) for p in (folder / "devices").glob("*.json"))
    workers = []
    for w in range(args.workers):
        part = files[w::args.workers]
        (folder / f"worker-{w}.list").write_text("\n".join(part))
        workers.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", "--broker", f"127.0.0.1:{port}", "--creds-list",
             str(folder / f"worker-{w}.list"), "--profile-json", str(folder / "profile.json"),
             "--stats-out", str(folder / f"worker-{w}.json"), "--timeout", str(args.timeout),
             *(["--dropout", str(secure)] if secure is not None else [])],
            stdout=open(folder / f"worker-{w}.log", "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT))
    status, usage = None, None
    end = time.monotonic() + args.timeout
    while time.monotonic() < end:
        pid, status, usage = os.wait4(coord.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.2)
    else:
        coord.send_signal(signal.SIGINT)
        _, status, usage = os.wait4(coord.pid, 0)
        status = "timed out"
    wall = time.perf_counter() - t_start
    for w in workers:
        try:
            w.wait(30)
        except subprocess.TimeoutExpired:
            w.kill()
    if broker:
        broker.terminate()
        broker.wait(10)
    stats = [json.loads(p.read_text()) for p in sorted(folder.glob("worker-*.json"))]
    row = {"broker": kind, "devices": n, "secagg_dropout": secure, "enrol_s": round(enrol_s, 2), "wall_s": round(wall, 1),
           "bytes_up_per_device_round": sum(s["bytes_sent"] for s in stats) / max(1, n * args.rounds),
           "bytes_down_per_device_round": sum(s["bytes_received"] for s in stats) / max(1, n * args.rounds),
           "exit": status if isinstance(status, str) else os.waitstatus_to_exitcode(status),
           "coordinator_cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
           "messages": sum(s["sent"] + s["received"] for s in stats),
           "refused": sum(s["refused"] for s in stats), "reconnects": sum(s.get("reconnects", 0) for s in stats),
           "busy": sum(s.get("busy", 0) for s in stats),
           "errors": [e for s in stats for e in s["errors"]][:5]}
    report_file = folder / "run" / "report.json"
    if report_file.is_file():
        rep = json.loads(report_file.read_text())
        rounds = rep["rounds"]
        over = [r["seconds"] - max((c.get("local_seconds") or 0) for c in r["clients"]) for r in rounds
                if "accuracy" not in r] or [r["seconds"] for r in rounds]
        row.update({"rounds_ok": sum(r["status"] == "ok" for r in rounds), "valid": [r["valid_updates"] for r in rounds],
                    "overhead_median_s": round(statistics.median(over), 2), "overhead_max_s": round(max(over), 2),
                    "rounds_s": round(sum(r["seconds"] for r in rounds), 1)})
        row["messages_per_s"] = round(row["messages"] / max(1e-9, row["rounds_s"]))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,300,1000")
    ap.add_argument("--brokers", default="embedded,mosquitto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="device processes (each an asyncio loop)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a cell may take")
    ap.add_argument("--unmask", type=float, default=10.0,
                    help="with --secagg: transport.secagg_unmask_s, what a silent device costs the unmasking")
    ap.add_argument("--out", default="runs/fleet-scale")
    ap.add_argument("--secagg", action="store_true", help="also run each cell with secure aggregation")
    ap.add_argument("--dropouts", default="0,0.1,0.3", help="with --secagg: the fractions of devices dropping out")
    ap.add_argument("--dropout", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--broker", help=argparse.SUPPRESS)
    ap.add_argument("--creds-list", help=argparse.SUPPRESS)
    ap.add_argument("--profile-json", help=argparse.SUPPRESS)
    ap.add_argument("--stats-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # a thousand sockets, in the broker and the workers
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 8192)), hard))
    if args.worker:
        return worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| broker | devices | secure aggregation (dropping) | enrol s | round overhead s (median / max) | "
          "coordinator CPU s | peak RSS MB | messages/s | kB up / down per device and round | rounds ok "
          "(valid updates) | wall s |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    modes: list[float | None] = [None]
    if args.secagg:
        modes += [float(x) for x in args.dropouts.split(",")]
    for kind in args.brokers.split(","):
        for n in (int(x) for x in args.sizes.split(",")):
            for secure in modes:
                row = cell(kind, n, args, out, secure)
                rows.append(row)
                (out / "results.json").write_text(json.dumps(rows, indent=1))
                mode = "-" if secure is None else f"yes ({secure:.0%})"
                print(f"| {kind} | {n} | {mode} | {row['enrol_s']} | {row.get('overhead_median_s', '-')} / "
                      f"{row.get('overhead_max_s', '-')} | {row['coordinator_cpu_s']} | {row['peak_rss_mb']} | "
                      f"{row.get('messages_per_s', '-')} | {row['bytes_up_per_device_round'] / 1e3:.1f} / "
                      f"{row['bytes_down_per_device_round'] / 1e3:.1f} | {row.get('rounds_ok', 0)}/{args.rounds} "
                      f"({', '.join(str(v) for v in row.get('valid', []))}) | {row['wall_s']}"
                      + (f" (exit {row['exit']}; {'; '.join(row['errors'])})" if row['exit'] != 0 or row['errors']
                         else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
