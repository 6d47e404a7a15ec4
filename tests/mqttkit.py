"""What the MQTT tests share: a registry, brokers (the embedded one, and Mosquitto configured by
`fedlora broker-config` with TLS, passwords and the per-device ACL), a coordinator on a thread,
hand-driven devices that sign what they send, and real client processes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from fleets import FAST_PROFILE, fleet

from fedlora_edge.coordinator.broker import EmbeddedBroker, free_port
from fedlora_edge.coordinator.brokerconf import mosquitto as mosquitto_conf
from fedlora_edge.coordinator.config import load_config
from fedlora_edge.coordinator.emulate import device_command
from fedlora_edge.coordinator.registry import Registry
from fedlora_edge.coordinator.service import Coordinator
from fedlora_edge.core.data import generate_task, write_jsonl
from fedlora_edge.core.framing import ProtocolError, Reassembler, parse_chunk
from fedlora_edge.core.identity import Counter, ReplayGuard, Signer, Verifier, save_credentials
from fedlora_edge.core.messages import Outbox, read_message
from fedlora_edge.core.mqtt import BrokerAddress, Link, device_topic, topic
from fedlora_edge.core.profile import DeviceProfile, save_profile


def mosquitto_exe() -> str:
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        if os.environ.get("FEDLORA_REQUIRE_MOSQUITTO") == "1":
            pytest.fail("mosquitto is required (FEDLORA_REQUIRE_MOSQUITTO=1) but not installed")
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    return exe


def wait_accepting(port: int, proc: subprocess.Popen | None = None, tls: bool = False) -> None:
    """Until the broker accepts a connection (and, with TLS, completes a handshake): an event, not a sleep."""
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), 1) as s:
                if tls:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
                    ctx.wrap_socket(s).close()
                return
        except OSError:
            select_wait = threading.Event()
            select_wait.wait(0.05)


class Mosquitto:
    """Mosquitto from `fedlora broker-config mosquitto` (TLS unless ``tls=False``) on a random port."""

    def __init__(self, registry: Registry, folder: Path, tls: bool = True, mtls: bool = False, extra: str = ""):
        mosquitto_exe()  # skips (or fails in CI) without it
        self.port = free_port()
        self.registry, self.folder, self.tls, self.mtls, self.extra = registry, folder, tls, mtls, extra
        self.configure()
        self.start()

    def configure(self):
        """(Re)write the broker's files from the registry, as `fedlora broker-config mosquitto` does."""
        conf = mosquitto_conf(self.registry, self.folder, port=self.port, bind="127.0.0.1", tls=self.tls,
                              hosts=["127.0.0.1", "localhost"], mtls=self.mtls)
        text = conf.read_text().replace("persistence true", "persistence false")
        if os.geteuid() == 0:  # mosquitto started as root drops to a user that cannot read the 0600 files
            text += "user root\n"
        conf.write_text(text + self.extra)
        self.conf = conf

    def restart(self):
        self.stop()
        self.configure()
        self.start()

    def start(self):
        self.proc = subprocess.Popen([mosquitto_exe(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_accepting(self.port, self.proc, self.tls)

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.port, tls=self.tls)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


@dataclasses.dataclass
class Deployment:
    kind: str
    registry: Registry
    address: BrokerAddress  # the broker, logged in as nobody
    broker: object
    links: list = dataclasses.field(default_factory=list)  # every client a test opened: closed at the end

    def link(self, address: BrokerAddress, client_id: str) -> Link:
        link = Link(address, client_id)
        self.links.append(link)
        return link

    def close(self) -> None:
        """Close the test's clients (a client left reconnecting could find a later test's broker on a
        reused port, under the same client id), then stop the broker."""
        for link in self.links:
            link.close()
        self.broker.stop()

    def coordinator_for(self, run_id: str) -> BrokerAddress:
        """The broker, logged in as run ``run_id``'s coordinator (Mosquitto: its login added and the
        broker restarted, as an operator runs `fedlora broker-config` again for a new run)."""
        if self.registry.add_run(run_id) and self.kind == "mosquitto":
            self.broker.restart()
        return self.registry.coordinator_login(self.address, run_id=run_id)

    def enrol(self, *ids: str, **kw) -> dict:
        """Enrol devices (Mosquitto: its password file written again and the broker restarted, before
        any run starts); returns id -> credentials."""
        creds = {i: self.registry.add(i, replace=True, **kw) for i in ids}
        if self.kind == "mosquitto":
            self.broker.restart()
        return creds


def deployment(kind: str, tmp: Path):
    reg = Registry.create(tmp / "registry")
    if kind in ("embedded", "open"):  # open: anyone may connect and publish anywhere; only signatures hold
        b = EmbeddedBroker(registry=reg, insecure=kind == "open", log=lambda *_: None).start()
        return Deployment(kind, reg, b.address, b)
    m = Mosquitto(reg, tmp / "mosquitto")
    return Deployment(kind, reg, m.address, m)


def config(tmp: Path, ids: list[str], profiles=None, **over):
    base = {"model": "tiny-llama", "method": "fedit", "fleet": fleet(tmp, ids, **(profiles or {})), "rounds": 1,
            "clients_per_round": len(ids), "train.steps": 2, "train.batch_size": 4, "data.tasks": ["add"],
            "data.samples_per_client": 8, "data.eval_per_domain": 2, "max_new_tokens": 3, "lora.rank": 2,
            "lora.max_rank": 4, "transport.round_timeout_s": 60, "transport.wait_for_devices_s": 120,
            "transport.run_id": uuid.uuid4().hex[:8]}
    base.update(over)
    return load_config(overrides=base)


def coordinator(dep: Deployment, cfg, out: Path, resume=False, **kw) -> Coordinator:
    return Coordinator(cfg, out, dep.coordinator_for(cfg.transport.run_id), dep.registry, resume=resume,
                       log=kw.pop("log", lambda *_: None), **kw)


class CoordThread(threading.Thread):
    def __init__(self, coord: Coordinator):
        super().__init__(daemon=True)
        self.coord, self.report, self.error = coord, None, None

    def run(self):
        try:
            self.report = self.coord.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc

    def result(self, timeout=300):
        self.join(timeout)
        assert not self.is_alive(), "coordinator did not finish"
        if self.error:
            raise self.error
        return self.report


def start_run(dep: Deployment, cfg, out: Path, creds: dict, ids=None):
    """A coordinator on a thread and hand-driven devices that said hello: (coordinator, thread, devices)."""
    coord = coordinator(dep, cfg, out)
    th = CoordThread(coord)
    th.start()
    devs = {i: FakeDevice(dep, cfg.transport.run_id, i, creds=creds[i]) for i in (ids or creds)}
    return coord, th, devs


def two_runs_train(devs: dict, threads: dict) -> None:
    """Two rounds of every hand-driven device (each run's rounds interleaved), every update
    accepted, and every run's report: rounds 1 and 2 ok with two updates each."""
    for r in (1, 2):
        plans = {i: d.next_plan() for i, d in devs.items()}
        uids = {i: d.send(r, trained(plans[i].data, k)) for k, (i, d) in enumerate(sorted(devs.items()))}
        for i, d in devs.items():
            assert d.wait_ack(uids[i])["status"] == "accepted"
    for th in threads.values():
        report = th.result()
        assert [(x["round"], x["status"], x["valid_updates"]) for x in report["rounds"]] == [(1, "ok", 2), (2, "ok", 2)]


def trained(data: bytes, k: int) -> bytes:
    """A deterministic stand-in for local training: every factor moved by a device-specific amount."""
    import torch

    from fedlora_edge.core.wire import decode_tensors, encode_tensors

    t = decode_tensors(data)
    return encode_tensors({key: v + 0.01 * (k + 1) * torch.ones_like(v) for key, v in t.items()})


def report_of(r: int, n: int = 8) -> dict:
    return {"round": r, "num_examples": n, "steps": 1, "first_loss": 1.0, "last_loss": 1.0, "seconds": 0.1}


class FakeDevice:
    """A device driven by the test: learns the run, says hello, receives plans, sends what it is told.
    It signs with ``creds`` (its own, from the registry, unless a test hands it another's)."""

    def __init__(self, dep: Deployment, run: str, device_id: str, creds, username=None, password=None,
                 examples: int = 8, hello: bool = True):
        self.run, self.id, self.dep = run, device_id, dep
        self.creds = creds
        self.outbox = Outbox(Signer(self.creds.signing_key), Counter(), run)
        self.verifier = Verifier(lambda s: self.creds.coordinator_key if s == "coordinator" else None)
        self.guard = ReplayGuard()
        self.session = uuid.uuid4().hex[:8]
        address = dataclasses.replace(dep.address, username=username or self.creds.mqtt_username,
                                      password=password or self.creds.mqtt_password, ca_pem=self.creds.ca_pem)
        self.link = dep.link(address, self.creds.mqtt_username)
        for leaf in ("down", "ack"):
            self.link.subscribe(device_topic(run, device_id, leaf))
        self.link.subscribe(topic(run, "round"))
        self.link.connect()
        self.reasm = Reassembler(1 << 30)
        self.acks: list[dict] = []
        self.rounds: list[dict] = []
        self.refused: list[str] = []
        self.examples = examples
        if hello:
            self.wait_round()
            self.say_hello()

    def close(self):
        self.link.close()

    def _read(self, timeout):
        msg = self.link.get(timeout)
        if msg is None or not msg[1]:
            return None
        try:
            _, leaf, fields, data = read_message(self.verifier, self.guard, self.run, *msg)
        except ProtocolError as exc:  # what the real client does too: log, ignore, go on
            self.refused.append(str(exc))
            return None
        if leaf == "round":
            self.outbox.nonce = fields["nonce"]
            self.rounds.append(fields)
        elif leaf == "ack":
            self.acks.append(fields)
        return leaf, fields, data

    def wait_round(self, state=None, timeout=120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.rounds and (state is None or self.rounds[-1]["state"] == state):
                return self.rounds[-1]
            self._read(0.5)
        raise TimeoutError(f"{self.id}: no round message")

    def say_hello(self, **over):
        t = device_topic(self.run, self.id, "hello")
        prof = DeviceProfile(name="fake", **FAST_PROFILE)
        self.link.publish(t, self.outbox.json(t, {"type": "hello", "device": self.id, "session": self.session,
                                                  "profile": prof.to_dict(), "examples": self.examples, **over}),
                          retain=True)

    def next_plan(self, timeout=120):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            got = self._read(0.5)
            if got and got[0] == "down":
                tr = self.reasm.add(got[1], got[2])
                if tr is not None:
                    return tr
        raise TimeoutError(f"{self.id}: no plan")

    def raw(self, payload: bytes, leaf="up"):
        self.link.publish(device_topic(self.run, self.id, leaf), payload)

    def send(self, round_idx, data: bytes, update_id=None, report=None, chunk_bytes=4096, meta=None):
        uid = update_id or uuid.uuid4().hex
        meta = meta or {"round": round_idx, "update_id": uid, "report": report or report_of(round_idx)}
        t = device_topic(self.run, self.id, "up")
        for ch in self.outbox.chunks(t, data, kind="update", round_idx=round_idx, device=self.id, transfer=uid,
                                     meta=meta, chunk_bytes=chunk_bytes):
            self.link.publish(t, ch)
        return uid

    def event(self, **fields):
        t = device_topic(self.run, self.id, "event")
        self.link.publish(t, self.outbox.json(t, {"device": self.id, **fields}))

    def wait_ack(self, update_id, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for a in self.acks:
                if a["update_id"] == update_id:
                    return a
            self._read(0.2)
        raise TimeoutError(f"{self.id}: no ack for {update_id}")


def chunk_header(payload: bytes) -> dict:
    return parse_chunk(payload[64:])[0]


def spawn(dep: Deployment, run, cid, folder: Path, profile, creds=None, slowdown=1.0, data=None, env=None):
    """A real `fedlora client` process with the credentials ``creds`` (kept in ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "data.jsonl", data or generate_task("add", 8, 0))
    save_profile(profile, folder / "profile.yaml")
    if creds is not None:
        save_credentials(folder / "credentials.json", creds)
    cmd, _ = device_command(dep.address, run, cid, folder, profile, 1.0, 1.0, 1)
    cmd[cmd.index("--slowdown") + 1] = str(slowdown)
    log = (folder / "client.log").open("a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))


def wait_for(pred, timeout=120, what="condition"):
    """Wait on a condition that an event elsewhere makes true (a file appears, a log line is written)."""
    end = time.monotonic() + timeout
    ev = threading.Event()
    while time.monotonic() < end:
        if pred():
            return
        ev.wait(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def log_of(folder: Path) -> str:
    p = folder / "client.log"
    return p.read_text() if p.exists() else ""
