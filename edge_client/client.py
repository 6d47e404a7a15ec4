"""The edge client: what a device runs.  ``fedlora client --broker URL --credentials FILE --data FILE``

This file is the command: its arguments, and :func:`run`, which builds the device's session from
them (:func:`build_session`: credentials, data, profile, state folder, broker link) and runs its
loop.  The loop itself is :class:`~fedlora_edge.edge_client.session.DeviceSession` in session.py,
one named step per method: connect, hello, receive a plan (or a training program), train,
upload, ack, and the run's round and "done".  The messages are specified in docs/protocol.md.

Identity: the credentials file (``fedlora devices add``) holds this device's signing key, its
broker login and the coordinator's public key.  Everything the device sends is signed;
everything it acts on must carry the coordinator's signature, this run's nonce and a counter
above the last one seen (:mod:`fedlora_edge.core.messages`).  Anything else is logged and ignored.

Reliability: an update is written to ``--state-dir`` before it is sent and deleted only when the
coordinator acknowledges it, so a reconnect, a restart or a restarted coordinator re-sends it
(session.py says how).  The device keeps trying to reach the broker; refused credentials
or a TLS mistake stop it at once with the cause.  Exit status: 0 the run is done; 2 bad input
(data, profile, credentials); 3 the broker refused the login or TLS cannot work; 4 out of memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedlora_edge.core.data import DataFormatError, load_jsonl
from fedlora_edge.core.identity import load_credentials
from fedlora_edge.core.mqtt import BrokerAddress, BrokerAuthError, BrokerTLSError, Link, parse_broker
from fedlora_edge.core.profile import ProfileError, load_profile, measure_profile
from fedlora_edge.core.quiet import quiet_third_party

from . import __version__
from .device_state import DeviceState
from .session import DeviceSession, Training, Will, log


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
    """The device, from its command line: until the run is done (0) or out of memory (4)."""
    return build_session(args).loop()


def build_session(args) -> DeviceSession:
    """Who this device is, what it brings (its data and profile), what it kept from before, and
    its link to the broker (made by the session, with the session's Last Will)."""
    if not args.credentials:
        raise ValueError("no credentials: pass --credentials FILE (from `fedlora devices add`) or set "
                         "FEDLORA_CREDENTIALS")
    creds = load_credentials(args.credentials, role="device")
    me = creds.id
    if args.device_id and args.device_id != me:
        raise ValueError(f"--device-id {args.device_id} but the credentials file is for device '{me}'")
    args.device_id = me
    examples = load_jsonl(args.data)
    profile = load_profile(args.profile) if args.profile else measure_profile(me, warn=lambda m: log(me, m))
    state = DeviceState(args.state_dir or Path.home() / ".fedlora" / args.run / me, log=lambda m: log(me, m))
    training = Training(device=args.device, threads=args.threads, slowdown=args.slowdown,
                        downlink_mbps=args.downlink_mbps, memory_gb=args.memory_gb)

    def make_link(will: Will) -> Link:
        return Link(broker_address(args, creds), me, will=will, uplink_mbps=args.uplink_mbps,
                    log=lambda m: log(me, m))

    return DeviceSession(creds, examples, profile, state, make_link, run_id=args.run, training=training)


def broker_address(args, creds) -> BrokerAddress:
    """The broker, logged in as this device: the password from FEDLORA_MQTT_PASSWORD or the
    credentials file, the CA from --ca-file or the credentials file, a client certificate if it has one."""
    import dataclasses

    address = parse_broker(args.broker, creds.mqtt_username or creds.id,
                           os.environ.get("FEDLORA_MQTT_PASSWORD") or creds.mqtt_password, args.ca_file)
    return dataclasses.replace(address, ca_pem=None if args.ca_file else creds.ca_pem, cert_pem=creds.cert_pem,
                               key_pem=creds.key_pem)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
