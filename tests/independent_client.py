#!/usr/bin/env python3
"""An independent fedlora-edge device client (wire protocol 2.0), written from docs/protocol.md only.

It does not train: for every plan it adds 0.001 to every element of the plan's tensors and sends
that back as the update. Under secure aggregation (a plan with `meta.secagg`) it runs the four
stages of the document's "Secure aggregation" section and sends its masked vector instead.
Dependencies: paho-mqtt 2.x, cryptography, pycryptodome (Shamir), safetensors, numpy, stdlib.

    python tests/independent_client.py --broker mqtt://HOST:PORT --credentials FILE.json \
        --run RUN_ID --state-dir DIR --examples N

Exit statuses: 0 the run is done; 2 bad input (credentials, arguments, profile); 3 the broker
refused the login, or TLS cannot work; 4 out of memory.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import ssl
import struct
import sys
import tempfile
import time
import urllib.parse

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

SCHEMA = "2.0"
SIG_PREFIX = b"fedlora/2"
SIG_LEN = 64
CHUNK_BYTES = 900 * 1024
MAX_TRANSFER_BYTES = 512 * 1024 * 1024
CLIENT_VERSION = "independent-client/0.1"
ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
ROUND_STATES = ("waiting", "training", "done")

DEFAULT_PROFILE = {
    "name": "raspberry-pi-5",
    "description": "independent test client (profile of a Raspberry Pi 5)",
    "memory_total_gb": 8.0,
    "memory_usable_gb": 6.5,
    "compute_gflops": 25.0,
    "uplink_mbps": 300.0,
    "downlink_mbps": 300.0,
    "trainer": "torch",
    "trainer_base": "fp32",
    "runtime": "executorch",
    "quant": "8da8w",
    "threads": 4,
    "sources": {},
}

EXIT_DONE, EXIT_INPUT, EXIT_BROKER, EXIT_OOM = 0, 2, 3, 4


class Exit(Exception):
    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


class Refused(Exception):
    """A message that is dropped, with the reason."""


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [ind-client] {msg}", flush=True)


# ---------------------------------------------------------------- files


def write_durable(path: str, data: bytes) -> None:
    """New file, fsync, rename, fsync the folder."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _no_constants(name: str):
    raise ValueError(f"JSON constant {name} is not allowed")


def parse_json(raw: bytes) -> dict:
    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError) as e:
        raise Refused(f"bad JSON: {e}") from None
    if not isinstance(obj, dict):
        raise Refused("body is not a JSON object")
    return obj


def dump_json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------- credentials


ENCODING = "fedlora.encoding"
LEVELS = {"int8": 127, "int4": 7}
CODE_DTYPE = {"fp16": np.float16, "int8": np.int8, "int4": np.uint8}


def st_metadata(blob: bytes) -> dict:
    """The safetensors header's __metadata__ (the format: 8-byte little-endian length, JSON)."""
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]).get("__metadata__") or {}


def decode_payload(blob: bytes, reference: dict | None = None) -> dict:
    """A compressed payload's tensors as float32 (the protocol document's "Compressed payloads")."""
    enc = json.loads(st_metadata(blob)[ENCODING])
    codec, block = enc["codec"], int(enc["block"])
    raw = st_load(blob)
    keys = sorted(k for k, v in raw.items() if not k.startswith("::") and v.dtype == CODE_DTYPE[codec])
    out = {k: v for k, v in raw.items() if k not in keys and not k.startswith("::")}
    at = 0
    for i, k in enumerate(keys):
        v = raw[k]
        if codec == "fp16":
            out[k] = v.astype(np.float32)
            continue
        if codec == "int8":
            shape, codes = v.shape, v.reshape(-1).astype(np.float32)
        else:
            shape = tuple(enc["shapes"][k])
            n = int(np.prod(shape))
            pairs = np.stack([(v & 0x0F).astype(np.int16) - 8, (v >> 4).astype(np.int16) - 8], axis=1)
            codes = pairs.reshape(-1)[:n].astype(np.float32)
        nb = -(-codes.size // block)
        scales = np.float32(raw["::tensor_scales"][i]) * raw["::block_scales"][at:at + nb].astype(np.float32)
        at += nb
        padded = np.zeros(nb * block, dtype=np.float32)
        padded[:codes.size] = codes
        out[k] = (padded.reshape(nb, block) * scales[:, None]).reshape(-1)[:codes.size].reshape(shape)
    if enc.get("delta"):
        for k in keys:
            if reference is not None and k in reference and reference[k].shape == out[k].shape:
                out[k] = reference[k] + out[k]
    return out


def update_reference(start: dict, plan: dict) -> dict:
    """The plan's data with each module's lora_A / lora_B cut to the plan's components where it holds
    more components than the plan's rank (the document's "delta" rule)."""
    out = dict(start)
    for module, comps in plan["modules"].items():
        ka = f"base_model.model.{module}.lora_A.weight"
        kb = f"base_model.model.{module}.lora_B.weight"
        if ka in start and kb in start and start[ka].shape[0] != len(comps):
            out[ka], out[kb] = start[ka][list(comps), :], start[kb][:, list(comps)]
    return out


def encode_payload(tensors: dict, comp: dict, reference: dict) -> bytes:
    """``tensors`` under the plan's ``compression``, as the change from ``reference`` (the plan's
    data as decoded); rounding to nearest (this client ignores ``stochastic`` and
    ``error_feedback``, which only make it more accurate)."""
    codec, block = comp["codec"], int(comp["block"])
    out, shapes, t_scales, b_scales = {}, {}, [], []
    for k in sorted(tensors):
        x = np.asarray(tensors[k], dtype=np.float32)
        if k in reference and reference[k].shape == x.shape:
            x = x - reference[k]
        if codec == "fp16":
            out[k] = x.astype(np.float16)
            continue
        level = LEVELS[codec]
        flat = x.reshape(-1)
        nb = -(-flat.size // block)
        padded = np.zeros(nb * block, dtype=np.float32)
        padded[:flat.size] = flat
        blocks = padded.reshape(nb, block)
        s = np.abs(blocks).max(axis=1) / np.float32(level) if nb else np.zeros(0, dtype=np.float32)
        t = np.float32(s.max()) if nb else np.float32(0)
        r = (s / t if t > 0 else np.zeros_like(s)).astype(np.float16)
        low = r.astype(np.float32) < (s / t if t > 0 else s)  # rounded up: no code passes the level
        r[low] = np.nextafter(r[low], np.float16(np.inf))
        scale = (t * r.astype(np.float32))[:, None]
        safe = np.where(scale > 0, scale, np.float32(1))
        codes = np.where(scale > 0, np.clip(np.round(blocks / safe), -level, level), 0).reshape(-1)[:flat.size]
        t_scales.append(t)
        b_scales.append(r)
        if codec == "int8":
            out[k] = codes.astype(np.int8).reshape(x.shape)
        else:
            nib = (codes.astype(np.int16) + 8).astype(np.uint8)
            if nib.size % 2:
                nib = np.concatenate([nib, np.array([8], dtype=np.uint8)])
            out[k] = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)
            shapes[k] = list(x.shape)
    if codec != "fp16":
        out["::tensor_scales"] = np.array(t_scales, dtype=np.float32)
        out["::block_scales"] = np.concatenate(b_scales).astype(np.float16)
    enc = {"codec": codec, "block": block, "delta": True}
    if shapes:
        enc["shapes"] = shapes
    return st_save(out, metadata={ENCODING: json.dumps(enc)})


def load_credentials(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        raise Exit(EXIT_INPUT, f"cannot read credentials file {path}: {e}") from None
    if not isinstance(c, dict) or c.get("fedlora_credentials") != 2:
        raise Exit(EXIT_INPUT, f"{path}: not a fedlora credentials file (version 2)")
    if c.get("role") != "device":
        raise Exit(EXIT_INPUT, f"{path}: role is {c.get('role')!r}, not 'device'")
    dev = c.get("id")
    if not isinstance(dev, str) or not ID_RE.match(dev):
        raise Exit(EXIT_INPUT, f"{path}: bad device id {dev!r}")

    def key32(field: str) -> bytes:
        try:
            raw = base64.b64decode(c[field], validate=True)
        except (KeyError, TypeError, ValueError):
            raise Exit(EXIT_INPUT, f"{path}: missing or bad {field}") from None
        if len(raw) != 32:
            raise Exit(EXIT_INPUT, f"{path}: {field} is {len(raw)} bytes, not 32")
        return raw

    sk = Ed25519PrivateKey.from_private_bytes(key32("signing_key"))
    pk = key32("public_key")
    from cryptography.hazmat.primitives import serialization

    if sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) != pk:
        raise Exit(EXIT_INPUT, f"{path}: public_key does not match signing_key")
    coord = Ed25519PublicKey.from_public_bytes(key32("coordinator_key"))
    m = c.get("mqtt") or {}
    user = m.get("username")
    password = os.environ.get("FEDLORA_MQTT_PASSWORD") or m.get("password")
    if not isinstance(user, str) or not isinstance(password, str):
        raise Exit(EXIT_INPUT, f"{path}: missing mqtt.username / mqtt.password")
    tls = c.get("tls") or {}
    return {"id": dev, "sk": sk, "coord": coord, "user": user, "password": password, "tls": tls}


# ---------------------------------------------------------------- the client


class SecureRound:
    """One round of secure aggregation, as docs/protocol.md's "Secure aggregation" says."""

    def __init__(self, me: str, sa: dict, plan: dict, start: dict):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.me, self.sa, self.plan, self.start = me, sa, plan, start
        self.ctx = sa["context"].encode()
        self.c, self.s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self.b = secrets.token_bytes(32)
        self.roster: dict = {}
        self.held: dict = {}  # sender -> (index, s share, b share)
        self.asked = None

    @staticmethod
    def _pub(key) -> str:
        return base64.b64encode(key.public_key().public_bytes_raw()).decode()

    def keys(self) -> dict:
        return {"c": self._pub(self.c), "s": self._pub(self.s)}

    @staticmethod
    def _hkdf(secret: bytes, info: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)

    def _x(self, private, peer_b64: str) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        return private.exchange(X25519PublicKey.from_public_bytes(base64.b64decode(peer_b64)))

    def _share_key(self, peer: str) -> bytes:
        return self._hkdf(self._x(self.c, self.roster[peer]["c"]), b"fedlora secagg shares\x00" + self.ctx)

    def _aad(self, sender: str, recipient: str) -> bytes:
        return b"fedlora secagg share\x00" + self.ctx + b"\x00" + sender.encode() + b"\x00" + recipient.encode()

    def shares(self, roster: dict, params: dict) -> dict:
        from Crypto.Protocol.SecretSharing import Shamir
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        t = int(params["threshold"])
        if self.me in roster or len(roster) < t:
            raise Refused(f"a roster of {len(roster)} neighbours (threshold {t}), or one naming this device")
        self.roster, self.params = roster, params
        peers = sorted(roster)
        n = len(peers) + 1

        def split(secret: bytes) -> list:
            lo, hi = Shamir.split(t, n, secret[:16]), Shamir.split(t, n, secret[16:])
            return [(i, a + b) for (i, a), (_, b) in zip(lo, hi)]

        s_sh, b_sh = split(self.s.private_bytes_raw()), split(self.b)
        out = {}
        for v, (i, ss), (_, bs) in zip(peers, s_sh[1:], b_sh[1:]):
            body = json.dumps({"from": self.me, "to": v, "index": i, "s": base64.b64encode(ss).decode(),
                               "b": base64.b64encode(bs).decode()}).encode()
            nonce = secrets.token_bytes(12)
            out[v] = base64.b64encode(nonce + AESGCM(self._share_key(v)).encrypt(nonce, body, self._aad(self.me, v))).decode()
        return out

    @staticmethod
    def _stream(seed: bytes, n: int) -> np.ndarray:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
        return np.frombuffer(enc.update(b"\x00" * (4 * n)), dtype="<u4").astype(np.uint32)

    def _vector(self) -> np.ndarray:
        """The change (every value +0.001, as this client's 'training') in the document's layout."""
        R, w = int(self.sa["rank"]), float(self.sa["weight"])
        parts = []
        for m in sorted(self.sa["dims"]):
            n_in, n_out = self.sa["dims"][m]
            comps = self.plan["modules"][m]
            a, bb, z = np.zeros((R, n_in)), np.zeros((n_out, R)), np.zeros(R)
            a[comps, :] = w * 0.001
            bb[:, comps] = w * 0.001
            z[comps] = w
            parts += [a.ravel(), bb.ravel(), z]
        parts.append(np.array([w]))
        return np.concatenate(parts)

    def masked(self, inbox: dict) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        for u, ct in inbox.items():
            if u not in self.roster:
                raise Refused(f"a share from {u}, not a neighbour")
            raw = base64.b64decode(ct)
            body = json.loads(AESGCM(self._share_key(u)).decrypt(raw[:12], raw[12:], self._aad(u, self.me)))
            if body["from"] != u or body["to"] != self.me:
                raise Refused(f"{u}'s share names another pair")
            self.held[u] = (body["index"], body["s"], body["b"])
        p = self.params
        c, levels = float(p["clip_range"]), int(p["levels"])
        x = (np.clip(self._vector(), -c, c) + c) * ((levels - 1) / (2 * c))
        low = np.floor(x)
        words = np.minimum(low + (np.random.random(x.shape) < x - low), levels - 1).astype(np.uint32)
        words += self._stream(self.b, words.size)
        for v in sorted(self.held):
            lo, hi = sorted((self.me, v))
            seed = self._hkdf(self._x(self.s, self.roster[v]["s"]),
                              b"fedlora secagg mask\x00" + self.ctx + b"\x00" + lo.encode() + b"\x00" + hi.encode())
            if self.me < v:
                words += self._stream(seed, words.size)
            else:
                words -= self._stream(seed, words.size)
        return words.astype("<u4").tobytes()

    def unmask(self, survivors: list, dropped: list) -> dict:
        if set(survivors) & set(dropped) or self.me in dropped:
            raise Refused("an unmasking request naming a device both survived and dropped (or this one dropped)")
        if self.asked is not None and self.asked != (sorted(survivors), sorted(dropped)):
            raise Refused("a second, different unmasking request")
        self.asked = (sorted(survivors), sorted(dropped))
        out: dict = {"b": {}, "s": {}}
        for v, (i, s_share, b_share) in self.held.items():
            if v in survivors:
                out["b"][v] = [i, b_share]
            elif v in dropped:
                out["s"][v] = [i, s_share]
        return out


class Device:
    def __init__(self, args, creds):
        self.args = args
        self.id = creds["id"]
        self.sk = creds["sk"]
        self.coord = creds["coord"]
        self.creds = creds
        self.run = args.run
        self.examples = args.examples
        self.profile = args.profile
        self.state_dir = args.state_dir
        os.makedirs(self.state_dir, exist_ok=True)
        self.t_round = f"fedlora/{self.run}/round"
        base = f"fedlora/{self.run}/dev/{self.id}"
        self.t_down, self.t_ack = f"{base}/down", f"{base}/ack"
        self.t_hello, self.t_status = f"{base}/hello", f"{base}/status"
        self.t_up, self.t_event = f"{base}/up", f"{base}/event"
        self.subs = (self.t_round, self.t_down, self.t_ack)

        self.state_path = os.path.join(self.state_dir, "state.json")
        self.ctr_path = os.path.join(self.state_dir, "ctr")
        self.state = self._load_state()
        # the sending counter: above the floor on disk and above the clock in microseconds
        self.ctr = max(self._load_ctr() + 1, time.time_ns() // 1000)
        self._save_ctr()
        self.in_floor: dict[str, int] = {}  # per topic, the highest ctr accepted (round: on disk)
        self.transfers: dict[str, dict] = {}  # incomplete transfers by transfer id, oldest first
        self.session = ""
        self.need_hello = False
        self.connected = False
        self.refused_connect: str | None = None
        self.done = False
        self.pending: list = []
        self.secure: dict[int, SecureRound] = {}  # round -> this device's secure-aggregation state

    # ---- persistence

    def _load_state(self) -> dict:
        try:
            with open(self.state_path, encoding="utf-8") as f:
                s = json.load(f)
        except FileNotFoundError:
            s = {}
        except (OSError, ValueError) as e:
            raise Exit(EXIT_INPUT, f"cannot read state {self.state_path}: {e}") from None
        s.setdefault("nonce", None)
        s.setdefault("round_ctr", -1)
        s.setdefault("trained", [])
        s.setdefault("seen_active", False)
        s.setdefault("programs", [])
        return s

    def _save_state(self) -> None:
        write_durable(self.state_path, dump_json(self.state))

    def _load_ctr(self) -> int:
        try:
            with open(self.ctr_path, encoding="utf-8") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return -1

    def _save_ctr(self) -> None:
        write_durable(self.ctr_path, str(self.ctr).encode())

    def next_ctr(self) -> int:
        self.ctr += 1
        self._save_ctr()
        return self.ctr

    def updates_dir(self, nonce: str) -> str:
        return os.path.join(self.state_dir, "updates", nonce)

    def held_updates(self) -> list[tuple[str, dict]]:
        nonce = self.state["nonce"]
        if not nonce:
            return []
        d = self.updates_dir(nonce)
        out = []
        if os.path.isdir(d):
            for name in sorted(os.listdir(d)):
                if name.endswith(".json"):
                    uid = name[:-5]
                    try:
                        with open(os.path.join(d, name), encoding="utf-8") as f:
                            meta = json.load(f)
                        if os.path.exists(os.path.join(d, uid + ".safetensors")):
                            out.append((uid, meta))
                    except (OSError, ValueError):
                        pass
        return out

    def delete_update(self, uid: str) -> bool:
        nonce = self.state["nonce"]
        if not nonce or not re.fullmatch(r"[0-9a-f]{32}", uid):
            return False
        d = self.updates_dir(nonce)
        found = False
        for ext in (".json", ".safetensors"):
            p = os.path.join(d, uid + ext)
            if os.path.exists(p):
                os.unlink(p)
                found = True
        return found

    def join_run(self, nonce: str) -> None:
        old = self.state["nonce"]
        log(f"joining run {self.run!r} nonce {nonce} (was {old})")
        shutil.rmtree(os.path.join(self.state_dir, "updates"), ignore_errors=True)
        self.state.update(nonce=nonce, trained=[], seen_active=False)
        self.transfers.clear()
        for t in (self.t_down, self.t_ack):
            self.in_floor.pop(t, None)
        self._save_state()

    # ---- signing

    def sign(self, topic: str, body: bytes) -> bytes:
        return self.sk.sign(SIG_PREFIX + b"\x00" + topic.encode() + b"\x00" + body) + body

    def verify(self, topic: str, payload: bytes) -> bytes:
        if len(payload) < SIG_LEN:
            raise Refused("payload shorter than a signature")
        sig, body = payload[:SIG_LEN], payload[SIG_LEN:]
        try:
            self.coord.verify(sig, SIG_PREFIX + b"\x00" + topic.encode() + b"\x00" + body)
        except InvalidSignature:
            raise Refused("bad signature (not the coordinator's key)") from None
        return body

    def common(self, typ: str, with_nonce: bool = True) -> dict:
        m = {"schema": SCHEMA, "type": typ, "run": self.run, "device": self.id, "ctr": self.next_ctr()}
        if with_nonce:
            m["nonce"] = self.state["nonce"]
        return m

    def check_common(self, topic: str, m: dict, want_type: str, device_topic: bool) -> None:
        schema = m.get("schema")
        if not isinstance(schema, str):
            raise Refused("no schema")
        major = schema.split(".", 1)[0]
        if major != "2":
            raise Refused(f"unsupported schema major version {schema!r} (this client speaks 2.x)")
        if m.get("type") != want_type:
            raise Refused(f"type {m.get('type')!r} is not carried on this topic (want {want_type!r})")
        if m.get("run") != self.run:
            raise Refused(f"run {m.get('run')!r} is not the topic's {self.run!r}")
        if device_topic and m.get("device") != self.id:
            raise Refused(f"device {m.get('device')!r} is not the topic's {self.id!r}")
        nonce = m.get("nonce")
        if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
            raise Refused(f"bad nonce {nonce!r}")
        ctr = m.get("ctr")
        if not isinstance(ctr, int) or isinstance(ctr, bool) or ctr < 0:
            raise Refused(f"bad ctr {ctr!r}")
        floor = self.state["round_ctr"] if topic == self.t_round else self.in_floor.get(topic, -1)
        if ctr < floor:
            raise Refused(f"ctr {ctr} below the highest accepted on this topic ({floor}): replay or stale")

    def accept_ctr(self, topic: str, ctr: int) -> None:
        if topic == self.t_round:
            if ctr > self.state["round_ctr"]:
                self.state["round_ctr"] = ctr
                self._save_state()
        elif ctr > self.in_floor.get(topic, -1):
            self.in_floor[topic] = ctr

    # ---- publishing

    def publish(self, topic: str, body: bytes | None, retain: bool = False, what: str = "") -> None:
        payload = b"" if body is None else self.sign(topic, body)
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        self.pending.append(info)
        log(f"sent {topic} {what} ({len(payload)} bytes{', retained' if retain else ''}) rc={info.rc}")

    def send_json(self, topic: str, m: dict, retain: bool = False) -> None:
        self.publish(
            topic,
            dump_json(m),
            retain=retain,
            what=f"type={m['type']}" + (f" round={m['round']}" if "round" in m else ""),
        )

    def say_hello(self) -> None:
        m = self.common("hello")
        m.update(
            session=self.session,
            profile=self.profile,
            examples=self.examples,
            domains={"local": self.examples},
            client_version=CLIENT_VERSION,
            programs=list(self.state["programs"]),
        )
        self.send_json(self.t_hello, m, retain=True)

    def will_payload(self) -> bytes:
        m = {
            "type": "status",
            "device": self.id,
            "session": self.session,
            "state": "offline",
            "run": self.run,
            "ctr": self.next_ctr(),
            "schema": SCHEMA,
        }
        return self.sign(self.t_status, dump_json(m))

    def send_update(self, uid: str, meta: dict) -> None:
        path = os.path.join(self.updates_dir(self.state["nonce"]), uid + ".safetensors")
        with open(path, "rb") as f:
            data = f.read()
        total = max(1, math.ceil(len(data) / CHUNK_BYTES))
        digest = hashlib.sha256(data).hexdigest()
        for seq in range(total):
            h = self.common("chunk")
            h.update(
                kind="update",
                round=meta["round"],
                transfer=uid,
                seq=seq,
                total=total,
                nbytes=len(data),
                sha256=digest,
            )
            if seq == 0:
                h["meta"] = meta
            hb = dump_json(h)
            body = struct.pack(">I", len(hb)) + hb + data[seq * CHUNK_BYTES : (seq + 1) * CHUNK_BYTES]
            self.publish(
                self.t_up, body, what=f"update chunk {seq + 1}/{total} round={meta['round']} update_id={uid}"
            )

    def resend_held(self) -> None:
        for uid, meta in self.held_updates():
            log(f"re-sending held update {uid} (round {meta.get('round')})")
            self.send_update(uid, meta)

    # ---- receiving

    def on_message(self, client, userdata, msg) -> None:
        topic, payload = msg.topic, bytes(msg.payload)
        if topic not in self.subs:
            log(f"ignored message on {topic}: not one of this device's subscriptions")
            return
        if not payload:
            log(f"received empty payload on {topic} (a retained message cleared): ignored")
            return
        log(f"received {topic} ({len(payload)} bytes{', retained' if msg.retain else ''})")
        try:
            body = self.verify(topic, payload)
            if topic == self.t_round:
                self.on_round(topic, body)
            elif topic == self.t_ack:
                self.on_ack(topic, body)
            else:
                self.on_chunk(topic, body)
        except Refused as e:
            log(f"refused {topic}: {e}")
        except Exit:
            raise
        except MemoryError:
            self.exit = Exit(EXIT_OOM, "out of memory")
        except Exception as e:  # a bad message must never stop the device
            log(f"refused {topic}: unexpected error {type(e).__name__}: {e}")

    def on_round(self, topic: str, body: bytes) -> None:
        m = parse_json(body)
        self.check_common(topic, m, "round", device_topic=False)
        state, rnd = m.get("state"), m.get("round")
        if state not in ROUND_STATES:
            raise Refused(f"bad round state {state!r}")
        if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
            raise Refused(f"bad round number {rnd!r}")
        nonce = m["nonce"]
        log(f"round message: round {rnd} state {state} nonce {nonce} ctr {m['ctr']}")
        if nonce != self.state["nonce"]:
            if state == "done":
                log(f"ignored: 'done' of another run (nonce {nonce})")
                return
            self.accept_ctr(topic, m["ctr"])
            self.join_run(nonce)
            self.need_hello = True
        else:
            self.accept_ctr(topic, m["ctr"])
        if state in ("waiting", "training") and not self.state["seen_active"]:
            self.state["seen_active"] = True
            self._save_state()
        if state == "done":
            if self.state["seen_active"] or self.state["trained"]:
                self.finish()
            else:
                log("ignored: 'done' of a run this device never saw active")
            return
        if self.need_hello:
            self.need_hello = False
            self.say_hello()
            self.resend_held()

    def on_ack(self, topic: str, body: bytes) -> None:
        m = parse_json(body)
        self.check_common(topic, m, "ack", device_topic=True)
        if m["nonce"] != self.state["nonce"]:
            raise Refused(f"ack of another run (nonce {m['nonce']}), not acted on")
        uid, status = m.get("update_id"), m.get("status")
        if status not in ("accepted", "duplicate", "rejected", "stale"):
            raise Refused(f"bad ack status {status!r}")
        if not isinstance(uid, str):
            raise Refused(f"bad update_id {uid!r}")
        self.accept_ctr(topic, m["ctr"])
        deleted = self.delete_update(uid)
        log(
            f"ACK round {m.get('round')} update {uid}: {status}"
            + (f" reason: {m.get('reason')}" if m.get("reason") else "")
            + ("; deleted from disk" if deleted else "; (nothing held)")
        )

    def parse_chunk(self, body: bytes) -> tuple[dict, bytes]:
        if len(body) < 4:
            raise Refused("chunk shorter than its length prefix")
        (n,) = struct.unpack(">I", body[:4])
        if n > len(body) - 4:
            raise Refused(f"chunk header length {n} exceeds the body")
        return parse_json(body[4 : 4 + n]), body[4 + n :]

    def on_chunk(self, topic: str, body: bytes) -> None:
        h, data = self.parse_chunk(body)
        self.check_common(topic, h, "chunk", device_topic=True)
        if self.state["nonce"] is None or h["nonce"] != self.state["nonce"]:
            raise Refused(f"chunk of another run (nonce {h['nonce']}), not acted on")
        kind, rnd, tid = h.get("kind"), h.get("round"), h.get("transfer")
        seq, total, nbytes, digest = h.get("seq"), h.get("total"), h.get("nbytes"), h.get("sha256")
        if kind not in ("plan", "program", "secagg"):
            raise Refused(f"kind {kind!r} is not sent to a device")
        for name, v in (("round", rnd), ("seq", seq), ("total", total), ("nbytes", nbytes)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise Refused(f"bad {name} {v!r}")
        if not isinstance(tid, str) or not tid or len(tid) > 128:
            raise Refused(f"bad transfer id {tid!r}")
        if total < 1 or seq >= total:
            raise Refused(f"bad seq {seq} / total {total}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise Refused(f"bad sha256 {digest!r}")
        self.accept_ctr(topic, h["ctr"])
        t = self.transfers.get(tid)
        if t is None:
            if nbytes > MAX_TRANSFER_BYTES:
                raise Refused(f"transfer {tid} of {nbytes} bytes exceeds the limit {MAX_TRANSFER_BYTES}")
            if len(self.transfers) >= 2:
                old = next(iter(self.transfers))
                log(f"evicting incomplete transfer {old} (at most two held)")
                del self.transfers[old]
            t = {
                "kind": kind,
                "round": rnd,
                "total": total,
                "nbytes": nbytes,
                "sha256": digest,
                "chunks": {},
                "meta": None,
                "size": 0,
            }
            self.transfers[tid] = t
        if (kind, rnd, total, nbytes, digest) != (
            t["kind"],
            t["round"],
            t["total"],
            t["nbytes"],
            t["sha256"],
        ):
            raise Refused(f"chunk {seq} of transfer {tid} contradicts its first chunk")
        if seq in t["chunks"]:
            log(f"duplicate chunk {seq} of transfer {tid}: ignored")
            return
        if seq == 0:
            meta = h.get("meta")
            if not isinstance(meta, dict):
                del self.transfers[tid]
                raise Refused(f"chunk 0 of transfer {tid} has no meta object")
            t["meta"] = meta
        t["size"] += len(data)
        if t["size"] > nbytes:
            del self.transfers[tid]
            raise Refused(f"transfer {tid}: chunks add up to more than nbytes={nbytes}; dropped")
        t["chunks"][seq] = data
        log(f"chunk {seq + 1}/{total} of {kind} transfer {tid} (round {rnd})")
        if len(t["chunks"]) < total or t["meta"] is None:
            return
        del self.transfers[tid]
        whole = b"".join(t["chunks"][i] for i in range(total))
        if len(whole) != nbytes:
            raise Refused(f"transfer {tid}: {len(whole)} bytes, header says {nbytes}")
        if hashlib.sha256(whole).hexdigest() != digest:
            raise Refused(f"transfer {tid}: sha256 mismatch")
        if kind == "plan":
            self.on_plan(tid, rnd, t["meta"], whole)
        elif kind == "secagg":
            self.on_secagg(rnd, t["meta"], whole)
        else:
            self.on_program(tid, t["meta"], whole)

    def on_program(self, tid: str, meta: dict, data: bytes) -> None:
        key = meta.get("key")
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", key):
            raise Refused(f"program with a bad key {key!r}")
        if meta.get("sha256") not in (None, hashlib.sha256(data).hexdigest()):
            raise Refused(f"program {key}: sha256 does not match its sidecar")
        write_durable(os.path.join(self.state_dir, "programs", key + ".pte"), data)
        write_durable(os.path.join(self.state_dir, "programs", key + ".json"), dump_json(meta))
        if key not in self.state["programs"]:
            self.state["programs"].append(key)
            self._save_state()
        log(f"kept program {key} ({len(data)} bytes)")

    def on_plan(self, tid: str, rnd: int, meta: dict, data: bytes) -> None:
        if meta.get("round") != rnd:
            raise Refused(f"plan meta.round {meta.get('round')!r} is not the header's round {rnd}")
        train = meta.get("train")
        steps = train.get("steps") if isinstance(train, dict) else None
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise Refused(f"plan has bad train.steps {steps!r}")
        log(f"complete plan for round {rnd} (transfer {tid}, {len(data)} bytes, steps {steps})")
        ev = self.common("received")
        ev.update(round=rnd, transfer=tid)
        self.send_json(self.t_event, ev)
        if rnd in self.state["trained"]:
            held = [(u, m) for u, m in self.held_updates() if m.get("round") == rnd]
            log(f"round {rnd} already trained; re-sending {len(held)} held update(s)")
            for uid, m in held:
                self.send_update(uid, m)
            return
        sa = meta.get("secagg")
        if isinstance(sa, dict) and rnd not in self.secure:  # stage 1 at once; the masked vector comes later
            sr = self.secure[rnd] = SecureRound(self.id, sa, meta["plan"], st_load(data))
            ev = self.common("secagg")
            ev.update(round=rnd, stage="keys", keys=sr.keys())
            self.send_json(self.t_event, ev)
            return
        try:
            t0 = time.time()
            comp = meta.get("compression")
            tensors = decode_payload(data) if comp else st_load(data)
            out = {
                k: (np.asarray(v, dtype=np.float32) + np.float32(0.001)).astype(np.float32)
                for k, v in tensors.items()
            }
            blob = encode_payload(out, comp, update_reference(tensors, meta["plan"])) if comp else st_save(out)
            uid = secrets.token_hex(16)
            umeta = {
                "round": rnd,
                "update_id": uid,
                "report": {
                    "round": rnd,
                    "num_examples": self.examples,
                    "steps": steps,
                    "first_loss": 1.0,
                    "last_loss": 0.9,
                    "seconds": 0.01,
                },
            }
            d = self.updates_dir(self.state["nonce"])
            write_durable(os.path.join(d, uid + ".safetensors"), blob)
            write_durable(os.path.join(d, uid + ".json"), dump_json(umeta))
            self.state["trained"].append(rnd)
            self._save_state()
            log(f"'trained' round {rnd}: {len(out)} tensors in {time.time() - t0:.3f}s, update {uid}")
        except MemoryError:
            self.send_failure(rnd, "out of memory")
            self.exit = Exit(EXIT_OOM, "out of memory")
            return
        except Exception as e:
            self.send_failure(rnd, f"{type(e).__name__}: {e}")
            return
        if os.environ.get("IC_CRASH_BEFORE_SEND"):  # test hook: die after persisting, before sending
            log("IC_CRASH_BEFORE_SEND: exiting abruptly with the update held on disk")
            os._exit(9)
        self.send_update(uid, umeta)

    def on_secagg(self, rnd: int, meta: dict, data: bytes) -> None:
        sr = self.secure.get(rnd)
        if sr is None:
            raise Refused(f"secure aggregation message for round {rnd}, where this device exchanged no keys")
        body = parse_json(data)
        stage = meta.get("stage")
        if stage == "roster":
            ev = self.common("secagg")
            ev.update(round=rnd, stage="shares", shares=sr.shares(body["roster"], body["params"]))
            self.send_json(self.t_event, ev)
        elif stage == "relay":
            blob = sr.masked(body["inbox"])
            uid = secrets.token_hex(16)
            umeta = {"round": rnd, "update_id": uid, "report": {"round": rnd, "num_examples": self.examples,
                                                                  "steps": 1, "first_loss": 1.0, "last_loss": 0.9,
                                                                  "seconds": 0.01}}
            d = self.updates_dir(self.state["nonce"])
            write_durable(os.path.join(d, uid + ".safetensors"), blob)
            write_durable(os.path.join(d, uid + ".json"), dump_json(umeta))
            self.state["trained"].append(rnd)
            self._save_state()
            self.send_update(uid, umeta)
        elif stage == "unmask":
            ev = self.common("secagg")
            ev.update(round=rnd, stage="unmask", response=sr.unmask(body["survivors"], body["dropped"]))
            self.send_json(self.t_event, ev)
        else:
            raise Refused(f"secure aggregation stage {stage!r}")

    def send_failure(self, rnd: int, reason: str) -> None:
        ev = self.common("failure")
        ev.update(round=rnd, reason=reason)
        self.send_json(self.t_event, ev)

    def finish(self) -> None:
        held = self.held_updates()
        log(f"run done: dropping {len(held)} unacknowledged update(s), clearing retained hello/status")
        shutil.rmtree(os.path.join(self.state_dir, "updates"), ignore_errors=True)
        self.publish(self.t_hello, None, retain=True, what="(clear)")
        self.publish(self.t_status, None, retain=True, what="(clear)")
        self.done = True

    # ---- connection

    def on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused_connect = str(reason_code)
            log(f"broker refused CONNECT: {reason_code}")
            return
        self.connected = True
        log(f"connected (session {self.session}, session_present={flags.session_present})")
        for t in self.subs:
            client.subscribe(t, qos=1)
        # hello and re-sends wait for a verified round message (step 2)
        self.need_hello = True

    def on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected = False
        log(f"disconnected: {reason_code}")

    def on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for rc in reason_codes:
            if rc.is_failure:
                log(f"subscription refused by the broker: {rc}")

    def make_client(self) -> mqtt.Client:
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, clean_session=False, protocol=mqtt.MQTTv311
        )
        c.username_pw_set(self.creds["user"], self.creds["password"])
        c.on_connect, c.on_disconnect = self.on_connect, self.on_disconnect
        c.on_message, c.on_subscribe = self.on_message, self.on_subscribe
        if self.args.scheme == "mqtts":
            c.tls_set_context(self.tls_context())
        return c

    def tls_context(self) -> ssl.SSLContext:
        tls = self.creds["tls"]
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca = tls.get("ca")
        if ca:
            try:
                ctx.load_verify_locations(cadata=ca)
            except ssl.SSLError as e:
                raise Exit(EXIT_INPUT, f"credentials tls.ca is not a usable PEM: {e}") from None
        if tls.get("cert") and tls.get("key"):
            d = os.path.join(self.state_dir, "tls")
            os.makedirs(d, mode=0o700, exist_ok=True)
            cp, kp = os.path.join(d, "client.pem"), os.path.join(d, "client.key")
            for p, text in ((cp, tls["cert"]), (kp, tls["key"])):
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            try:
                ctx.load_cert_chain(cp, kp)
            except ssl.SSLError as e:
                raise Exit(EXIT_INPUT, f"credentials tls.cert/key unusable: {e}") from None
        return ctx

    def drain(self, seconds: float = 10.0) -> None:
        end = time.time() + seconds
        while time.time() < end and any(not i.is_published() for i in self.pending):
            if self.client.loop(timeout=0.2) != mqtt.MQTT_ERR_SUCCESS:
                break
        self.pending = [i for i in self.pending if not i.is_published()]

    def run_forever(self) -> int:
        self.client = self.make_client()
        self.exit = None
        backoff = 1.0
        while True:
            self.session = secrets.token_hex(8)
            self.client.will_set(self.t_status, self.will_payload(), qos=1, retain=True)
            log(f"connecting to {self.args.host}:{self.args.port} ({self.args.scheme}) as {self.id}")
            try:
                self.client.connect(self.args.host, self.args.port, keepalive=30)
            except ssl.SSLCertVerificationError as e:
                raise Exit(EXIT_BROKER, f"the broker's certificate does not verify: {e}") from None
            except ssl.SSLError as e:
                raise Exit(EXIT_BROKER, f"TLS cannot work with this broker: {e}") from None
            except OSError as e:
                log(f"cannot reach the broker: {e}; retrying in {backoff:.0f}s")
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            t_connect = time.time()
            while True:
                try:
                    rc = self.client.loop(timeout=0.5)
                except ssl.SSLError as e:
                    raise Exit(EXIT_BROKER, f"TLS error: {e}") from None
                if self.exit is not None:
                    raise self.exit
                if self.refused_connect is not None:
                    raise Exit(
                        EXIT_BROKER, f"the broker refused the login ({self.refused_connect}); not retrying"
                    )
                if self.done:
                    self.drain()
                    self.client.disconnect()
                    log("exiting: the run is done")
                    return EXIT_DONE
                if self.connected:
                    backoff = 1.0
                    self.pending = [i for i in self.pending if not i.is_published()]
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    log(f"connection lost (rc={rc}); reconnecting in {backoff:.0f}s")
                    break
                if not self.connected and time.time() - t_connect > 30:
                    log("no CONNACK within 30 s; reconnecting")
                    break
            self.connected = False
            try:
                self.client.disconnect()
            except Exception:
                pass
            time.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--credentials", required=True)
    p.add_argument("--run", default="default")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--examples", type=int, required=True)
    p.add_argument("--profile", help="a JSON file with the hello profile (default: a Pi 5's)")
    a = p.parse_args(argv)
    u = urllib.parse.urlsplit(a.broker)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise Exit(EXIT_INPUT, f"--broker must be mqtt://HOST:PORT or mqtts://HOST:PORT, not {a.broker!r}")
    a.scheme, a.host = u.scheme, u.hostname
    try:
        a.port = u.port or (8883 if u.scheme == "mqtts" else 1883)
    except ValueError:
        raise Exit(EXIT_INPUT, f"bad port in --broker {a.broker!r}") from None
    if not ID_RE.match(a.run):
        raise Exit(EXIT_INPUT, f"bad run id {a.run!r}")
    if a.examples < 1:
        raise Exit(EXIT_INPUT, "--examples must be a positive integer")
    if a.profile:
        try:
            with open(a.profile, encoding="utf-8") as f:
                a.profile = json.load(f)
        except (OSError, ValueError) as e:
            raise Exit(EXIT_INPUT, f"cannot read profile {a.profile}: {e}") from None
    else:
        a.profile = dict(DEFAULT_PROFILE)
    return a


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        creds = load_credentials(args.credentials)
        dev = Device(args, creds)
        return dev.run_forever()
    except Exit as e:
        log(f"exit {e.code}: {e}")
        return e.code
    except MemoryError:
        log("exit 4: out of memory")
        return EXIT_OOM
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
