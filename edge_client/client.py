"""The edge client: what a device runs.  ``fedlora client --broker URL --device-id ID --data FILE``

Read it top to bottom; one round is: connect, say hello with the device's profile, wait for a
plan, train it, upload the update, wait for the acknowledgement, repeat.  The messages are
specified in docs/protocol.md.

Reliability: an update that was produced is written to ``--state-dir`` before it is sent and
deleted only when the coordinator acknowledges it, so a reconnect or a restart re-sends it (with
the same update id: the coordinator counts it once).  A plan for a round this device already
trained is not trained again.  Reconnects back off up to 30 s; refused credentials stop the
client at once with an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

from . import __version__
from .data import domain_counts, load_jsonl
from .framing import ProtocolError, Reassembler, chunk_transfer, decode_json, encode_json
from .mqtt import BrokerAuthError, Link, device_topic, parse_broker, topic
from .profile import load_profile, measure_profile

MAX_PLAN_BYTES = 1 << 30


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fedlora client", description="Run a fedlora-edge device: train the plans "
                                 "the coordinator sends on local data, upload the updates.")
    ap.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:port or mqtts://... (TLS)")
    ap.add_argument("--device-id", required=True, help="this device's id (no '/', '+', '#')")
    ap.add_argument("--data", required=True, help="JSONL of {prompt, response[, domain]}: the local data")
    ap.add_argument("--profile", help="device profile YAML (default: measure this machine at start)")
    ap.add_argument("--run", default="default", help="run id shared with the coordinator (default: default)")
    ap.add_argument("--state-dir", help="where unacknowledged updates are kept (default: ~/.fedlora/<run>/<id>)")
    ap.add_argument("--username")
    ap.add_argument("--password")
    ap.add_argument("--ca-file", help="CA certificate for mqtts://")
    ap.add_argument("--device", default="cpu", help="torch device to train on (default: cpu)")
    emu = ap.add_argument_group("emulation (what `fedlora emulate` sets to hold a process to a profile)")
    emu.add_argument("--threads", type=int, help="torch threads")
    emu.add_argument("--memory-gb", type=float, help="memory cap: past this resident size the client reports "
                     "out of memory and exits (checked every 20 ms)")
    emu.add_argument("--slowdown", type=float, default=1.0, help="stretch each training step by this factor")
    emu.add_argument("--uplink-mbps", type=float, help="cap the upload rate")
    emu.add_argument("--downlink-mbps", type=float, help="cap the download rate")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BrokerAuthError as exc:
        print(f"fedlora client {args.device_id}: {exc}", file=sys.stderr)
        return 3
    except (TimeoutError, ValueError) as exc:
        print(f"fedlora client {args.device_id}: error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    me, run_id = args.device_id, args.run

    # 1. What this device brings: its data and its profile.
    examples = load_jsonl(args.data)
    profile = load_profile(args.profile) if args.profile else measure_profile(me)
    state_dir = Path(args.state_dir or Path.home() / ".fedlora" / run_id / me)
    pending_dir = state_dir / "pending"
    pending_dir.mkdir(parents=True, exist_ok=True)
    trained_file = state_dir / "trained_rounds.json"
    trained: set[int] = set(json.loads(trained_file.read_text())) if trained_file.is_file() else set()
    programs_dir = state_dir / "programs"  # executorch training programs received (trainer: executorch)
    programs = None  # their store, made with the first one (it imports torch)

    # 2. Connect, with a Last Will that tells the coordinator when this device drops off.
    t_status, t_down = device_topic(run_id, me, "status"), device_topic(run_id, me, "down")
    t_up, t_ack, t_event = (device_topic(run_id, me, x) for x in ("up", "ack", "event"))
    link = Link(parse_broker(args.broker, args.username, args.password, args.ca_file), f"fedlora-{run_id}-{me}",
                will=(t_status, encode_json({"type": "status", "device": me, "state": "offline"})),
                uplink_mbps=args.uplink_mbps)
    for t in (t_down, t_ack, topic(run_id, "round")):
        link.subscribe(t)
    reconnected = [True]  # set by every (re)connect: announce ourselves and re-send what is unacknowledged
    link.on_connect_hooks.append(lambda: reconnected.__setitem__(0, True))
    link.connect()
    log(me, f"connected to {link.address.url}, run '{run_id}', {len(examples)} examples")
    current_round = [0]  # the round being worked on, for a failure report
    if args.memory_gb:
        watch_memory(args.memory_gb, lambda why: link.publish(t_event, encode_json(
            {"type": "failure", "device": me, "round": current_round[0], "reason": why})), me)

    def announce() -> None:
        link.publish(t_status, encode_json({"type": "status", "device": me, "state": "online"}), retain=True)
        link.publish(device_topic(run_id, me, "hello"), encode_json({
            "type": "hello", "device": me, "profile": profile.to_dict(), "examples": len(examples),
            "domains": domain_counts(examples), "client_version": __version__,
            "programs": sorted(p.stem for p in programs_dir.glob("*.pte"))}), retain=True)
        for meta_file in sorted(pending_dir.glob("*.json")):
            send_update(json.loads(meta_file.read_text()), meta_file.with_suffix(".safetensors").read_bytes())

    def send_update(meta: dict, data: bytes) -> None:
        for chunk in chunk_transfer(data, kind="update", run=run_id, round_idx=meta["round"], device=me,
                                    transfer=meta["update_id"], meta=meta):
            link.publish(t_up, chunk)

    # 3. Wait for plans; train each; upload; drop the update from disk once acknowledged.
    reassembler = Reassembler(MAX_PLAN_BYTES)
    peft_model = tokenizer = None
    live = False  # seen this run waiting or training: a "done" after that ends it, plan or not
    while True:
        if reconnected[0]:
            reconnected[0] = False
            announce()
        msg = link.get(1.0)
        if msg is None:
            continue
        t, payload = msg
        try:
            if t == topic(run_id, "round"):
                state = decode_json(payload).get("state")
                if state != "done":
                    live = True
                elif not trained and not live:
                    log(me, "a run with this id is marked done (a previous one?): waiting for plans")
                else:
                    left = list(pending_dir.glob("*.safetensors"))
                    for f in pending_dir.iterdir():
                        f.unlink()  # the run is over: nothing unacknowledged can count any more
                    log(me, "the run is done" + (f"; dropped {len(left)} unacknowledged update(s)" if left else ""))
                    link.close()
                    return 0
                continue
            if t == t_ack:
                ack = decode_json(payload)
                for f in pending_dir.glob(f"{ack.get('update_id')}.*"):
                    f.unlink()
                log(me, f"round {ack.get('round')}: update {ack.get('status')}"
                        + (f" ({ack['reason']})" if ack.get("reason") else ""))
                continue
            plan = reassembler.add(payload, device_from_topic=me)
        except ProtocolError as exc:
            log(me, f"ignored a bad message on {t}: {exc}")
            continue
        if plan is None:
            continue  # more chunks to come
        if plan.kind == "program":  # a training program for the executorch trainer: kept for the plans to come
            from .et_train import ProgramStore

            programs = programs or ProgramStore(programs_dir)
            try:
                programs.put(plan.data, plan.meta)
                log(me, f"received training program {plan.meta.get('key')} ({len(plan.data) / 2**20:.1f} MiB)")
            except ValueError as exc:
                log(me, f"refused a training program: {exc}")
            continue
        meta, round_idx = plan.meta, int(plan.meta["round"])
        current_round[0] = round_idx
        if round_idx in trained:
            continue  # a re-delivered plan: its update is on disk or acknowledged
        if args.downlink_mbps:
            time.sleep(len(plan.data) * 8 / (args.downlink_mbps * 1e6))

        try:  # torch is imported here, under the memory cap: a device too small fails here, and says so
            from .et_train import ProgramStore
            from .models import load_tokenizer
            from .work import run_assignment, trainer_of

            if trainer_of(meta) == "executorch":  # the program holds the model: only the tokenizer is loaded
                tokenizer = tokenizer or load_tokenizer(meta["model"])
                programs = programs or ProgramStore(programs_dir)
            elif peft_model is None:
                peft_model, tokenizer = load_for_training(meta, args.threads, args.device)
            update, report = run_assignment(peft_model, tokenizer, examples, meta, plan.data, args.device,
                                            slowdown=args.slowdown, programs=programs)
        except (MemoryError, RuntimeError, OSError, ImportError, ValueError, KeyError) as exc:
            oom = isinstance(exc, (MemoryError, OSError, ImportError)) or "alloc" in str(exc).lower()
            reason = f"out of memory while training round {round_idx}: {str(exc).splitlines()[0][:200]}" if oom \
                else f"training failed in round {round_idx}: {str(exc).splitlines()[0][:200]}"
            log(me, reason)
            link.publish(t_event, encode_json({"type": "failure", "device": me, "round": round_idx, "reason": reason}))
            if oom:
                return 4
            continue

        up_meta = {"round": round_idx, "update_id": uuid.uuid4().hex, "report": report}
        (pending_dir / f"{up_meta['update_id']}.safetensors").write_bytes(update)
        (pending_dir / f"{up_meta['update_id']}.json").write_text(json.dumps(up_meta))
        trained.add(round_idx)
        trained_file.write_text(json.dumps(sorted(trained)))
        send_update(up_meta, update)
        log(me, f"round {round_idx}: trained rank {meta['plan'].get('rank')} in {report['seconds']:.1f} s, "
                f"loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}, sent {len(update)} bytes")


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
    """The base model named by the plan, on ``device``, wrapped for assignments (loaded once, kept)."""
    import torch

    from .models import load_model

    if threads:
        torch.set_num_threads(threads)
    from .work import wrap

    model, tok = load_model(meta["model"], device)
    return wrap(model, meta), tok


def log(device: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {device}: {text}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
