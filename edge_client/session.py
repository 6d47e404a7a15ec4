"""A device's session with a run: the loop of the edge client, one named step per method.

``fedlora client`` (:func:`fedlora_edge.edge_client.client.run`) builds a :class:`DeviceSession`
from its arguments and calls :meth:`DeviceSession.loop`.  One round is: :meth:`~DeviceSession.connect`,
learn the run from its signed ``round`` message (:meth:`~DeviceSession.on_round`,
:meth:`~DeviceSession.join`), say :meth:`~DeviceSession.hello` with the device's profile, receive a
plan (:meth:`~DeviceSession.receive` reassembles its chunks; :meth:`~DeviceSession.plan`, or
:meth:`~DeviceSession.program` for an ExecuTorch training program), :meth:`~DeviceSession.train` it,
:meth:`~DeviceSession.upload` the update, drop it on its :meth:`~DeviceSession.ack`, repeat; the
run's "done" ends the loop (:meth:`~DeviceSession.done`).  The messages are specified in
docs/protocol.md.

Identity: everything the device sends is signed with its key; everything it acts on must carry
the coordinator's signature, this run's nonce and a counter above the last one seen
(:mod:`fedlora_edge.core.messages`).  Anything else is logged and ignored.

Reliability: an update is written to the state folder before it is sent and deleted only when
the coordinator acknowledges it (accepted, rejected with a reason, stale or duplicate), so a
reconnect, a restart or a restarted coordinator re-sends it, with the same update id (counted
once).  A plan for a round this device already trained is answered with the update it still
holds, never trained again.

The link to the broker is injected (:class:`DeviceLink`: connect, subscribe, publish, get, close,
``on_connect_hooks``, ``address``); :class:`fedlora_edge.core.mqtt.Link` is the real one, and
tests/test_session.py drives a session through a fake one, without a broker.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedlora_edge.core.data import Example, domain_counts
from fedlora_edge.core.framing import ProtocolError, Reassembler, Transfer
from fedlora_edge.core.identity import Counter, Credentials, ReplayGuard, Signer, Verifier
from fedlora_edge.core.messages import Outbox, read_message
from fedlora_edge.core.mqtt import device_topic, topic
from fedlora_edge.core.profile import DeviceProfile
from fedlora_edge.core.secagg import DeviceSecAgg

from . import __version__
from .device_state import DeviceState

MAX_PLAN_BYTES = 1 << 30  # a training program is about the size of the base model
# what training may raise and the device survives (out of memory, or a plan it cannot carry out)
TRAINING_ERRORS = (MemoryError, RuntimeError, OSError, ImportError, ValueError, KeyError, TypeError)

Will = Callable[[], tuple[str, bytes]]  # the Last Will: (topic, payload)


class _Address(Protocol):
    @property
    def url(self) -> str: ...


class DeviceLink(Protocol):
    """What a session needs of its broker link (:class:`fedlora_edge.core.mqtt.Link` has it)."""

    on_connect_hooks: list  # called on every (re)connection

    @property
    def address(self) -> _Address: ...

    def connect(self, timeout_s: float | None = ...) -> None: ...
    def subscribe(self, topic_filter: str) -> None: ...
    def publish(self, topic_name: str, payload: bytes, *, retain: bool = ..., timeout_s: float = ...): ...
    def get(self, timeout_s: float) -> tuple[str, bytes] | None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Training:
    """How this device trains: torch's device and threads, and what emulation holds it to."""

    device: str = "cpu"
    threads: int | None = None
    slowdown: float = 1.0
    downlink_mbps: float | None = None
    memory_gb: float | None = None


class DeviceSession:
    """One device in run ``run_id``: ``make_link(will)`` returns its broker link, given the Last
    Will callable the link must call before every connection attempt."""

    def __init__(self, creds: Credentials, examples: list[Example], profile: DeviceProfile, state: DeviceState,
                 make_link: Callable[[Will], DeviceLink], *, run_id: str = "default",
                 training: Training | None = None):
        self.me, self.run_id, self.examples, self.profile = creds.id, run_id, examples, profile
        self.state, self.training = state, training or Training()
        self.outbox = Outbox(Signer(creds.signing_key), Counter(state.folder / "counter", log=self.log), run_id,
                             state.nonce)
        self.verifier = Verifier(lambda sender: creds.coordinator_key if sender == "coordinator" else None)
        self.t_round = topic(run_id, "round")
        self.guard = ReplayGuard({self.t_round: state.round_ctr} if state.round_ctr is not None else {})
        self.t_status, self.t_hello, self.t_down, self.t_up, self.t_ack, self.t_event = (
            device_topic(run_id, self.me, x) for x in ("status", "hello", "down", "up", "ack", "event"))
        self.programs_dir = state.folder / "programs"  # executorch training programs received
        self.programs = None  # their store, made with the first one (it imports torch)
        self.reassembler = Reassembler(MAX_PLAN_BYTES, max_open=4)
        self.peft_model = self.tokenizer = None
        self.session_id = ""  # a new one per connection, from the Last Will
        self.hello_due = True  # set by every (re)connect: announce ourselves, re-send what is unacknowledged
        self.live = False  # saw this run waiting or training: its "done" ends this device, plan or not
        self.current_round = 0  # the round being worked on, for a failure report
        # secure aggregation, per round: this device's half of the protocol (in memory only: a device
        # that restarts mid-round has dropped out of it), its trained vector until the shares are in
        self.secagg: dict[int, DeviceSecAgg] = {}
        self.sa_vector: dict[int, tuple[bytes, dict, dict]] = {}
        self.sa_ready: set[int] = set()
        # transport.compression int4: what rounding lost, carried into the next update (this run's, in
        # memory: a device that restarts starts again from none)
        self.feedback: dict = {}
        self.link = make_link(self.last_will)  # last: the link arms its will at once

    def log(self, text: str) -> None:
        log(self.me, text)

    # ------------------------------------------------------------------------------ the loop

    def loop(self) -> int:
        """Connect, then handle what comes until the run is done (0) or training ran out of memory (4)."""
        self.connect()
        while True:
            status = self.step()
            if status is not None:
                return status

    def step(self, wait_s: float = 1.0) -> int | None:
        """One turn: say hello if due, then handle the next message; an exit status ends the loop."""
        if self.hello_due and self.state.nonce:
            self.hello_due = False
            self.hello()
        msg = self.link.get(wait_s)
        if msg is None or not msg[1]:
            return None  # nothing yet, or a retained message being cleared
        return self.receive(*msg)

    def connect(self) -> None:
        """Subscribe to the device's plans and acks and the run's round, and connect with a Last Will
        (signed, one session per connection) that tells the coordinator when this device drops off.
        Keeps trying until the broker answers; every (re)connect makes a hello due."""
        for t in (self.t_down, self.t_ack, self.t_round):
            self.link.subscribe(t)
        self.link.on_connect_hooks.append(self.reconnected)
        self.link.connect(timeout_s=None)
        self.log(f"connected to {self.link.address.url}, run '{self.run_id}', {len(self.examples)} examples")
        if self.training.memory_gb:
            watch_memory(self.training.memory_gb,
                         lambda why: self.event("failure", round=self.current_round, reason=why), self.me)

    def reconnected(self) -> None:
        self.hello_due = True

    def last_will(self) -> tuple[str, bytes]:
        """Called before every connection attempt: a new session id, and the status the broker
        publishes (retained) for this device if the connection drops."""
        self.session_id = secrets.token_hex(8)
        return self.t_status, self.outbox.json(self.t_status, {"type": "status", "device": self.me,
                                                               "session": self.session_id, "state": "offline"},
                                               nonce=False)

    # ------------------------------------------------------------------------------ sending

    def send(self, t: str, payload: bytes, retain: bool = False, timeout_s: float = 120.0) -> bool:
        try:
            self.link.publish(t, payload, retain=retain, timeout_s=timeout_s)
            return True
        except TimeoutError as exc:  # the broker is gone for now: what matters is re-sent after the reconnect
            self.log(f"not sent ({exc}); it goes again after the reconnect")
            return False

    def event(self, kind: str, **fields) -> None:
        self.send(self.t_event, self.outbox.json(self.t_event, {"type": kind, "device": self.me, **fields}))

    def hello(self) -> None:
        """Hello (retained) in the run this device is in, then every update it still holds for it."""
        self.send(self.t_hello, self.outbox.json(self.t_hello, {
            "type": "hello", "device": self.me, "session": self.session_id, "profile": self.profile.to_dict(),
            "examples": len(self.examples), "domains": domain_counts(self.examples),
            "client_version": __version__,
            "programs": sorted(p.stem for p in self.programs_dir.glob("*.pte"))}), retain=True)
        self.upload_held()

    def upload(self, meta: dict, data: bytes) -> None:
        """An update in signed chunks on the device's ``up`` topic (stops at the first one not sent)."""
        for chunk in self.outbox.chunks(self.t_up, data, kind="update", round_idx=meta["round"], device=self.me,
                                        transfer=meta["update_id"], meta=meta):
            if not self.send(self.t_up, chunk):
                return

    def upload_held(self, round_idx: int | None = None) -> None:
        """Send again the updates held for this run (only those of ``round_idx``, if given)."""
        for p in self.state.pending():
            if p.nonce == self.state.nonce and (round_idx is None or p.round == round_idx):
                self.upload(p.meta, p.data())

    # ------------------------------------------------------------------------------ receiving

    def receive(self, t: str, payload: bytes) -> int | None:
        """Verify a message and act on it: a round message, an ack, or a chunk of a plan or program.
        A message that does not verify is logged and ignored."""
        try:
            _, leaf, fields, data = read_message(self.verifier, self.guard, self.run_id, t, payload)
            if leaf == "round":
                return self.on_round(fields)
            if fields["nonce"] != self.state.nonce:
                raise ProtocolError(f"for another run (nonce {str(fields['nonce'])[:8]}), not this one")
            if leaf == "ack":
                self.ack(fields)
                return None
            if leaf != "down" or data is None:
                raise ProtocolError(f"a '{leaf}' message is not one a device acts on")
            transfer = self.reassembler.add(fields, data)
        except ProtocolError as exc:
            self.log(f"ignored a message on {t[:120]}: {exc}")
            return None
        if transfer is None:
            return None  # more chunks to come
        if transfer.kind == "program":
            self.program(transfer)
            return None
        if transfer.kind == "secagg":
            self.secure_stage(transfer)
            return None
        if transfer.kind != "plan" or transfer.meta.get("round") != transfer.round:
            self.log(f"ignored a transfer of kind '{transfer.kind}' for round {transfer.round} "
                     f"(meta round {transfer.meta.get('round')})")
            return None
        return self.plan(transfer)

    def on_round(self, fields: dict) -> int | None:
        """The run's round message: join a run not seen before, keep its counter, and leave when it
        is done (0), if this device took part in it."""
        done = fields.get("state") == "done"
        if fields["nonce"] != self.state.nonce:
            if done:
                return None  # the end of a run this device was never part of
            self.join(fields["nonce"])
        self.state.round_ctr = fields["ctr"]
        self.state.save()
        if not done:
            self.live = True
        elif self.live or self.state.trained:
            return self.done()
        return None

    def join(self, nonce: str) -> None:
        """Take part in run ``nonce`` (an earlier run's updates are dropped) and say hello in it."""
        dropped = self.state.join(nonce)
        self.outbox.nonce, self.live = self.state.nonce, False
        self.forget_secure_rounds()  # an earlier run's key exchanges are of another context
        self.feedback = {}
        self.log(f"run '{self.run_id}' is live (nonce {nonce[:8]})"
                 + (f"; dropped {dropped} update(s) of an earlier run" if dropped else ""))
        self.hello_due = True

    def done(self) -> int:
        """The run is over: drop what is unacknowledged (it cannot count any more), clear this device's
        retained hello and status, close the link; exit status 0."""
        left = self.state.drop_all()
        self.log("the run is done" + (f"; dropped {left} unacknowledged update(s)" if left else ""))
        for t_own in (self.t_hello, self.t_status):
            self.send(t_own, b"", retain=True, timeout_s=10.0)  # a broker gone with the run: leave anyway
        self.link.close()
        return 0

    def ack(self, fields: dict) -> None:
        """The coordinator's answer to an update: it is no longer held."""
        held = self.state.drop(fields.get("update_id", ""))  # False for an id this device never made
        self.log(f"round {fields.get('round')}: update {fields.get('status')}"
                 + (f" ({str(fields['reason'])[:300]})" if fields.get("reason") else "")
                 + ("" if held else " (not held here)"))

    def program(self, transfer: Transfer) -> None:
        """A training program for the executorch trainer: kept for the plans to come."""
        store = self.program_store()
        try:
            store.put(transfer.data, transfer.meta)
            self.log(f"received training program {transfer.meta.get('key')} "
                     f"({len(transfer.data) / 2**20:.1f} MiB)")
        except ValueError as exc:
            self.log(f"refused a training program: {exc}")

    def program_store(self):
        from .et_train import ProgramStore

        self.programs = self.programs or ProgramStore(self.programs_dir, threads=self.training.threads or 0)
        return self.programs

    # ------------------------------------------------------------------------------ training

    def plan(self, plan: Transfer) -> int | None:
        """A plan: train it and upload the update, made durable first; a plan for a round already
        trained is answered with the update still held.  4 when training ran out of memory."""
        round_idx = plan.round
        self.event("received", round=round_idx, transfer=plan.transfer)
        self.current_round = round_idx
        if round_idx in self.state.trained:  # a plan sent again (the coordinator restarted?)
            self.upload_held(round_idx)
            return None
        if self.training.downlink_mbps:
            time.sleep(len(plan.data) * 8 / (self.training.downlink_mbps * 1e6))
        secure = plan.meta.get("secagg")
        if secure and round_idx not in self.secagg:  # stage 1 before training: the keys go out at once
            self.forget_secure_rounds(before=round_idx)  # a round's exchange ends when the next one starts
            agent = self.secagg[round_idx] = DeviceSecAgg(self.me, str(secure.get("context", "")).encode())
            self.event("secagg", round=round_idx, stage="keys", keys=agent.keys())
        try:
            update, report = self.train(plan.meta, plan.data)
        except TRAINING_ERRORS as exc:
            return self.failed(round_idx, exc)
        if secure:  # sent masked, once the neighbours' shares are in (secure_stage)
            self.sa_vector[round_idx] = (update, report, plan.meta)
            self.send_masked(round_idx)
            return None
        self.send_update(round_idx, update, report, plan.meta)
        return None

    def send_update(self, round_idx: int, update: bytes, report: dict, meta: dict) -> None:
        """Make an update durable, then send it."""
        up_meta = {"round": round_idx, "update_id": uuid.uuid4().hex, "report": report}
        self.state.add(up_meta, update)  # durable before it is sent
        self.upload(up_meta, update)
        self.log(f"round {round_idx}: trained rank {meta['plan'].get('rank')} in {report['seconds']:.1f} s, "
                 f"loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}, sent {len(update)} bytes")

    # ------------------------------------------------------------------------- secure aggregation

    def secure_stage(self, transfer: Transfer) -> None:
        """A secure-aggregation message from the coordinator (docs/protocol.md): the neighbours' keys
        (answered with this device's encrypted shares), the shares sent to it (then its masked
        vector goes out, once trained), or the unmasking request (answered with the shares it may
        reveal).  A step the protocol's rules refuse is logged and not answered."""
        from fedlora_edge.core.secagg import SecAggError

        round_idx, stage = transfer.round, transfer.meta.get("stage")
        agent = self.secagg.get(round_idx)
        if agent is None:
            self.log(f"ignored a secure-aggregation '{str(stage)[:20]}' for round {round_idx}: no key exchange of "
                     "this device's in that round (it restarted since?)")
            return
        try:
            body = json.loads(transfer.data)
            if stage == "roster":
                shares = agent.share(body["roster"], body["params"])
                self.event("secagg", round=round_idx, stage="shares", shares=shares)
            elif stage == "relay":
                agent.receive(body["inbox"])
                self.sa_ready.add(round_idx)
                self.send_masked(round_idx)
            elif stage == "unmask":
                self.event("secagg", round=round_idx, stage="unmask",
                           response=agent.unmask(body["survivors"], body["dropped"]))
            else:
                raise SecAggError(f"unknown stage {str(stage)[:20]!r}")
        except (SecAggError, ValueError, KeyError, TypeError) as exc:
            self.log(f"round {round_idx}: secure aggregation: refused the coordinator's '{str(stage)[:20]}': {exc}")

    def forget_secure_rounds(self, before: int | None = None) -> None:
        """Drop the secure-aggregation state of every round (of the rounds before ``before``)."""
        for held in (self.secagg, self.sa_vector):
            for r in [r for r in held if before is None or r < before]:
                del held[r]
        self.sa_ready = {r for r in self.sa_ready if before is not None and r >= before}

    def send_masked(self, round_idx: int) -> None:
        """The trained vector, masked, as this round's update: when it is trained and the shares
        are in (whichever comes last)."""
        import numpy as np

        if round_idx not in self.sa_ready or round_idx not in self.sa_vector:
            return
        words, report, meta = self.sa_vector.pop(round_idx)
        masked = self.secagg[round_idx].mask(np.frombuffer(words, dtype="<u4").astype(np.uint32))
        self.send_update(round_idx, masked.astype("<u4").tobytes(), report, meta)

    def train(self, meta: dict, start: bytes) -> tuple[bytes, dict]:
        """(update bytes, report) of the plan ``meta`` from the factors ``start``.  Torch is imported
        here, under the memory cap: a device too small fails here, and says so."""
        from .work import trainer_of

        if trainer_of(meta) == "executorch":  # the program holds the model: only the tokenizer is loaded
            from fedlora_edge.core.models import load_tokenizer

            self.tokenizer = self.tokenizer or load_tokenizer(meta["model"])
            self.program_store()
        elif self.peft_model is None or not same_base(self.peft_model, meta):  # loaded once, again if the form changes
            self.peft_model = None
            self.peft_model, self.tokenizer = load_for_training(meta, self.training.threads, self.training.device)
        return run_assignment(self.peft_model, self.tokenizer, self.examples, meta, start, self.training.device,
                              slowdown=self.training.slowdown, programs=self.programs, feedback=self.feedback)

    def failed(self, round_idx: int, exc: BaseException) -> int | None:
        """Training failed: say why (log, and a failure event); out of memory ends the device (4)."""
        oom = isinstance(exc, (MemoryError, OSError, ImportError)) or "alloc" in str(exc).lower()
        why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        reason = (f"out of memory while training round {round_idx}: {why}" if oom
                  else f"training failed in round {round_idx}: {why}")
        self.log(reason)
        self.event("failure", round=round_idx, reason=reason)
        return 4 if oom else None


def run_assignment(peft_model, tokenizer, examples, meta: dict, start: bytes, device: str, *, slowdown: float,
                   programs, feedback: dict | None = None) -> tuple[bytes, dict]:
    """:func:`fedlora_edge.edge_client.work.run_assignment`, imported when called (it imports torch)."""
    from .work import run_assignment as run

    return run(peft_model, tokenizer, examples, meta, start, device, slowdown=slowdown, programs=programs,
               feedback=feedback)


def load_for_training(meta: dict, threads: int | None, device: str = "cpu"):
    """The base model named by the plan, on ``device``, in the dtype and quantization its ``train``
    asks for (``train.dtype``, ``train.base_quant``), wrapped for assignments (loaded once, kept)."""
    import torch

    from fedlora_edge.core.models import load_model

    if threads:
        torch.set_num_threads(threads)
    from .work import wrap

    train = meta.get("train") or {}
    model, tok = load_model(meta["model"], device, train.get("dtype", "fp32"), train.get("base_quant", "none"))
    return wrap(model, meta), tok


def same_base(peft_model, meta: dict) -> bool:
    """Whether the loaded base has the dtype and quantization ``meta``'s ``train`` asks for."""
    from fedlora_edge.core.precision import base_form

    train = meta.get("train") or {}
    return base_form(peft_model.get_base_model()) == (train.get("dtype", "fp32"), train.get("base_quant", "none"))


def watch_memory(cap_gb: float, report, device: str) -> None:
    """Hold this process to ``cap_gb`` of resident memory, as a device's physical memory would:
    past it, report out of memory and exit with code 4 (an emulated device never hangs)."""
    import threading

    import psutil

    proc, cap = psutil.Process(), cap_gb * 2**30

    def watch():
        while True:
            rss = proc.memory_info().rss
            if rss > cap:
                why = f"out of memory: resident {rss / 2**30:.2f} GB exceeds the device's {cap_gb:.2f} GB"
                log(device, why)
                try:
                    report(why)
                finally:
                    os._exit(4)
            time.sleep(0.02)

    threading.Thread(target=watch, name="memory-cap", daemon=True).start()


def log(device: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {device}: {text}", flush=True)
