"""The edge client: what a device runs.  ``fedlora client --broker URL --credentials FILE --data FILE``

Read it top to bottom; one round is: connect, learn the run from its signed ``round`` message,
say hello with the device's profile, wait for a plan, train it, upload the update, wait for the
acknowledgement, repeat.  The messages are specified in docs/protocol.md.

Identity: the credentials file (``fedlora devices add``) holds this device's signing key, its
broker login and the coordinator's public key.  Everything the device sends is signed;
everything it acts on must carry the coordinator's signature, this run's nonce and a counter
above the last one seen (:mod:`fedlora_edge.core.messages`).  Anything else is logged and ignored.

Reliability: an update is written to ``--state-dir`` before it is sent and deleted only when the
coordinator acknowledges it (accepted, rejected with a reason, stale or duplicate), so a
reconnect, a restart or a restarted coordinator re-sends it, with the same update id (counted
once).  A plan for a round this device already trained is answered with the update it still
holds, never trained again.  The device keeps trying to reach the broker; refused credentials
or a TLS mistake stop it at once with the cause.  Exit status: 0 the run is done; 2 bad input
(data, profile, credentials); 3 the broker refused the login or TLS cannot work; 4 out of memory.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
import uuid
from pathlib import Path

from fedlora_edge.core.data import DataFormatError, domain_counts, load_jsonl
from fedlora_edge.core.framing import ProtocolError, Reassembler
from fedlora_edge.core.identity import Counter, ReplayGuard, Signer, Verifier, load_credentials
from fedlora_edge.core.messages import Outbox, read_message
from fedlora_edge.core.mqtt import (
    BrokerAddress,
    BrokerAuthError,
    BrokerTLSError,
    Link,
    device_topic,
    parse_broker,
    topic,
)
from fedlora_edge.core.profile import ProfileError, load_profile, measure_profile
from fedlora_edge.core.quiet import quiet_third_party

from . import __version__
from .device_state import DeviceState

MAX_PLAN_BYTES = 1 << 30  # a training program is about the size of the base model


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora client", description="Run a fedlora-edge device: train the plans "
                                 "the coordinator sends on local data, upload the updates.",
                                 epilog="Secrets never go on the command line: the broker password and the "
                                 "signing key come from the credentials file (FEDLORA_MQTT_PASSWORD overrides the "
                                 "password). Exit status: 0 done, 2 bad input, 3 login or TLS refused, 4 out of memory.")
    ap.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port (TLS)")
    ap.add_argument("--credentials", default=os.environ.get("FEDLORA_CREDENTIALS"),
                    help="this device's credentials file from `fedlora devices add` (default: $FEDLORA_CREDENTIALS)")
    ap.add_argument("--device-id", help="this device's id (default: the one in the credentials file; must match it)")
    ap.add_argument("--data", required=True, help="the local data, JSONL: one example per line, "
                    "{prompt, response}, Alpaca {instruction, input, output} or chat {messages}, each with an "
                    "optional domain")
    ap.add_argument("--profile", help="device profile YAML (default: measure this machine at start)")
    ap.add_argument("--run", default="default", help="run id shared with the coordinator (default: default)")
    ap.add_argument("--state-dir", help="where unacknowledged updates and the run state are kept "
                    "(default: ~/.fedlora/<run>/<id>)")
    ap.add_argument("--ca-file", help="CA certificate for mqtts:// (default: the CA in the credentials file)")
    ap.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")
    emu = ap.add_argument_group("emulation (what `fedlora emulate` sets to hold a process to a profile)")
    emu.add_argument("--threads", type=int, help="CPU threads for training (torch's, or the ExecuTorch runtime's)")
    emu.add_argument("--memory-gb", type=float, help="memory cap: past this resident size the client reports "
                     "out of memory and exits (checked every 20 ms)")
    emu.add_argument("--slowdown", type=float, default=1.0, help="stretch each training step by this factor")
    emu.add_argument("--uplink-mbps", type=float, help="cap the upload rate")
    emu.add_argument("--downlink-mbps", type=float, help="cap the download rate")
    ap.add_argument("--verbose", action="store_true", help="keep third-party warnings (torch, torchao, transformers)")
    ap.add_argument("--version", action="version", version=f"fedlora-edge {__version__}")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party(args.verbose)
    try:
        return run(args)
    except (BrokerAuthError, BrokerTLSError) as exc:
        print(f"fedlora client {args.device_id or ''}: {exc}", file=sys.stderr)
        return 3
    except (ValueError, DataFormatError, ProfileError) as exc:
        print(f"fedlora client {args.device_id or ''}: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    # 1. Who this device is, what it brings (its data and profile), and what it kept from before.
    if not args.credentials:
        raise ValueError("no credentials: pass --credentials FILE (from `fedlora devices add`) or set "
                         "FEDLORA_CREDENTIALS")
    creds = load_credentials(args.credentials, role="device")
    me, run_id = creds.id, args.run
    if args.device_id and args.device_id != me:
        raise ValueError(f"--device-id {args.device_id} but the credentials file is for device '{me}'")
    args.device_id = me
    examples = load_jsonl(args.data)
    profile = load_profile(args.profile) if args.profile else measure_profile(me, warn=lambda m: log(me, m))
    state = DeviceState(args.state_dir or Path.home() / ".fedlora" / run_id / me, log=lambda m: log(me, m))
    counter = Counter(state.folder / "counter", log=lambda m: log(me, m))
    outbox = Outbox(Signer(creds.signing_key), counter, run_id, state.nonce)
    verifier = Verifier(lambda sender: creds.coordinator_key if sender == "coordinator" else None)
    t_round = topic(run_id, "round")
    guard = ReplayGuard({t_round: state.round_ctr} if state.round_ctr is not None else {})
    programs_dir = state.folder / "programs"  # executorch training programs received (trainer: executorch)
    programs = None  # their store, made with the first one (it imports torch)

    # 2. Connect, with a Last Will (signed, one session per connection) that tells the
    #    coordinator when this device drops off.  Keep trying until the broker answers.
    t_status, t_hello, t_down = (device_topic(run_id, me, x) for x in ("status", "hello", "down"))
    t_up, t_ack, t_event = (device_topic(run_id, me, x) for x in ("up", "ack", "event"))
    session = [""]

    def last_will() -> tuple[str, bytes]:
        session[0] = secrets.token_hex(8)
        return t_status, outbox.json(t_status, {"type": "status", "device": me, "session": session[0],
                                                "state": "offline"}, nonce=False)

    link = Link(broker_address(args, creds), me, will=last_will, uplink_mbps=args.uplink_mbps,
                log=lambda m: log(me, m))
    for t in (t_down, t_ack, t_round):
        link.subscribe(t)
    reconnected = [True]  # set by every (re)connect: announce ourselves and re-send what is unacknowledged
    link.on_connect_hooks.append(lambda: reconnected.__setitem__(0, True))
    link.connect(timeout_s=None)
    log(me, f"connected to {link.address.url}, run '{run_id}', {len(examples)} examples")
    current_round = [0]  # the round being worked on, for a failure report

    def send(t: str, payload: bytes, retain: bool = False, timeout_s: float = 120.0) -> bool:
        try:
            link.publish(t, payload, retain=retain, timeout_s=timeout_s)
            return True
        except TimeoutError as exc:  # the broker is gone for now: what matters is re-sent after the reconnect
            log(me, f"not sent ({exc}); it goes again after the reconnect")
            return False

    def event(kind: str, **fields) -> None:
        send(t_event, outbox.json(t_event, {"type": kind, "device": me, **fields}))

    if args.memory_gb:
        watch_memory(args.memory_gb, lambda why: event("failure", round=current_round[0], reason=why), me)

    def announce() -> None:
        """Hello (retained) in the run this device is in, then every update it still holds for it."""
        send(t_hello, outbox.json(t_hello, {
            "type": "hello", "device": me, "session": session[0], "profile": profile.to_dict(),
            "examples": len(examples), "domains": domain_counts(examples), "client_version": __version__,
            "programs": sorted(p.stem for p in programs_dir.glob("*.pte"))}), retain=True)
        for p in state.pending():
            if p.nonce == state.nonce:
                send_update(p.meta, p.data())

    def send_update(meta: dict, data: bytes) -> None:
        for chunk in outbox.chunks(t_up, data, kind="update", round_idx=meta["round"], device=me,
                                   transfer=meta["update_id"], meta=meta):
            if not send(t_up, chunk):
                return

    # 3. Wait for plans; train each; upload; drop the update from disk once acknowledged.
    reassembler = Reassembler(MAX_PLAN_BYTES, max_open=4)
    peft_model = tokenizer = None
    live = False  # saw this run waiting or training: its "done" ends this device, plan or not
    while True:
        if reconnected[0] and state.nonce:
            reconnected[0] = False
            announce()
        msg = link.get(1.0)
        if msg is None:
            continue
        t, payload = msg
        if not payload:
            continue  # a retained message being cleared
        try:
            _, leaf, fields, data = read_message(verifier, guard, run_id, t, payload)
            if leaf == "round":
                if fields["nonce"] != state.nonce:
                    if fields.get("state") == "done":
                        continue  # the end of a run this device was never part of
                    dropped = state.join(fields["nonce"])
                    outbox.nonce, live = state.nonce, False
                    log(me, f"run '{run_id}' is live (nonce {state.nonce[:8]})"
                        + (f"; dropped {dropped} update(s) of an earlier run" if dropped else ""))
                    reconnected[0] = True  # say hello in this run
                state.round_ctr = fields["ctr"]
                state.save()
                if fields.get("state") != "done":
                    live = True
                elif live or state.trained:
                    left = state.drop_all()  # the run is over: nothing unacknowledged can count any more
                    log(me, "the run is done" + (f"; dropped {left} unacknowledged update(s)" if left else ""))
                    for t_own in (t_hello, t_status):  # clear this device's retained messages
                        send(t_own, b"", retain=True, timeout_s=10.0)  # a broker gone with the run: leave anyway
                    link.close()
                    return 0
                continue
            if fields["nonce"] != state.nonce:
                raise ProtocolError(f"for another run (nonce {str(fields['nonce'])[:8]}), not this one")
            if leaf == "ack":
                held = state.drop(fields.get("update_id"))
                log(me, f"round {fields.get('round')}: update {fields.get('status')}"
                        + (f" ({str(fields['reason'])[:300]})" if fields.get("reason") else "")
                        + ("" if held else " (not held here)"))
                continue
            plan = reassembler.add(fields, data)
        except ProtocolError as exc:
            log(me, f"ignored a message on {t[:120]}: {exc}")
            continue
        if plan is None:
            continue  # more chunks to come
        if plan.kind == "program":  # a training program for the executorch trainer: kept for the plans to come
            from .et_train import ProgramStore

            programs = programs or ProgramStore(programs_dir, threads=args.threads or 0)
            try:
                programs.put(plan.data, plan.meta)
                log(me, f"received training program {plan.meta.get('key')} ({len(plan.data) / 2**20:.1f} MiB)")
            except ValueError as exc:
                log(me, f"refused a training program: {exc}")
            continue
        meta, round_idx = plan.meta, plan.round
        if plan.kind != "plan" or meta.get("round") != round_idx:
            log(me, f"ignored a transfer of kind '{plan.kind}' for round {round_idx} (meta round {meta.get('round')})")
            continue
        event("received", round=round_idx, transfer=plan.transfer)
        current_round[0] = round_idx
        if round_idx in state.trained:  # a plan sent again (the coordinator restarted?): answer with what we hold
            for p in state.pending():
                if p.round == round_idx and p.nonce == state.nonce:
                    send_update(p.meta, p.data())
            continue
        if args.downlink_mbps:
            time.sleep(len(plan.data) * 8 / (args.downlink_mbps * 1e6))

        try:  # torch is imported here, under the memory cap: a device too small fails here, and says so
            from fedlora_edge.core.models import load_tokenizer

            from .et_train import ProgramStore
            from .work import run_assignment, trainer_of

            if trainer_of(meta) == "executorch":  # the program holds the model: only the tokenizer is loaded
                tokenizer = tokenizer or load_tokenizer(meta["model"])
                programs = programs or ProgramStore(programs_dir, threads=args.threads or 0)
            elif peft_model is None or not same_base(peft_model, meta):  # loaded once, again if the form changes
                peft_model = None
                peft_model, tokenizer = load_for_training(meta, args.threads, args.device)
            update, report = run_assignment(peft_model, tokenizer, examples, meta, plan.data, args.device,
                                            slowdown=args.slowdown, programs=programs)
        except (MemoryError, RuntimeError, OSError, ImportError, ValueError, KeyError, TypeError) as exc:
            oom = isinstance(exc, (MemoryError, OSError, ImportError)) or "alloc" in str(exc).lower()
            reason = f"out of memory while training round {round_idx}: {str(exc).splitlines()[0][:200]}" if oom \
                else f"training failed in round {round_idx}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
            log(me, reason)
            event("failure", round=round_idx, reason=reason)
            if oom:
                return 4
            continue

        up_meta = {"round": round_idx, "update_id": uuid.uuid4().hex, "report": report}
        state.add(up_meta, update)  # durable before it is sent
        send_update(up_meta, update)
        log(me, f"round {round_idx}: trained rank {meta['plan'].get('rank')} in {report['seconds']:.1f} s, "
                f"loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}, sent {len(update)} bytes")


def broker_address(args, creds) -> BrokerAddress:
    """The broker, logged in as this device: the password from FEDLORA_MQTT_PASSWORD or the
    credentials file, the CA from --ca-file or the credentials file, a client certificate if it has one."""
    import dataclasses

    address = parse_broker(args.broker, creds.mqtt_username or creds.id,
                           os.environ.get("FEDLORA_MQTT_PASSWORD") or creds.mqtt_password, args.ca_file)
    return dataclasses.replace(address, ca_pem=None if args.ca_file else creds.ca_pem, cert_pem=creds.cert_pem,
                               key_pem=creds.key_pem)


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


def log(device: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {device}: {text}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
