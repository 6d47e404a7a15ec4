"""``fedlora coordinator``: the engine driven over an MQTT broker (protocol: docs/protocol.md).

Per round: publish the round (retained), send each sampled online device its assignment in
chunks, collect updates until all are in or the round's deadline passes, acknowledge each
(accepted, rejected, stale or duplicate), then let the engine validate and aggregate, and save
the run's state.  Idempotent per (run, round, device, update id): a re-sent update is
acknowledged again and counted once.  A message that breaks the protocol is logged with the
device and the reason, and the round goes on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edge_client.framing import ProtocolError, Reassembler, chunk_transfer, decode_json, encode_json
from edge_client.mqtt import BrokerAddress, Link, device_topic, publish_packet_bytes, topic
from edge_client.profile import DeviceProfile, ProfileError

from .config import ConfigError, RunConfig
from .engine import Engine, Returned


class Coordinator:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, broker: BrokerAddress, reporter=None,
                 resume: bool = False, log=print, watch=None):
        if cfg.contamination.attack != "none":
            raise ConfigError("contamination: made-up contamination is a `fedlora simulate` feature; over MQTT "
                              "the devices send what they send (set contamination.attack: none)")
        self.cfg = cfg
        self.engine = Engine(cfg, out_dir, reporter)
        self.run_id = cfg.transport.run_id
        self.log = log
        self.watch = watch  # called while waiting for devices; may raise (emulate: a device process died)
        self.first_round = 1
        if resume:
            self.first_round = self.engine.load_state() + 1
            self.log(f"resuming run '{self.run_id}' after round {self.first_round - 1}")
        self.online: set[str] = set()
        self.hello: set[str] = set()
        self.programs_held: dict[str, set[str]] = {}  # device -> training programs it holds (executorch trainer)
        self.seen_updates: dict[tuple[str, str], str] = {}  # (device, update id) -> ack status
        self.duplicates: list[tuple[str, str]] = []  # re-sent updates, acknowledged and not counted
        self.events: list[dict] = []  # protocol violations and other rejections, for the report
        self.reassembler = Reassembler(cfg.transport.max_update_bytes)
        self.wire_up: dict[str, int] = {}  # device -> MQTT bytes received on its up topic this round
        self.link = Link(broker, f"fedlora-{self.run_id}-coordinator")
        for leaf in ("status", "hello", "up", "event"):
            self.link.subscribe(topic(self.run_id, "dev", "+", leaf))

    # ------------------------------------------------------------------------------- messages

    def _device_of(self, t: str) -> tuple[str, str]:
        parts = t.split("/")  # fedlora/<run>/dev/<id>/<leaf>
        return parts[3], parts[4]

    def _reject(self, device: str, reason: str, round_idx: int | None = None) -> None:
        self.events.append({"device": device, "round": round_idx, "reason": reason})
        self.log(f"rejected from {device}: {reason}")

    def _ack(self, device: str, round_idx: int, update_id: str, status: str, reason: str = "") -> None:
        self.link.publish(device_topic(self.run_id, device, "ack"), encode_json(
            {"type": "ack", "round": round_idx, "update_id": update_id, "status": status, "reason": reason}))

    def handle(self, t: str, payload: bytes, round_idx: int, pending: dict, returned: dict) -> None:
        """One incoming message.  ``pending``: device -> Assignment of this round; ``returned``:
        device -> Returned, filled as updates arrive."""
        device, leaf = self._device_of(t)
        if device not in self.engine.by_id:
            self._reject(device, f"unknown device '{device}' (not in fleet {self.cfg.fleet})", round_idx)
            return
        try:
            if leaf == "status":
                state = decode_json(payload).get("state")
                (self.online.add if state == "online" else self.online.discard)(device)
                if state == "offline":
                    self.log(f"{device} is offline")
            elif leaf == "hello":
                msg = decode_json(payload)
                profile = DeviceProfile.from_dict(msg.get("profile"), f"hello from {device}")
                examples = msg.get("examples")
                if not isinstance(examples, int) or isinstance(examples, bool) or examples < 1:
                    raise ProtocolError(f"hello from {device}: 'examples' must be a positive integer")
                self.engine.set_profile(device, profile, examples)
                have = msg.get("programs", [])
                self.programs_held[device] = {str(k) for k in have} if isinstance(have, list) else set()
                self.hello.add(device)
            elif leaf == "event":
                msg = decode_json(payload)
                if msg.get("type") == "failure" and msg.get("round") == round_idx and device in pending:
                    returned[device] = Returned(pending[device], failure=str(msg.get("reason")))
                    self.log(f"{device} failed round {round_idx}: {msg.get('reason')}")
            elif leaf == "up":
                self.wire_up[device] = self.wire_up.get(device, 0) + publish_packet_bytes(t, len(payload))
                tr = self.reassembler.add(payload, device_from_topic=device)
                if tr is not None:
                    self._update(device, tr, round_idx, pending, returned)
        except (ProtocolError, ProfileError) as exc:
            self._reject(device, str(exc), round_idx)

    def _update(self, device: str, tr, round_idx: int, pending: dict, returned: dict) -> None:
        meta = tr.meta or {}
        uid = str(meta.get("update_id") or tr.transfer)
        key = (device, uid)
        if key in self.seen_updates:
            self.duplicates.append(key)
            self._ack(device, tr.round, uid, "duplicate")
            return
        if tr.round != round_idx or device not in pending or device in returned:
            status = "stale" if tr.round < round_idx else "rejected"
            reason = (f"update for round {tr.round}, the run is at round {round_idx}" if tr.round != round_idx
                      else "no assignment pending for this device")
            self.seen_updates[key] = status
            self._reject(device, reason, round_idx)
            self._ack(device, tr.round, uid, status, reason)
            return
        self.seen_updates[key] = "received"
        returned[device] = Returned(pending[device], tr.data, meta.get("report") or {})
        self._ack(device, tr.round, uid, "received")

    # ---------------------------------------------------------------------------------- rounds

    def wait_for_devices(self) -> None:
        need = self.cfg.transport.min_devices or len(self.engine.clients)
        deadline = time.monotonic() + self.cfg.transport.wait_for_devices_s
        self.log(f"waiting for {need} device(s) to say hello on run '{self.run_id}'")
        while len(self.hello & self.online) < need:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"only {len(self.hello & self.online)} of {need} devices are online within "
                                   f"{self.cfg.transport.wait_for_devices_s:.0f} s: {sorted(self.hello & self.online)}")
            msg = self.link.get(min(left, 1.0))
            if msg:
                self.handle(*msg, round_idx=0, pending={}, returned={})
            if self.watch:
                self.watch(self.hello & self.online)

    def run_round(self, round_idx: int) -> dict:
        e, tr = self.engine, self.cfg.transport
        t0 = time.perf_counter()
        self.link.publish(topic(self.run_id, "round"), encode_json(
            {"type": "round", "run": self.run_id, "round": round_idx, "state": "training"}), retain=True)
        assignments, skipped = e.open_round(round_idx, available=self.online)
        pending = {a.client: a for a in assignments}
        returned: dict[str, Returned] = {}
        e.reporter.round_start(round_idx, len(assignments))
        self.wire_up = {}
        t_send = time.perf_counter()
        for a in assignments:
            self.send_program(a, round_idx)
            for chunk in chunk_transfer(a.start, kind="plan", run=self.run_id, round_idx=round_idx, device=a.client,
                                        transfer=f"plan-{round_idx}-{a.client}", meta=a.meta,
                                        chunk_bytes=tr.chunk_bytes):
                self.link.publish(device_topic(self.run_id, a.client, "down"), chunk)
        deadline = time.monotonic() + tr.round_timeout_s
        while len(returned) < len(pending) and time.monotonic() < deadline:
            msg = self.link.get(min(1.0, max(0.0, deadline - time.monotonic())))
            if msg:
                before = len(returned)
                self.handle(*msg, round_idx=round_idx, pending=pending, returned=returned)
                if len(returned) > before:
                    last = list(returned.values())[-1]
                    e.reporter.client_done(last.assignment.client, last.report, last.assignment.plan.rank)
        exchange_s = time.perf_counter() - t_send
        for cid, a in pending.items():
            if cid not in returned:
                returned[cid] = Returned(a, failure=f"no complete update by the round's deadline "
                                                    f"({tr.round_timeout_s:.0f} s)")
        dropped = self.reassembler.drop_incomplete()
        for device, transfer in dropped:
            self._reject(device, f"transfer {transfer} incomplete at the deadline: discarded", round_idx)
        record = e.close_round(round_idx, [returned[a.client] for a in assignments], skipped, t0)
        record["protocol_rejections"] = [x for x in self.events if x["round"] == round_idx]
        record["exchange_seconds"] = round(exchange_s, 4)  # first plan sent -> last update in
        for row in record["clients"]:
            row["uplink_wire_bytes"] = self.wire_up.get(row["client"], 0)
        for r in record["rejected"]:
            self.log(f"round {round_idx}: rejected {r['reason']}")
        e.save_state()
        return record

    def send_program(self, a, round_idx: int) -> None:
        """Before an executorch plan, the training program it names, unless the device holds it."""
        key = (a.meta.get("trainer") or {}).get("program")
        held = self.programs_held.setdefault(a.client, set())
        if key is None or key in held:
            return
        path = self.engine.programs.path(key)
        side = json.loads(path.with_suffix(".json").read_text())
        self.log(f"sending training program {key} ({side['bytes'] / 2**20:.1f} MiB) to {a.client}")
        for chunk in chunk_transfer(path.read_bytes(), kind="program", run=self.run_id, round_idx=round_idx,
                                    device=a.client, transfer=f"program-{key}-{a.client}", meta=side,
                                    chunk_bytes=self.cfg.transport.chunk_bytes):
            self.link.publish(device_topic(self.run_id, a.client, "down"), chunk)
        held.add(key)

    def run(self) -> dict:
        self.link.connect()
        try:
            # replaces a retained "done" of an earlier run with this id on a persistent broker
            self.link.publish(topic(self.run_id, "round"), encode_json(
                {"type": "round", "run": self.run_id, "round": self.first_round - 1, "state": "waiting"}), retain=True)
            self.wait_for_devices()
            if self.first_round == 1:
                self.engine.begin()
            elif not hasattr(self.engine, "base_accuracy"):
                self.engine.base_accuracy = self.engine.evaluate_base()
            for r in range(self.first_round, self.cfg.rounds + 1):
                self.run_round(r)
            self.link.publish(topic(self.run_id, "round"), encode_json(
                {"type": "round", "run": self.run_id, "round": self.cfg.rounds, "state": "done"}), retain=True)
            report = self.engine.finish()
            return report
        finally:
            self.link.close()


def check_resume(out_dir: str | Path, resume: bool) -> None:
    if resume and not (Path(out_dir) / "state" / "run.json").is_file():
        raise ConfigError(f"--resume: no saved run state in {Path(out_dir) / 'state'}")
