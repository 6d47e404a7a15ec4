"""The embedded broker with a fleet connected and idle sockets pressing on it.

    python bench/broker_scale.py [--devices 3000] [--idle 1500] [--workers 2] [--brokers embedded,mosquitto]
                                 [--out runs/broker-scale]

Per broker, in a fresh folder: a registry with ``--devices`` enrolled devices
(``Registry.add_many``) and the broker: the embedded one as the coordinator starts it (its own
process), or Mosquitto from ``fedlora broker-config mosquitto`` (plain MQTT, the baseline).  First ``--idle`` TCP sockets that
never send a CONNECT are opened (one helper process), then the devices connect from ``--workers``
helper processes, each an asyncio loop of raw MQTT 3.1.1 sessions: each logs in with its own
credentials and a Last Will on its status topic (keepalive 60 s, answered with pings), and
subscribes to the run's round topic.  Then the coordinator's client (paho, in this process, as
in ``fedlora coordinator``) publishes a retained round message and every device must receive it.

Printed: devices connected and the seconds to connect them all; the idle sockets opened and how
many the broker had closed when the devices were all in; the seconds from the publish to the last
device's receipt; the broker process's RSS and descriptors before and with the fleet; and this
process's descriptors (paho's ``select()`` needs them under 1024).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RUN_ID = "scale"


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ------------------------------------------------------------------------- raw MQTT 3.1.1


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return len(b).to_bytes(2, "big") + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _length(len(body)) + body


async def _read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    n, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await reader.readexactly(n)


# ------------------------------------------------------------------------- helper processes


async def _devices(host: str, port: int, creds: list[tuple[str, str]]) -> None:
    """The ``--worker`` side: print ``connected K`` once every session is subscribed, then
    ``received K T`` once every one got the round (T: the wall clock of the last receipt)."""
    round_topic = f"fedlora/{RUN_ID}/round"
    connected, received = [0], [0]
    last = [0.0]
    all_in, all_got = asyncio.Event(), asyncio.Event()
    gate = asyncio.Semaphore(100)  # connections in the making at once, as a fleet's would be spread

    async def one(user: str, password: str) -> None:
        async with gate:
            for attempt in range(20):
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                    will = (f"fedlora/{RUN_ID}/dev/{user}/status", b"offline")
                    body = (_s("MQTT") + bytes([4, 0x80 | 0x40 | 0x20 | 0x08 | 0x04]) + (60).to_bytes(2, "big")
                            + _s(user) + _s(will[0]) + _s(will[1]) + _s(user) + _s(password))
                    writer.write(_packet(0x10, body))
                    first, ack = await _read_packet(reader)
                    if first >> 4 != 2 or ack[1] != 0:
                        raise RuntimeError(f"{user}: CONNECT refused ({ack!r})")
                    writer.write(_packet(0x82, (1).to_bytes(2, "big") + _s(round_topic) + b"\x01"))
                    first, ack = await _read_packet(reader)
                    if first >> 4 != 9 or ack[2] != 1:
                        raise RuntimeError(f"{user}: SUBSCRIBE refused ({ack!r})")
                    break
                except (OSError, asyncio.IncompleteReadError):
                    await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt))
            else:
                raise RuntimeError(f"{user}: could not connect")
        connected[0] += 1
        if connected[0] == len(creds):
            all_in.set()

        async def ping() -> None:
            while True:
                await asyncio.sleep(30)
                writer.write(b"\xc0\x00")

        pinger = asyncio.ensure_future(ping())
        try:
            while True:
                first, body = await _read_packet(reader)
                if first >> 4 != 3:
                    continue
                qos = (first >> 1) & 3
                n = int.from_bytes(body[:2], "big")
                if qos:
                    writer.write(b"\x40\x02" + body[2 + n:4 + n])  # PUBACK
                if body[2:2 + n].decode() == round_topic:
                    received[0] += 1
                    last[0] = max(last[0], time.time())
                    if received[0] == len(creds):
                        all_got.set()
        finally:
            pinger.cancel()

    tasks = [asyncio.ensure_future(one(u, p)) for u, p in creds]
    waiter = asyncio.ensure_future(all_in.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        if t.done() and t.exception():
            raise t.exception()
    print(f"connected {connected[0]}", flush=True)
    try:
        await asyncio.wait_for(all_got.wait(), 600)
    except asyncio.TimeoutError:
        pass  # the bench reports the shortfall
    print(f"received {received[0]} {last[0]:.6f}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # held until the bench is done


def _idle(host: str, port: int, n: int) -> None:
    """The ``--idle-helper`` side: ``n`` sockets that never send anything; on each line of input,
    print how many of them the broker has closed."""
    import socket

    socks = []
    for _ in range(n):
        socks.append(socket.create_connection((host, port)))
    print(f"opened {len(socks)}", flush=True)
    for _ in sys.stdin:
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        print(f"closed {closed}", flush=True)


# ------------------------------------------------------------------------- the bench


def _proc_stat(pid: int) -> tuple[float, int]:
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return round(rss, 1), len(os.listdir(f"/proc/{pid}/fd"))


def _expect(proc: subprocess.Popen, word: str) -> list[str]:
    line = proc.stdout.readline().decode().split()
    if not line or line[0] != word:
        raise RuntimeError(f"helper process said {line!r} (exit code {proc.poll()}), expected {word!r}")
    return line[1:]


class Mosquitto:
    """Mosquitto configured by ``fedlora broker-config mosquitto`` (no TLS), as a context manager."""

    def __init__(self, reg, folder: Path):
        from fedlora_edge.coordinator.broker import free_port
        from fedlora_edge.coordinator.brokerconf import mosquitto as mosquitto_conf
        from fedlora_edge.core.mqtt import BrokerAddress

        self.host, self.port = "127.0.0.1", free_port()
        self.address = BrokerAddress(self.host, self.port)
        conf = mosquitto_conf(reg, folder, port=self.port, bind=self.host, tls=False, hosts=[self.host])
        text = conf.read_text().replace("persistence true", "persistence false")
        if os.geteuid() == 0:  # started as root, mosquitto drops to a user that cannot read its 0600 files
            text += "user root\n"
        conf.write_text(text)
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=(folder / "mosquitto.log").open("w"))
        self.pid = self.proc.pid
        import socket

        while True:  # until it accepts (or has died)
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {folder / 'mosquitto.log'}")
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(30)


def bench(kind: str, devices: int, idle: int, workers: int, out: Path) -> dict:
    from fedlora_edge.coordinator.broker import EmbeddedBroker
    from fedlora_edge.coordinator.registry import Registry
    from fedlora_edge.core.mqtt import Link

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    reg = Registry.create(out / "registry")
    reg.add_run(RUN_ID)  # its coordinator's login (Mosquitto's password file and ACL)
    creds = reg.add_many([f"dev{i:05d}" for i in range(devices)])
    enrol_s = time.perf_counter() - t0
    row = {"broker": kind, "devices": devices, "idle_sockets": idle, "enrol_s": round(enrol_s, 2)}
    helpers: list[subprocess.Popen] = []
    me = [sys.executable, str(Path(__file__).resolve())]
    if kind == "mosquitto":
        (out / "mosquitto").mkdir()
    with (Mosquitto(reg, out / "mosquitto") if kind == "mosquitto" else EmbeddedBroker(registry=reg, log=print)) \
            as broker:
        row["broker_rss_mb_empty"], row["broker_fds_empty"] = _proc_stat(broker.pid)
        try:
            idler = subprocess.Popen(me + ["--idle-helper", broker.host, str(broker.port), str(idle)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            helpers.append(idler)
            row["idle_opened"] = int(_expect(idler, "opened")[0])
            t0 = time.perf_counter()
            for w in range(workers):
                part = out / f"worker{w}.json"
                part.write_text(json.dumps([(c.mqtt_username, c.mqtt_password) for c in creds[w::workers]]))
                helpers.append(subprocess.Popen(me + ["--worker", broker.host, str(broker.port), str(part)],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            row["connected"] = sum(int(_expect(h, "connected")[0]) for h in helpers[1:])
            row["connect_s"] = round(time.perf_counter() - t0, 2)
            idler.stdin.write(b"?\n")
            idler.stdin.flush()
            row["idle_closed_by_broker"] = int(_expect(idler, "closed")[0])
            row["broker_rss_mb_fleet"], row["broker_fds_fleet"] = _proc_stat(broker.pid)
            link = Link(reg.coordinator_login(broker.address, run_id=RUN_ID), f"coordinator@{RUN_ID}")
            link.connect()
            sent = time.time()
            link.publish(f"fedlora/{RUN_ID}/round", json.dumps({"round": 1}).encode(), retain=True)
            got = [_expect(h, "received") for h in helpers[1:]]
            row["received"] = sum(int(g[0]) for g in got)
            row["publish_to_last_receipt_s"] = round(max(float(g[1]) for g in got) - sent, 2)
            row["broker_rss_mb_after"], row["broker_fds_after"] = _proc_stat(broker.pid)
            row["bench_process_fds"] = len(os.listdir("/proc/self/fd"))
            link.close()
        finally:
            for h in helpers:
                try:
                    h.stdin.close()
                except OSError:
                    pass
            for h in helpers:
                try:
                    h.wait(30)
                except subprocess.TimeoutExpired:
                    h.kill()
    return row


def main() -> int:
    _raise_fd_limit()
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        host, port, path = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        asyncio.run(_devices(host, port, [tuple(c) for c in json.loads(Path(path).read_text())]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--idle-helper":
        _idle(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=3000)
    p.add_argument("--idle", type=int, default=1500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--brokers", default="embedded", help="embedded, mosquitto, or both (comma-separated)")
    p.add_argument("--out", default=str(ROOT / "runs" / "broker-scale"))
    a = p.parse_args()
    rows = [bench(kind, a.devices, a.idle, max(1, a.workers), Path(a.out) / kind) for kind in a.brokers.split(",")]
    for k in rows[0]:
        print(f"{k:28s} " + " ".join(f"{str(r[k]):>12s}" for r in rows))
    ok = all(r["connected"] == r["received"] == a.devices for r in rows)
    print("every device connected and received the round" if ok else "NOT every device got the round")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
