"""``fedlora coordinator``: the engine driven over an MQTT broker (protocol: docs/protocol.md).

Per round: journal the round's assignments (:mod:`.runstate`), publish the round (signed,
retained), send each sampled online device its plan in signed chunks, and collect updates until
every sampled device has answered, gone offline, or the deadline passes.  Each complete update is
checked at once against that device's plan and its report; a valid one is written to the
journal and fsynced, *then* acknowledged ``accepted``; a bad one is acknowledged ``rejected``
with the reason, and the device may send a corrected one within the round.  The engine then
aggregates what was accepted, and the run's state is snapshotted.

Nothing a device sends can stop the coordinator: every message is verified (signature, run,
nonce, counter, device) before it is looked at, and any failure is a logged rejection with its
reason (``events`` in the round's record).  What one device may have in flight is capped.

Crash consistency: a coordinator killed at any point and started again with ``--resume``
re-opens the round it was in from the journal, keeps what it had accepted, accepts the updates
the devices still hold, sends plans only to the devices whose update is missing, and ends with
the same adapter as a run that was never interrupted.
"""

from __future__ import annotations

import collections
import json
import math
import re
import time
from pathlib import Path

import numpy as np

from fedlora_edge.core import durable
from fedlora_edge.core.durable import write_bytes
from fedlora_edge.core.framing import ProtocolError, Reassembler, Transfer
from fedlora_edge.core.identity import Counter, ReplayGuard, Signer, Verifier
from fedlora_edge.core.lora import ClientPlan
from fedlora_edge.core.messages import Outbox, read_message
from fedlora_edge.core.mqtt import (
    BrokerAddress,
    BrokerAuthError,
    Link,
    device_topic,
    publish_packet_bytes,
    topic,
)
from fedlora_edge.core.profile import DeviceProfile, ProfileError
from fedlora_edge.core.secagg import ServerSecAgg
from fedlora_edge.edge_client.partial import update_shapes

from .aggregate import Contribution
from .buffered import BufferedService
from .config import ConfigError, RunConfig
from .engine import Assignment, Engine, Returned
from .errors import StorageError
from .faults import crash_point
from .ledger import Answers, Refusals, kind_of
from .methods import get_method
from .openround import OpenRound
from .registry import Registry, RegistryError
from .runstate import JournalRound
from .validate import UpdateRejected, check_report

# exit statuses of `fedlora coordinator` and `fedlora emulate` (README, docs/protocol.md)
EXIT_ROUNDS_FAILED = 4
EXIT_TOO_FEW_DEVICES = 5
EXIT_STORAGE = 6
EXIT_PRIVACY_BUDGET = 7  # the run stopped before a round would take epsilon past privacy.dp.max_epsilon

UPDATE_ID = re.compile(r"^[0-9a-f]{32}$")  # an update id's documented form (docs/protocol.md)
MAX_REFUSAL_ACKS = 64    # refusals answered per device and round; past it a device's junk gets no answer
MAX_REJECTION_KINDS = 5  # kinds of reason kept per device and round in the round's record (each with a count)
MAX_PROGRAMS_LISTED = 64  # programs a hello may say its device holds


class TooFewDevices(TimeoutError):
    """Fewer devices than needed said hello in time; the message says who is missing."""


class Coordinator:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, broker: BrokerAddress, registry: Registry,
                 reporter=None, resume: bool = False, log=print, watch=None, enrol=None):
        check_deployable(cfg)
        self.cfg = cfg
        self.out = Path(out_dir)
        check_writable(self.out / "state")
        self.engine = Engine(cfg, out_dir, reporter)
        if enrol is not None:  # emulate enrols its fleet once the engine has dealt out the data
            enrol(self.engine)
        self.registry = registry
        self.run_id = cfg.transport.run_id
        self.log = log
        try:  # one coordinator per run and registry: a second one is refused, naming the first
            registry.add_run(self.run_id)
            self.run_lock = registry.lock_run(self.run_id)
        except RegistryError as exc:
            raise ConfigError(str(exc)) from None
        self.watch = watch  # called while waiting for devices; may raise (emulate: a device process died)
        missing = [c.id for c in self.engine.clients if registry.active(c.id) is None]
        if missing:
            raise ConfigError(f"fleet {cfg.fleet}: device(s) {', '.join(missing)} are not enrolled (or revoked) in the "
                              f"registry {registry.folder}; enrol each with `fedlora devices add ID --registry "
                              f"{registry.folder}`")
        for c in self.engine.clients:
            c.max_examples = self._grant(c.id)
        self.first_round = 1
        self.resume = resume
        if resume:
            self.first_round = self.engine.load_state() + 1
            self.log(f"resuming run '{self.run_id}' after round {self.first_round - 1}")
        else:
            set_aside_state(self.out / "state", log)
        creds = registry.coordinator_credentials()
        self.outbox = Outbox(Signer(creds.signing_key), Counter(registry.folder / "fedlora_edge.coordinator.ctr"), self.run_id,
                             self.engine.nonce)
        self.verifier = Verifier(registry.key_of)
        self.guard = ReplayGuard()
        self.sessions: dict[str, str] = {}  # device -> session of its latest hello in this run (it is online)
        self.farewells: set[str] = set()  # devices that cleared their hello (they left the finished run)
        self.offline_sessions: dict[str, str] = {}  # device -> session its latest Last Will closed
        self.programs_held: dict[str, set[str]] = {}  # device -> training programs it holds (executorch trainer)
        self.answers = Answers()  # (device, update id) -> (round, status, reason), a few ids per device
        self.program_sends: dict[str, int] = {}  # device -> training programs sent to it in this run
        self._outstanding: collections.deque = collections.deque()  # (paho message info, bytes) not waited for
        self._outstanding_bytes = 0
        self._unsynced: dict[str, tuple] = {}  # device -> its accepted update awaiting the journal's fsync and ack
        self.refusals = Refusals()  # refused messages, summarised per round, for the log and the report
        self.reassembler = Reassembler(cfg.transport.max_update_bytes)
        self.wire_up: dict[str, int] = {}  # device -> MQTT bytes received on its up topic this round
        self.round: OpenRound | None = None
        self.t_start = time.monotonic()  # (reset when the first round starts: elapsed_seconds)
        self.buffered: BufferedService | None = None  # schedule.mode: buffered (run)
        self._journal_round: JournalRound | None = None  # run(): the round a resumed run was in, read once
        self.completed = self.first_round - 1
        self.announce = False  # (re)publish the round state: set by every (re)connect
        self._announced: tuple[int, str, float] | None = None  # the round message last published, and when
        self.done_said = False  # `done` published: the round message is never published again
        self.engine.prepare_programs()  # before anyone is served: no build falls in a round
        from .programs import BackgroundBuilds

        self.engine.builds = BackgroundBuilds(self.engine.programs, log=log)
        self.broker = broker
        self.link = Link(broker, broker.username or f"coordinator-{self.run_id}", log=log)
        self.link.on_connect_hooks.append(lambda: setattr(self, "announce", True))
        self._connected = False
        for leaf in ("status", "hello", "up", "event"):
            self.link.subscribe(topic(self.run_id, "dev", "+", leaf))

    @property
    def events(self) -> list[dict]:
        """Refused messages of the last rounds: per device and kind of reason, a count and the first example."""
        return list(self.refusals)

    @property
    def duplicates(self) -> list[tuple[str, str]]:
        """(device, update id) of the last few re-sends of an update already answered, per device."""
        return self.answers.recent_resends

    @property
    def online(self) -> set[str]:
        """Devices that said hello in this run, are connected, and are still enrolled."""
        self.registry.refresh()
        return {d for d in self.sessions if self.registry.active(d, fresh=False) is not None}

    def _grant(self, device: str) -> int:
        e = self.registry.active(device)
        return e.max_examples if e is not None and e.max_examples else self.cfg.weights.max_examples

    # ------------------------------------------------------------------------------- sending

    def _publish(self, t: str, payload: bytes, retain: bool = False, wait: bool = True) -> bool:
        """Publish, waiting a bounded time for a lost broker; False (logged) if it did not go out:
        whatever it was is sent again when the device or the broker comes back."""
        try:
            info = self.link.publish(t, payload, retain=retain, timeout_s=10.0, wait=wait)
        except TimeoutError as exc:
            self.log(f"broker unreachable, not sent: {exc}")
            return False
        if info is not None:  # not waited for: paho delivers it; the window bounds what is outstanding
            self._outstanding.append((info, len(payload)))
            self._outstanding_bytes += len(payload)
            self._settle(self.WINDOW_MESSAGES, self.WINDOW_BYTES)
        return True

    WINDOW_MESSAGES, WINDOW_BYTES = 256, 64 * 2**20  # messages handed to paho and not yet acknowledged

    def _settle(self, messages: int, nbytes: int) -> None:
        """Wait for the oldest outstanding publishes until at most ``messages`` / ``nbytes`` are left
        (0, 0: all of them): plans go out pipelined, not one broker round trip each."""
        while self._outstanding and (len(self._outstanding) > messages or self._outstanding_bytes > nbytes):
            info, n = self._outstanding.popleft()
            self._outstanding_bytes -= n
            try:
                info.wait_for_publish(10.0)
            except (RuntimeError, ValueError):
                pass  # the connection dropped under it: paho sends it again when it is back

    def _json(self, t: str, obj: dict, retain: bool = False, wait: bool = True) -> bool:
        return self._publish(t, self.outbox.json(t, obj), retain, wait)

    def _publish_round(self, round_idx: int, state: str) -> None:
        self._announced = (round_idx, state, time.monotonic())
        self._json(topic(self.run_id, "round"), {"type": "round", "round": round_idx, "state": state}, retain=True)

    def _ack(self, device: str, round_idx: int, update_id: str, status: str, reason: str = "") -> None:
        # not waiting for the PUBACK: a lost ack costs a re-send of the update, answered again
        self._json(device_topic(self.run_id, device, "ack"), {"type": "ack", "device": device, "round": round_idx,
                                                               "update_id": update_id, "status": status,
                                                               "reason": reason}, wait=False)

    def _decide(self, device: str, round_idx: int, uid: str, status: str, reason: str = "") -> None:
        """Acknowledge an update, and remember the answer for a re-send of it (a few ids per device).
        A device gets at most MAX_REFUSAL_ACKS refusals answered per round: past that, what it sends
        is refused (and counted) without an answer, so its ack queue at the broker cannot grow."""
        if status != "accepted" and not self._may_answer(device):
            return
        self.answers.put(device, uid, round_idx, status, reason)
        self._ack(device, round_idx, uid, status, reason)

    def _may_answer(self, device: str) -> bool:
        r = self.round
        if r is None:
            return True  # between rounds: a device's stale re-sends, bounded by its few held updates
        n = r.refusal_acks.get(device, 0)
        r.refusal_acks[device] = n + 1
        return n < MAX_REFUSAL_ACKS

    def send_plan(self, a: Assignment) -> None:
        r = self.round
        if not self.send_program(a):
            return
        t = device_topic(self.run_id, a.client, "down")
        for chunk in self.outbox.chunks(t, a.start, kind="plan", round_idx=a.round, device=a.client,
                                        transfer=f"plan-{a.round}-{a.client}", meta=a.meta,
                                        chunk_bytes=self.cfg.transport.chunk_bytes):
            if not self._publish(t, chunk, wait=False):
                return
        assert r is not None, "a plan is sent in an open round"
        r.plan_sent[a.client] = time.monotonic()
        r.plan_sessions[a.client] = self.sessions.get(a.client, "")

    def send_program(self, a: Assignment) -> bool:
        """Before an executorch plan, the training program it names, unless the device holds it.
        A device is sent at most ``transport.max_program_sends`` programs in a run (a program is
        hundreds of MiB): past that, its round fails and says why.  False when the plan cannot go."""
        key = (a.meta.get("trainer") or {}).get("program")
        held = self.programs_held.setdefault(a.client, set())
        if key is None or key in held:
            return True
        sent = self.program_sends.get(a.client, 0)
        if sent >= self.cfg.transport.max_program_sends:
            r = self.round
            if r is not None and a.client not in r.failed and a.client not in r.accepted:
                reason = (f"asked for its training program again after {sent} were sent to it in this run "
                          f"(transport.max_program_sends {self.cfg.transport.max_program_sends})")
                self._store(lambda: self.engine.journal.fail(r.index, a.client, reason))
                r.failed[a.client] = reason
                self.log(f"{a.client} failed round {r.index}: {reason}")
            return False
        self.program_sends[a.client] = sent + 1
        path = self.engine.programs.path(key)
        side = json.loads(path.with_suffix(".json").read_text())
        self.log(f"sending training program {key} ({side['bytes'] / 2**20:.1f} MiB) to {a.client}")
        t = device_topic(self.run_id, a.client, "down")
        for chunk in self.outbox.chunks(t, path.read_bytes(), kind="program", round_idx=a.round, device=a.client,
                                        transfer=f"program-{key}-{a.client}", meta=side,
                                        chunk_bytes=self.cfg.transport.chunk_bytes):
            if not self._publish(t, chunk):
                return False
        held.add(key)
        return True

    # ------------------------------------------------------------------------------- messages

    def _reject(self, device: str, reason: str) -> None:
        """Count a refused message (bounded, :class:`~.ledger.Refusals`) and log the first few of its kind."""
        rnd = self.round.index if self.round else self.completed
        n = self.refusals.add(rnd, device, reason)
        if n:
            self.log(f"refused a message from {device[:80]}: {reason[:300]}" + (f" ({n} of this kind in round {rnd})"
                                                                                 if n > 1 else ""))

    def guarded(self, device: str, act) -> None:
        """Run ``act`` (the handling of what ``device`` sent) so that whatever is wrong with it is a
        logged rejection; only StorageError leaves (see :meth:`handle`)."""
        try:
            act()
        except (ProtocolError, ProfileError, UpdateRejected) as exc:
            self._reject(device, str(exc))
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not let one message end the run
            self._reject(device, f"could not handle the message ({type(exc).__name__}: {str(exc)[:200]})")

    def handle(self, t: str, payload: bytes) -> None:
        """One incoming message.  Whatever is wrong with it is a logged rejection; the only
        exception that leaves is StorageError (the run cannot keep its promises without a disk)."""
        parts = t.split("/")
        device = parts[3][:80] if len(parts) == 5 else "?"
        if not payload:  # a retained message being cleared: a device's hello, when it leaves a finished run
            if len(parts) == 5 and parts[4] == "hello" and device in self.sessions:
                self.farewells.add(device)
            return
        def act() -> None:
            _, leaf, msg, data = read_message(self.verifier, self.guard, self.run_id, t, payload)
            if leaf == "status":
                self._status(device, msg)
                return
            if msg["nonce"] != self.engine.nonce:
                if leaf == "hello":
                    self.log(f"{device} said hello for another run (nonce {msg['nonce'][:8]}); waiting for its hello "
                             "in this one")
                    return
                raise ProtocolError(f"for another run (nonce {msg['nonce'][:8]}), not this one")
            if leaf == "hello":
                self._hello(device, msg)
            elif leaf == "event":
                self._event(device, msg)
            else:
                assert data is not None, "read_message gives a chunked topic's message its data"
                self._chunk(device, t, payload, msg, data)

        self.guarded(device, act)

    def _status(self, device: str, msg: dict) -> None:
        if msg.get("state") != "offline" or not isinstance(msg.get("session"), str):
            return
        self.offline_sessions[device] = msg["session"][:64]
        if msg["session"] != self.sessions.get(device):
            return  # the end of an earlier connection (a retained Last Will may arrive before the hello)
        del self.sessions[device]
        self.log(f"{device} is offline")
        r = self.round
        if r is not None and device in r.waiting_for():
            r.gone[device] = time.monotonic()

    def _hello(self, device: str, msg: dict) -> None:
        profile = DeviceProfile.from_dict(msg.get("profile"), f"hello from {device}")
        examples, session, have = msg.get("examples"), msg.get("session"), msg.get("programs", [])
        if not isinstance(examples, int) or isinstance(examples, bool) or not 1 <= examples <= 10**9:
            raise ProtocolError(f"hello from {device}: 'examples' must be an integer in 1..10^9")
        if not isinstance(session, str) or not 1 <= len(session) <= 64:
            raise ProtocolError(f"hello from {device}: 'session' must be a string of 1-64 characters")
        if not isinstance(have, list) or len(have) > MAX_PROGRAMS_LISTED or \
                not all(isinstance(k, str) and 1 <= len(k) <= 200 for k in have):
            raise ProtocolError(f"hello from {device}: 'programs' must be a list of at most {MAX_PROGRAMS_LISTED} "
                                "program keys")
        domains = msg.get("domains") or {}
        if not isinstance(domains, dict) or len(domains) > 100 or not all(
                len(k) <= 100 and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10**9
                for k, v in domains.items()):
            raise ProtocolError(f"hello from {device}: 'domains' must map at most 100 names (up to 100 characters) "
                                "to example counts")
        allowed = self.engine.trainers_allowed
        if profile.trainer not in allowed:
            raise ProtocolError(f"hello from {device}: trainer '{profile.trainer}' is not allowed in this run "
                                f"(allowed: {', '.join(sorted(allowed))}; the fleet's profiles and "
                                "transport.trainers decide)")
        if device not in self.engine.by_id:
            if not self.cfg.transport.open_enrolment:
                raise ProtocolError(f"{device} is enrolled but not in fleet {self.cfg.fleet} (set "
                                    "transport.open_enrolment: true to let enrolled devices join)")
            self.engine.add_client(device, profile, examples, dict(domains))
            self.engine.by_id[device].max_examples = self._grant(device)
            self.log(f"{device} joined (open enrolment)")
        else:
            self.engine.set_profile(device, profile, examples)
        self.programs_held[device] = set(have)
        if self.offline_sessions.get(device) == session:
            return  # its Last Will for this very connection came first: it is gone
        new_session = self.sessions.get(device) != session
        self.sessions[device] = session
        r = self.round
        if r is not None and new_session and device in r.assignments and device not in r.accepted \
                and device not in r.failed:
            r.gone.pop(device, None)
            if r.plan_sessions.get(device) != session:
                self._resend_plan(r, device)  # it (re)connected: its plan may never have reached it

    def _resend_plan(self, r: OpenRound, device: str) -> None:
        """Send a reconnected device its plan again, at most once per ``transport.resend_interval_s``:
        a hello with a new session each time (a flapping link, or a device that means harm) costs the
        coordinator one plan per interval, not one per hello.  A re-send held back goes out when the
        interval has passed (:meth:`_send_due_plans`), if the device still waits for it."""
        sent = r.plan_sent.get(device)
        if sent is not None and time.monotonic() - sent < self.cfg.transport.resend_interval_s:
            r.resend_due.add(device)
            return
        r.resend_due.discard(device)
        self.send_plan(r.assignments[device])

    def _send_due_plans(self, r: OpenRound) -> None:
        for device in sorted(r.resend_due):
            if device in r.accepted or device in r.failed or device not in self.sessions:
                r.resend_due.discard(device)
            elif r.plan_sessions.get(device) == self.sessions[device]:
                r.resend_due.discard(device)  # the plan went to its current session after all
            else:
                self._resend_plan(r, device)

    def _leave_revoked(self, r: OpenRound) -> None:
        """A device revoked during the round leaves it at once: a failure that says so (its messages
        are refused from now on, so waiting for it would only wait for the deadline)."""
        self.registry.refresh()
        for device in r.waiting_for():
            if self.registry.active(device, fresh=False) is None:
                reason = "revoked during the round (its enrolment was withdrawn: `fedlora devices revoke`)"
                self._store(lambda d=device, why=reason: self.engine.journal.fail(r.index, d, why))
                r.failed[device] = reason
                self.sessions.pop(device, None)
                self.log(f"{device} failed round {r.index}: {reason}")

    def _event(self, device: str, msg: dict) -> None:
        r = self.round
        if r is None or device not in r.assignments or msg.get("round") != r.assignments[device].round:
            return  # about a round that is not open, or not this device's plan: nothing to do
        if msg["type"] == "received":
            r.plan_received.add(device)
        elif msg["type"] == "secagg":
            self._secure_message(r, device, msg)
        elif device not in r.accepted and device not in r.failed:
            reason = str(msg.get("reason"))[:500]
            self._store(lambda: self.engine.journal.fail(r.index, device, reason))
            r.failed[device] = reason
            self.log(f"{device} failed round {r.index}: {reason}")

    def _chunk(self, device: str, t: str, payload: bytes, header: dict, data: bytes) -> None:
        if header["kind"] != "update":
            raise ProtocolError(f"a '{header['kind'][:40]}' transfer on the update topic")
        if device in self._unsynced:  # its update awaits the commit: nothing about it is answered before
            self._commit()
        uid, rnd, r = header["transfer"], header["round"], self.round
        if not UPDATE_ID.match(uid):
            raise ProtocolError(f"update id {uid[:40]!r} is not 32 lowercase hex digits")
        if device in self.wire_up or len(self.wire_up) < len(self.engine.by_id) + 16:
            self.wire_up[device] = self.wire_up.get(device, 0) + publish_packet_bytes(t, len(payload))
        answered = self.answers.get(device, uid)
        if answered is not None:  # a re-send of an update already answered: answer the same
            if header["seq"] == 0:
                first_round, status, reason = answered
                self.answers.resent(device, uid)
                if status == "accepted" or self._may_answer(device):
                    self._ack(device, first_round, uid, "duplicate" if status == "accepted" else status, reason)
            return
        current = r.index if r is not None else self.completed + 1
        a = r.assignments.get(device) if r is not None else None
        if r is None or a is None or rnd != a.round:  # (a buffered round's plans may be of earlier versions)
            status = "stale" if rnd < current else "rejected"
            reason = (f"update for round {rnd}, the run is at round {current}" if rnd != current
                      else f"no assignment for {device} in round {rnd}")
            self._decide(device, rnd, uid, status, reason)
            raise ProtocolError(reason)
        if device in r.accepted:
            reason = f"an update from {device} was already accepted in round {rnd}"
            self._decide(device, rnd, uid, "rejected", reason)
            raise ProtocolError(reason)
        if self.buffered is not None and device in r.failed:  # a buffered plan that ended: its late update
            reason = f"its plan for round {rnd} ended: {r.failed[device][:300]}"
            self._decide(device, rnd, uid, "stale", reason)
            raise ProtocolError(reason)
        try:
            tr = self.reassembler.add(header, data, limit=self._expected_bytes(r.assignments[device]))
        except ProtocolError as exc:
            self._refuse_update(r, device, rnd, uid, str(exc))
            return
        if tr is not None:
            self._update(r, device, tr)

    def _expected_bytes(self, a: Assignment) -> int:
        """The largest update this device's plan allows: its tensors plus a generous safetensors header
        (under secure aggregation: the masked vector, 4 bytes per value)."""
        if self.round is not None and self.round.secagg is not None:
            return 4 * self.round.secagg.length
        shapes = update_shapes(self.engine.dims, a.plan)
        return 4 * sum(math.prod(s) for s in shapes.values()) + 256 * len(shapes) + 65536

    def _refuse_update(self, r: OpenRound, device: str, rnd: int, uid: str, reason: str) -> None:
        self._note_rejection(r, device, reason)
        if self.buffered is not None:  # the device drops a refused update: its plan is over
            self.buffered.refused(r, device, reason)
        self._decide(device, rnd, uid, "rejected", reason)
        self._reject(device, f"update {uid[:12]}: {reason}")

    @staticmethod
    def _note_rejection(r: OpenRound, device: str, reason: str) -> None:
        """The round record's ``rejected``: per device, up to MAX_REJECTION_KINDS kinds of reason
        (the last one "(other reasons)"), each with its first text and a count: a device sending
        junk without end adds to counts, not rows."""
        kind = kind_of(reason)
        entry = r.rejected_index.get((device, kind))
        if entry is None:
            kinds = r.rejected_kinds.get(device, 0)
            if kinds >= MAX_REJECTION_KINDS - 1:
                kind, reason = "*", "(other reasons)"
                entry = r.rejected_index.get((device, kind))
            if entry is None:
                entry = r.rejected_index[(device, kind)] = {"client": device, "reason": reason[:500], "count": 0}
                r.rejected_kinds[device] = kinds + 1
                r.rejected.append(entry)
        entry["count"] += 1

    def _update(self, r: OpenRound, device: str, tr: Transfer) -> None:
        """A complete update to the open round ``r``: check it, make it durable, then acknowledge it."""
        meta, uid = tr.meta, tr.transfer
        a = r.assignments[device]
        if self.buffered is not None and self.buffered.full(r):  # it joins the next version's buffer
            self.buffered.defer(device, tr)
            return
        try:
            if meta.get("update_id") != uid or meta.get("round") != a.round:
                raise UpdateRejected(f"client {device}: update meta (update_id {str(meta.get('update_id'))[:40]}, round "
                                     f"{str(meta.get('round'))[:20]}) disagrees with its chunks ({uid[:40]}, {a.round})")
            if r.secagg is not None:
                contribution = self._accept_masked(r, a, tr.data, meta.get("report"))
            elif self.buffered is not None:
                contribution = self.buffered.accept(r, a, tr.data, meta.get("report"))
            else:
                contribution = self.engine.accept(a, tr.data, meta.get("report"))
        except UpdateRejected as exc:
            self._refuse_update(r, device, a.round, uid, str(exc))
            return
        report = dict(meta["report"])
        self._store(lambda: self.engine.journal.accept(r.index, device, uid, tr.data, report, sync=False))
        if self.buffered is not None:
            self.buffered.keep(r, device, contribution)
        else:
            self.engine.offer(device, contribution, None if r.secagg is not None else self._reloader(r.index, a))
        r.accepted[device] = (uid, Returned(a, None, report, update_len=len(tr.data), folded=True))
        r.accepted_at[device] = time.monotonic()
        r.gone.pop(device, None)
        self._unsynced[device] = (a.round, uid, report, a.plan.rank)  # acknowledged by the next _commit

    def _commit(self) -> None:
        """Make the updates accepted since the last commit durable (one fsync of the round's log),
        then acknowledge them: a group commit, so a burst of updates costs one fsync, not one each."""
        if not self._unsynced:
            return
        self._store(self.engine.journal.sync)
        done, self._unsynced = self._unsynced, {}
        for device, (round_idx, uid, report, rank) in done.items():
            self._decide(device, round_idx, uid, "accepted")
            crash_point("ack")
            self.engine.reporter.client_done(device, report, rank)

    def _reloader(self, round_idx: int, a: Assignment):
        """What gives an accepted update back from the round's journal when the fold reaches it (so
        an update that arrived early is not held in memory); None, with a warning, if it no longer
        reads or validates."""
        def reload():
            try:
                _, data, report = self.engine.journal.read_update(round_idx, a.client)
                return self.engine.accept(a, data, report)
            except (OSError, ValueError, KeyError, TypeError, durable.CorruptFile, UpdateRejected) as exc:
                self.log(f"warning: the accepted update of {a.client} in round {round_idx} no longer reads back from "
                         f"the journal ({exc}); it is left out of the round")
                return None
        return reload

    def _store(self, write) -> None:
        try:
            write()
        except OSError as exc:
            raise StorageError(f"cannot write the round journal in {self.engine.journal.folder}: "
                               f"{exc.strerror or exc}; nothing that is not on disk was acknowledged: free the "
                               "space (or make it writable) and run again with --resume") from None

    def _pump(self, timeout_s: float) -> None:
        """Handle what arrives within ``timeout_s``, and republish the round after a reconnect."""
        if self.done_said:  # the run is over: no round message again (a late device must not join it)
            self.announce = False
        elif self.announce:
            self.announce = False
            r = self.round
            self._publish_round(r.index if r else self.completed, "training" if r else "waiting")
            if r is not None:  # back after a lost connection: plans it could not send, or that were lost with it
                for device in sorted(set(r.waiting_for()) - r.plan_received):
                    if device in self.sessions:
                        self._resend_plan(r, device)
        elif self._announced and 0 < self.cfg.transport.announce_every_s <= time.monotonic() - self._announced[2] \
                and self.link.connected:
            # again, unchanged: a device that connected to another node of a broker cluster whose retained
            # messages stay on the node they were published to (RabbitMQ's MQTT plugin) learns the run from it
            self._publish_round(*self._announced[:2])
        msg = self.link.get(timeout_s)
        if msg:
            self.handle(*msg)
            # what else is already here joins this batch (bounded), then one commit answers it all
            t_end = time.monotonic() + 0.05
            for _ in range(500):
                msg = self.link.get(0.0) if time.monotonic() < t_end else None
                if msg is None:
                    break
                self.handle(*msg)
        self._commit()

    # ---------------------------------------------------------------------------------- rounds

    def wait_for_devices(self) -> None:
        need = self.cfg.transport.min_devices or len(self.engine.clients)
        wait_s = self.cfg.transport.wait_for_devices_s
        deadline = time.monotonic() + wait_s
        said = 0.0
        self.log(f"waiting for {need} device(s) to say hello on run '{self.run_id}'")
        while True:
            online = self.online
            if len(online) >= need:
                break
            now = time.monotonic()
            if now >= deadline or now - said >= 10:
                missing = sorted(set(self.engine.by_id) - online)
                listed = f"online: {_some(sorted(online))}; missing: {_some(missing)}"
                if now >= deadline:
                    raise TooFewDevices(f"only {len(online)} of the {need} devices needed said hello within "
                                        f"{wait_s:.0f} s; {listed}")
                self.log(f"waiting: {len(online)}/{need} online; {listed}")
                said = now
            self._pump(min(deadline - now, 1.0))
            if self.watch:
                self.watch(self.online)

    def _reopen(self, round_idx: int) -> bool:
        """Re-open round ``round_idx`` from its journal, if it was open when the coordinator stopped."""
        jr = self._journal_round
        self._journal_round = None
        if jr is None or jr.round != round_idx:
            jr = self.engine.journal.load(round_idx)
        if jr is None or jr.nonce != self.engine.nonce:
            return False
        assignments = {c: Assignment(c, round_idx, ClientPlan.from_json(meta["plan"]), meta, start, nbytes)
                       for c, (meta, start, nbytes) in jr.assignments.items()}
        r = self.round = OpenRound(round_idx, assignments, jr.skipped, time.perf_counter(),
                                   time.monotonic() + self.cfg.transport.round_timeout_s)
        if self.engine.secagg is not None:  # the round's parameters again (they follow from its devices)
            self.engine.secagg_round(round_idx, [self.engine.by_id[c] for c in assignments])
        self.engine.start_fold(list(jr.clients))
        if self.engine.secagg is not None:  # the key exchange lived in memory: this round cannot be unmasked
            why = ("the coordinator restarted during this secure-aggregation round; its key exchange is not kept "
                   "on disk (it would let whoever reads the disk unmask), so the round fails and the run goes on")
            r.failed.update({c: why for c in assignments})
            r.sa_stage = "failed"
            self.log(f"re-opened round {round_idx}: {why}")
            return True
        for c, (uid, data, report) in jr.updates.items():
            a = assignments[c]
            try:
                contribution = self.engine.accept(a, data, report)
            except UpdateRejected as exc:  # cannot happen for what was accepted; say so if it does
                self.log(f"warning: the journal's update of {c} no longer validates ({exc}); asking again")
                continue
            self.engine.offer(c, contribution, self._reloader(round_idx, a))
            r.accepted[c] = (uid, Returned(a, None, report, update_len=len(data), folded=True))
            self.answers.put(c, uid, round_idx, "accepted")
        r.failed.update(jr.failures)
        self.log(f"re-opened round {round_idx}: {len(r.accepted)} of {len(assignments)} update(s) already accepted; "
                 f"waiting for {', '.join(r.waiting_for()) or 'nobody'}")
        return True

    def _await_broker(self, what: str) -> None:
        """Until the broker connection is up (a round opened without it would spend its deadline on
        plans that cannot go out): a line every 10 s while it is down."""
        said = 0.0
        while not self.link.connected:
            if time.monotonic() - said >= 10:
                said = time.monotonic()
                self.log(f"broker {self.link.address.url} unreachable: {what} when it is back")
            self._pump(1.0)

    def run_round(self, round_idx: int, reopen: bool = False) -> dict:
        e, tr = self.engine, self.cfg.transport
        self._await_broker(f"round {round_idx} starts")
        if not (reopen and self._reopen(round_idx)):
            assignments, skipped = e.open_round(round_idx, available=self.online)
            self._store(lambda: e.journal.open(round_idx, e.nonce, assignments, skipped))
            self.round = OpenRound(round_idx, {a.client: a for a in assignments}, skipped, time.perf_counter(),
                                   time.monotonic() + tr.round_timeout_s)
            if e.secagg is not None:
                self._open_secure(self.round)
        r = self.round
        assert r is not None, "the round was just opened or re-opened"
        r.grace_s = tr.offline_grace_s
        self._publish_round(round_idx, "training")
        e.reporter.round_start(round_idx, len(r.assignments))
        self.wire_up = {}
        t_send = time.perf_counter()
        online = self.online
        for c in r.waiting_for():
            if c in online:
                self.send_plan(r.assignments[c])
        self._settle(0, 0)  # every plan acknowledged by the broker
        crash_point("plans-sent")
        if r.secagg is not None or r.sa_stage != "done":
            self.run_secure_round(r)
            return self._close(r, time.perf_counter() - t_send)
        checked = 0.0
        while r.any_waiting() and time.monotonic() < r.deadline:
            self._pump(min(1.0, max(0.0, r.deadline - time.monotonic())))
            if time.monotonic() - checked >= 1.0:  # a scan of the round's devices: once a second, not per message
                checked = time.monotonic()
                self._check_plan_acks(r)
                self._send_due_plans(r)
                self._leave_revoked(r)
        self._commit()
        exchange_s = time.perf_counter() - t_send
        return self._close(r, exchange_s)

    # ----------------------------------------------------------------------- secure aggregation

    def _open_secure(self, r: OpenRound) -> None:
        """The coordinator's half of the round's SecAgg+ (:mod:`fedlora_edge.core.secagg`)."""
        from fedlora_edge.core.secagg import vector_length

        e = self.engine
        r.secagg = ServerSecAgg(list(r.assignments), e.secagg_context, e.secagg_params,
                                vector_length(e.dims, e.R, e.method.sends_scores))
        r.sa_stage = "keys"

    def _secure_message(self, r: OpenRound, device: str, msg: dict) -> None:
        """A device's secure-aggregation message: its keys, its encrypted shares, or its unmasking
        answer.  One the protocol refuses is a logged rejection (ProtocolError)."""
        from fedlora_edge.core.secagg import SecAggError

        sa, stage = r.secagg, msg.get("stage")
        if sa is None:
            raise ProtocolError("a secure-aggregation message in a round without secure aggregation")
        try:
            if stage == "keys" and r.sa_stage == "keys":
                sa.keys(device, msg["keys"])
            elif stage == "shares" and r.sa_stage == "shares":
                sa.shares(device, msg["shares"])
            elif stage == "unmask" and r.sa_stage == "unmask":
                sa.unmasking(device, msg["response"])
            else:
                raise SecAggError(f"'{str(stage)[:20]}' came while the round is at '{r.sa_stage}'")
        except (SecAggError, KeyError, TypeError, AttributeError) as exc:
            raise ProtocolError(f"secure aggregation: {exc}") from None

    def _accept_masked(self, r: OpenRound, a: Assignment, data: bytes, report) -> Contribution:
        """A masked vector (stage 3): checked for its size and its report, summed, and offered to the
        fold as a contribution without factors (the coordinator never holds one device's update)."""
        from fedlora_edge.core.secagg import SecAggError

        check_report(a.client, report, a.round, int(a.meta["train"]["steps"]))
        sa = r.secagg
        assert sa is not None, "only a secure round takes masked vectors"
        if r.sa_stage != "masked":
            raise UpdateRejected(f"client {a.client}: a masked vector while the round is at '{r.sa_stage}'")
        if len(data) != 4 * sa.length:
            raise UpdateRejected(f"client {a.client}: a masked vector of {len(data)} bytes, the round's are "
                                 f"{4 * sa.length}")
        try:
            sa.masked(a.client, np.frombuffer(data, dtype="<u4").astype(np.uint32))
        except SecAggError as exc:
            raise UpdateRejected(f"client {a.client}: {exc}") from None
        return Contribution(a.client, a.plan, {}, self.engine.secagg_weights[a.client])

    def _secure_send(self, r: OpenRound, device: str, stage: str, body: dict) -> None:
        t = device_topic(self.run_id, device, "down")
        for chunk in self.outbox.chunks(t, json.dumps(body).encode(), kind="secagg", round_idx=r.index,
                                        device=device, transfer=f"secagg-{r.index}-{stage}-{device}",
                                        meta={"round": r.index, "stage": stage},
                                        chunk_bytes=self.cfg.transport.chunk_bytes):
            if not self._publish(t, chunk, wait=False):
                return

    def run_secure_round(self, r: OpenRound) -> None:
        """Drive the round's four stages (docs/protocol.md): each ends when every device that may
        still answer has (or at the round's deadline; the unmasking gets ``transport.secagg_unmask_s``
        more).  Fewer shares than the threshold fail the round, saying why."""
        from fedlora_edge.core.secagg import SecAggError

        e, tr = self.engine, self.cfg.transport
        sa = r.secagg
        checked = 0.0
        while r.sa_stage not in ("done", "failed"):
            deadline = r.sa_deadline if r.sa_stage == "unmask" else r.deadline
            late = time.monotonic() >= deadline
            live = set(r.live())
            try:
                assert sa is not None
                if r.sa_stage == "keys":
                    if late or not [d for d in live if d not in sa.public]:
                        for d, roster in sa.rosters().items():
                            self._secure_send(r, d, "roster", {"roster": roster, "params": sa.params.to_json()})
                        r.sa_stage = "shares"
                        crash_point("secagg-keys")
                        continue
                elif r.sa_stage == "shares":
                    if late or not [d for d in sa.graph if d in live and d not in sa.shared]:
                        if late and not sa.shared:
                            raise SecAggError("no device shared its keys by the round's deadline")
                        for d, inbox in sa.relay().items():
                            self._secure_send(r, d, "relay", {"inbox": inbox})
                        r.sa_stage = "masked"
                        crash_point("secagg-shares")
                        continue
                elif r.sa_stage == "masked":
                    self._commit()
                    if late or not [d for d in sa.shared if d in live and d not in sa.sent]:
                        survivors, dropped = sa.request()
                        for d in survivors:
                            self._secure_send(r, d, "unmask", {"survivors": survivors, "dropped": dropped})
                        r.sa_stage, r.sa_deadline = "unmask", time.monotonic() + tr.secagg_unmask_s
                        crash_point("secagg-masked")
                        continue
                elif r.sa_stage == "unmask":
                    if late or not [d for d in sa.sent if d in live and d not in sa.responses]:
                        words, survivors = sa.result()
                        dropped = sorted(set(sa.shared) - set(survivors))
                        e.fold.acc.load(words, survivors, {"dropped_before_masking": dropped,
                                                           "unmasked_by": len(sa.responses)})
                        for d in dropped:
                            r.failed.setdefault(d, "dropped out of secure aggregation before its masked vector")
                        r.sa_stage = "done"
                        continue
            except SecAggError as exc:
                self._fail_secure(r, str(exc))
                break
            self._pump(min(1.0, max(0.0, deadline - time.monotonic())))
            if time.monotonic() - checked >= 1.0:
                checked = time.monotonic()
                self._check_plan_acks(r)
                self._send_due_plans(r)
                self._leave_revoked(r)
        self._commit()

    def _fail_secure(self, r: OpenRound, why: str) -> None:
        """The round cannot be unmasked: every device's part fails with the reason, nothing is summed."""
        self.log(f"round {r.index}: secure aggregation failed: {why}")
        for d in r.assignments:
            r.failed.setdefault(d, f"secure aggregation failed: {why}")
        r.accepted.clear()
        self.engine.start_fold(list(r.assignments))  # an empty fold: the round records no valid update
        r.sa_stage = "failed"

    def _check_plan_acks(self, r: OpenRound) -> None:
        now = time.monotonic()
        late = [c for c, sent in r.plan_sent.items() if now - sent > self.cfg.transport.plan_ack_s
                and c not in r.plan_received and c not in r.plan_warned]
        waiting = set(r.waiting_for()) if late else set()
        for c in late:
            if c in waiting:
                r.plan_warned.add(c)
                self.log(f"warning: {c} has not acknowledged its plan for round {r.assignments[c].round} after "
                         f"{self.cfg.transport.plan_ack_s:.0f} s: dropped by the broker? check its message size limit "
                         f"(plan chunks are up to {self.cfg.transport.chunk_bytes + 4096} bytes)")

    def _close(self, r: OpenRound, exchange_s: float) -> dict:
        e, tr = self.engine, self.cfg.transport
        returned = []
        last_rejection = {x["client"]: x["reason"] for x in r.rejected}
        for c, a in r.assignments.items():
            if c in r.accepted:
                returned.append(r.accepted[c][1])
                continue
            why = r.failed.get(c) or (f"went offline during the round (its Last Will) and was not back within "
                                      f"{tr.offline_grace_s:.0f} s" if c in r.gone else
                                      f"no complete update by the round's deadline ({tr.round_timeout_s:.0f} s)")
            if c in last_rejection and c not in r.failed:
                why += f"; its last update was rejected: {last_rejection[c]}"
            returned.append(Returned(a, failure=why))
        for device, transfer in self.reassembler.drop_incomplete():
            self._reject(device, f"transfer {transfer[:12]} incomplete at the end of the round: discarded")
        record = e.close_round(r.index, returned, r.skipped, r.t0, rejected=r.rejected)
        record["protocol_rejections"] = self.refusals.of_round(r.index)
        record["exchange_seconds"] = round(exchange_s, 4)  # first plan sent -> last update in
        self.annotate(record, r, r.plan_sent)
        for x in record["rejected"]:
            self.log(f"round {r.index}: rejected {x['reason']}")
        self._save_state(r.index)
        self.completed, self.round = r.index, None
        return record

    def annotate(self, record: dict, r: OpenRound, sent: dict[str, float]) -> None:
        """What a round's record says of the wire: each update's MQTT bytes and the seconds from its
        plan going out (``sent``) to its acceptance; the run's wall time when the round closed
        (``elapsed_seconds``, from the first round this process ran)."""
        for row in record["clients"]:
            c = row["client"]
            row["uplink_wire_bytes"] = self.wire_up.get(c, 0)
            if c in sent and c in r.accepted_at:
                row["plan_to_update_seconds"] = round(r.accepted_at[c] - sent[c], 3)
        record["elapsed_seconds"] = round(time.monotonic() - self.t_start, 3)

    def _save_state(self, round_idx: int) -> None:
        e = self.engine
        try:
            e.save_state()
        except OSError as exc:
            raise StorageError(f"cannot write the run state in {e.store.folder}: {exc.strerror or exc}; round "
                               f"{round_idx}'s updates are in its journal: free the space and run again with "
                               "--resume") from None

    def connect(self) -> None:
        """Connect to the broker (once): a refused login or a TLS mistake fails here, with its cause."""
        if not self._connected:
            try:
                self.link.connect()
            except BrokerAuthError as exc:
                raise BrokerAuthError(f"{exc} (logged in as {self.broker.username}: the coordinator of run "
                                      f"'{self.run_id}' has a login of its own; a broker configured by `fedlora "
                                      f"broker-config` before this run was first used does not know it: run "
                                      f"`fedlora broker-config` again, then reload the broker)") from None
            self._connected = True

    def close(self) -> None:
        """Let go of the broker, the background builds and the run's lock (``run`` does it at its end)."""
        try:
            self.link.close()
        finally:
            if self.engine.builds is not None:
                self.engine.builds.close()
            self.run_lock.release()

    def run(self) -> dict:
        """The run: the round it was in (``--resume``), the rounds left, then the outputs, then
        ``done``.  The outputs are written before ``done`` is published: a coordinator stopped while
        writing them (a full disk: StorageError) is resumed with every round complete, and then
        writes them without waiting for any device."""
        self.connect()
        try:
            buffered = self.cfg.schedule.mode == "buffered"
            jr = self._journal_round = self.engine.journal.load(self.first_round) if self.resume else None
            state = "training" if self._journal_round else "waiting"
            self._publish_round(self.first_round if state == "training" else self.completed, state)
            self.announce = False
            if state == "training" and not buffered:  # the round the coordinator was in when it stopped: finish it
                self.run_round(self.first_round, reopen=True)
                self.first_round += 1
            if buffered:  # the version it was in, re-opened before its devices come back and re-send what they hold
                self.buffered = BufferedService(self)
                if jr is not None and jr.nonce == self.engine.nonce:
                    self.buffered.reopen(jr)
            if self.first_round <= self.cfg.rounds:
                self.wait_for_devices()
            elif self.resume:
                self.log(f"every round of run '{self.run_id}' is complete: writing its outputs")
            if not self.engine.store.numbers():
                self.engine.begin()
                self._save_initial()
            elif not hasattr(self.engine, "base_accuracy"):
                self.engine.base_accuracy = self.engine.evaluate_base()
            self.t_start = time.monotonic()
            if self.buffered is not None:  # (no plan is handed out before every device is back: the picks)
                self._journal_round = None
                if self.completed < self.cfg.rounds:
                    self.buffered.run()
            else:
                for r in range(self.first_round, self.cfg.rounds + 1):
                    if self.engine.stop_for_privacy():
                        break
                    self.run_round(r)
            report = self.engine.finish()
            t_round = topic(self.run_id, "round")
            self.done_said = True
            self._json(t_round, {"type": "round", "round": self.cfg.rounds, "state": "done"})
            self._publish(t_round, b"", retain=True)  # the run is over: clear its retained round
            self._await_farewells()
            return report
        finally:
            self.close()

    FAREWELL_S = 10.0

    def _await_farewells(self) -> None:
        """After ``done``: until every online device has cleared its retained hello (it has seen
        ``done`` and is leaving), at most FAREWELL_S, so that a broker stopped with the coordinator
        (the embedded one) does not cut devices off in the middle of their last messages."""
        end = time.monotonic() + self.FAREWELL_S
        while time.monotonic() < end and set(self.sessions) - self.farewells:
            self._pump(min(0.5, max(0.0, end - time.monotonic())))

    def _save_initial(self) -> None:
        try:
            self.engine.save_state()  # snapshot 0: the state before round 1, with the base accuracy and nonce
        except OSError as exc:
            raise StorageError(f"cannot write the run state in {self.engine.store.folder}: {exc.strerror or exc}") from None


def check_deployable(cfg: RunConfig) -> None:
    """What only ``simulate`` can run is refused before a deployment starts."""
    if cfg.contamination.attack != "none":
        raise ConfigError("contamination: made-up contamination is a `fedlora simulate` feature; over MQTT "
                          "the devices send what they send (set contamination.attack: none)")
    if get_method(cfg.method).pools_data:
        raise ConfigError(f"method {cfg.method}: trains on every client's data pooled on the server, the reference "
                          "point of `fedlora simulate`; over MQTT the data stays on the devices, so no device could "
                          f"take part (use `fedlora simulate --method {cfg.method}`)")


def set_aside_state(folder: Path, log) -> None:
    """A new run in a folder that holds an earlier run's state: keep that state as ``state.previous``
    (replacing an older one) rather than mixing the two."""
    from .runstate import SnapshotStore

    if not SnapshotStore(folder).numbers() and not any(folder.glob("round-*")):
        return
    prev = folder.with_name("state.previous")
    if prev.exists():
        import shutil

        shutil.rmtree(prev)
    folder.rename(prev)
    folder.mkdir()
    log(f"a new run: the earlier run's state is kept in {prev} (use --resume to continue a run)")


def check_writable(folder: Path) -> None:
    """Fail before anything starts when the run's state cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        write_bytes(probe, b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"the run's state folder {folder} is not writable: {exc.strerror or exc}") from None


def check_resume(out_dir: str | Path, resume: bool) -> None:
    from .runstate import SnapshotStore

    folder = Path(out_dir) / "state"
    if resume and not SnapshotStore(folder).numbers():
        hint = " (it holds a state of protocol 1, which this version cannot resume)" if (folder / "run.json").is_file() else ""
        raise ConfigError(f"--resume: no saved run state in {folder}{hint}")


def _some(names: list[str], most: int = 20) -> str:
    """Up to ``most`` names, then how many more (a log line per thousand devices stays readable)."""
    if not names:
        return "none"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
