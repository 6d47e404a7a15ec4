"""Secure aggregation (SecAgg+, Bell et al. 2020): the coordinator learns the sum of the round's
vectors, never one device's.  Both sides' halves live here, as message-in / message-out state
machines with no transport of their own: :class:`DeviceSecAgg` (a device, one per round) and
:class:`ServerSecAgg` (the coordinator, one per round).  The messages are JSON-able dicts (keys and
ciphertexts in base64, vectors as numpy ``uint32`` arrays).

A round, for the devices ``U0`` the coordinator assigned (each stage is one round trip):

1. **Keys.**  Each device makes two fresh X25519 key pairs, ``c`` (to encrypt its shares) and ``s``
   (to agree its pairwise masks), and sends their public halves (``keys``).  Who answered: ``U1``.
2. **Shares.**  The coordinator puts ``U1`` on a ring in an order drawn from the round's public seed
   and links each device to its ``k`` nearest on it (``k/2`` each side; ``k = n - 1``, everyone, for
   small rounds): a device's *neighbours* (SecAgg+'s sparse graph, so that each device's work grows
   with ``k ~ log n``, not ``n``).  It sends each device its neighbours' public keys (``roster``).  The
   device draws a 256-bit self-mask seed ``b``, splits ``b`` and its ``s`` private key into Shamir
   shares with threshold ``t`` (pycryptodome's ``Shamir`` over GF(2^128), each 32-byte secret as two
   16-byte halves), one share of each per neighbour, and encrypts each neighbour's pair with
   AES-256-GCM under a key derived (HKDF-SHA256) from X25519 of its ``c`` and the neighbour's,
   bound by the associated data to the run, the round, the sender and the recipient.  The
   coordinator relays each ciphertext to its recipient and cannot read it.  Who shared: ``U2``.
3. **Masked input.**  The device encodes its vector into 32-bit words (:func:`encode`: clipped to
   ``[-clip_range, clip_range]``, stochastic rounding onto ``levels`` steps) and adds, modulo 2^32,
   its self mask ``PRG(b)`` and for every neighbour ``v`` in ``U2`` the pairwise mask
   ``± PRG(HKDF(X25519(s_u, s_v)))`` (``+`` when its id sorts before ``v``'s): the pairwise masks of
   two devices that both send cancel in the sum.  The PRG is ChaCha20's keystream under the
   256-bit derived key.  Who sent: ``U3``.
4. **Unmasking.**  The coordinator names the survivors ``U3`` and the dropped ``U2 \\ U3``; each
   survivor returns, for each neighbour, the share of ``b`` of a survivor or the share of ``s`` of a
   dropped one, **never both of one peer** (the device refuses a request that names a peer in both
   sets, or that differs from one it already answered: so a coordinator that lies about who
   dropped learns nothing).  With ``t`` shares of each it needs, the coordinator removes every
   survivor's self mask and the pairwise masks between dropped devices and their surviving
   neighbours; what is left is the sum of the survivors' encoded vectors.  Fewer than ``t`` shares
   of any secret it needs: the round cannot be unmasked (:class:`SecAggError` says which).

What this protects: each device's vector from the coordinator and from any ``t - 1`` devices
colluding with it (they hold fewer than ``t`` shares of any one device's secrets).  Every message
is also signed by its sender (the transport's Ed25519 signatures), so the coordinator cannot pose
as a device in the key exchange.  What it does not: a coordinator that drops honest devices on
purpose shrinks the sum it learns (down to ``t`` survivors per neighbourhood), and the sum itself
is revealed (add device-level DP's noise for that).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

PROTOCOL = "secagg+/1"
MODULUS_BITS = 32
_SEED_BYTES = 32


class SecAggError(ValueError):
    """A secure-aggregation step that cannot go on; the message says which and why."""


# ------------------------------------------------------------------------------ parameters

def default_threshold(degree: int) -> int:
    """Shares needed to rebuild a secret: a majority of a device's neighbours, so that fewer than
    half of them colluding (with the coordinator) cannot unmask it."""
    return degree // 2 + 1


def _short(k: int, t: int, dropout: float) -> float:
    """P(fewer than ``t`` of ``k`` neighbours answer) when each drops out with probability ``dropout``."""
    q = 1.0 - dropout
    return sum(math.comb(k, j) * q ** j * dropout ** (k - j) for j in range(t))


def default_degree(n: int, dropout: float = 0.3, failure: float = 1e-3) -> int:
    """Neighbours per device for a round of ``n`` that must survive a fraction ``dropout`` of its
    devices dropping out: the smallest even ``k`` of at least ``3 log2 n`` (SecAgg+'s logarithmic
    neighbourhoods) for which, with the majority threshold, the chance that some device keeps fewer
    than ``t`` answering neighbours is at most ``failure`` (each device dropping independently; a
    union bound over the ``n`` devices); everyone (``n - 1``) when that is not fewer."""
    if n <= 3:
        return max(0, n - 1)
    k = max(2, 2 * math.ceil(1.5 * math.log2(n)))
    while k < n - 1 and n * _short(k, default_threshold(k), dropout) > failure:
        k += 2
    return min(n - 1, k)


@dataclass(frozen=True)
class Params:
    """One round's protocol parameters, which the coordinator fixes and sends with the roster:
    ``degree`` neighbours per device, ``threshold`` shares to rebuild a secret, values clipped to
    ``[-clip_range, clip_range]`` and encoded on ``levels`` steps (so that ``n`` devices' sum never
    wraps modulo 2^32: ``n (levels - 1) < 2^32``)."""

    degree: int
    threshold: int
    clip_range: float = 8.0
    levels: int = (1 << 22) + 1

    @classmethod
    def for_round(cls, n: int, clip_range: float = 8.0, degree: int | None = None,
                  threshold: int | None = None, dropout: float = 0.3) -> Params:
        k = default_degree(n, dropout) if degree is None else min(degree, n - 1)
        t = default_threshold(k) if threshold is None else threshold
        steps = min(1 << 22, ((1 << MODULUS_BITS) - 1) // max(1, n))
        p = cls(k, t, clip_range, steps - steps % 2 + 1)  # odd: zero is a word exactly, so a sum of zeros is 0
        p.check(n)
        return p

    def check(self, n: int) -> None:
        if n < 3:
            raise SecAggError(f"secure aggregation needs at least 3 devices in a round, got {n}: with 2, "
                              "the sum and one's own vector give the other's")
        if not 2 <= self.threshold <= self.degree:
            raise SecAggError(f"secure aggregation: threshold {self.threshold} must be between 2 (one neighbour "
                              f"alone must not unmask a device) and the neighbours per device ({self.degree})")
        if not self.clip_range > 0:
            raise SecAggError(f"secure aggregation: clip_range must be positive, got {self.clip_range}")
        if self.levels < 2 or n * (self.levels - 1) >= 1 << MODULUS_BITS:
            raise SecAggError(f"secure aggregation: {n} vectors of {self.levels} levels would wrap 32 bits")

    def to_json(self) -> dict:
        return {"degree": self.degree, "threshold": self.threshold, "clip_range": self.clip_range,
                "levels": self.levels}

    @classmethod
    def from_json(cls, obj: Mapping) -> Params:
        try:
            return cls(int(obj["degree"]), int(obj["threshold"]), float(obj["clip_range"]), int(obj["levels"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"secure aggregation: malformed parameters ({exc})") from None


# ---------------------------------------------------------------------------- fixed point

def encode(values: np.ndarray, params: Params, rng: np.random.Generator | None = None) -> np.ndarray:
    """``values`` (float) as 32-bit words: clipped to ``[-clip_range, clip_range]``, mapped onto
    ``0 .. levels - 1`` with stochastic rounding (unbiased: the expected word decodes to the
    clipped value).  ``rng``: by default seeded from the operating system."""
    rng = rng or np.random.default_rng(secrets.randbits(64))
    c = params.clip_range
    x = (np.clip(np.asarray(values, dtype=np.float64), -c, c) + c) * ((params.levels - 1) / (2 * c))
    low = np.floor(x)
    words = low + (rng.random(x.shape) < (x - low))
    return np.minimum(words, params.levels - 1).astype(np.uint32)


def decode_sum(words: np.ndarray, count: int, params: Params) -> np.ndarray:
    """The sum of ``count`` vectors from the sum of their words (float64)."""
    c = params.clip_range
    return words.astype(np.float64) * (2 * c / (params.levels - 1)) - count * c


def quantisation_bound(count: int, params: Params) -> float:
    """The largest error the encoding can put on one coordinate of a sum of ``count`` vectors
    (within the clip range): one step each."""
    return count * 2 * params.clip_range / (params.levels - 1)


# --------------------------------------------------------------------- what a device sums

def _parts(dims: Mapping[str, tuple[int, int]], rank: int, scores: bool):
    """The summed vector's parts in order: per module (sorted) the change of ``A`` ``[R, in]`` and
    of ``B`` ``[out, R]`` in the global adapter's coordinates (zero outside the device's components)
    and the weight per component (``z``, for the methods that divide by each component's
    trainers); then the weight (``total``); with ``scores`` (HAFL), per module the weighted
    importance scores and the weight per scored component."""
    for m in sorted(dims):
        n_in, n_out = dims[m]
        yield m, "A", (rank, n_in)
        yield m, "B", (n_out, rank)
        yield m, "z", (rank,)
    yield "", "total", (1,)
    if scores:
        for m in sorted(dims):
            yield m, "score", (rank,)
            yield m, "scorers", (rank,)


def vector_length(dims: Mapping[str, tuple[int, int]], rank: int, scores: bool) -> int:
    return sum(math.prod(shape) for _, _, shape in _parts(dims, rank, scores))


def contribution(changes: Mapping[str, tuple[np.ndarray, np.ndarray]], components: Mapping[str, Iterable[int]],
                 dims: Mapping[str, tuple[int, int]], rank: int, weight: float,
                 scores: Mapping[str, tuple[Iterable[int], np.ndarray]] | None = None) -> np.ndarray:
    """A device's vector to sum (float64): its weighted changes ``weight (c_kj - c_j)`` of each
    module's trained components placed at their global indices, its weight at those components and
    in ``total``, and with ``scores`` (module -> (scored components, their scores)) the weighted
    scores.  SecAggError when a change does not fit ``dims``."""
    out = np.zeros(vector_length(dims, rank, scores is not None))
    at = 0
    for m, part, shape in _parts(dims, rank, scores is not None):
        size = math.prod(shape)
        view = out[at:at + size].reshape(shape)
        at += size
        if part == "total":
            view[0] = weight
            continue
        if part in ("score", "scorers"):
            assert scores is not None
            idx, vals = scores.get(m, ((), np.zeros(0)))
            idx = list(idx)
            view[idx] = weight * np.asarray(vals, dtype=np.float64) if part == "score" else weight
            continue
        if m not in changes:
            raise SecAggError(f"secure aggregation: no change for module '{m}'")
        idx = list(components[m])
        if part == "z":
            view[idx] = weight
            continue
        d = np.asarray(changes[m][0 if part == "A" else 1], dtype=np.float64)
        want = (len(idx), shape[1]) if part == "A" else (shape[0], len(idx))
        if d.shape != want:
            raise SecAggError(f"secure aggregation: the change of '{m}' {part} is {d.shape}, the plan says {want}")
        if part == "A":
            view[idx, :] = weight * d
        else:
            view[:, idx] = weight * d
    return out


def split_sum(vector: np.ndarray, dims: Mapping[str, tuple[int, int]], rank: int,
              scores: bool) -> dict[tuple[str, str], np.ndarray]:
    """The parts of a summed vector (:func:`contribution`'s layout): ``{(module, part): array}``,
    ``("", "total")`` the summed weight."""
    out = {}
    at = 0
    for m, part, shape in _parts(dims, rank, scores):
        size = math.prod(shape)
        out[(m, part)] = vector[at:at + size].reshape(shape)
        at += size
    if at != vector.size:
        raise SecAggError(f"secure aggregation: a sum of {vector.size} values, the layout has {at}")
    return out


# ------------------------------------------------------------------------------ primitives

def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str, what: str) -> bytes:
    try:
        return base64.b64decode(s.encode(), validate=True)
    except (ValueError, AttributeError) as exc:
        raise SecAggError(f"secure aggregation: {what} is not base64 ({exc})") from None


def _hkdf(secret: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` 32-bit words of ChaCha20's keystream under the 256-bit ``seed`` (zero nonce: every seed
    is used for one stream only)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    enc = Cipher(algorithms.ChaCha20(seed, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\0" * (4 * n)), dtype="<u4").astype(np.uint32)


def _x25519_private(raw: bytes):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(raw)


def _x25519_public(raw: bytes):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SecAggError(f"secure aggregation: a bad X25519 public key ({exc})") from None


def _pair_seed(private, peer_public: bytes, context: bytes, a: str, b: str) -> bytes:
    """The mask seed of devices ``a`` and ``b`` (either side computes it)."""
    lo, hi = sorted((a, b))
    shared = private.exchange(_x25519_public(peer_public))
    return _hkdf(shared, b"fedlora secagg mask\0" + context + b"\0" + lo.encode() + b"\0" + hi.encode())


def _share_key(private, peer_public: bytes, context: bytes) -> bytes:
    return _hkdf(private.exchange(_x25519_public(peer_public)), b"fedlora secagg shares\0" + context)


def _split(secret: bytes, t: int, n: int) -> list[tuple[int, bytes]]:
    """``n`` Shamir shares (index, 32 bytes) of a 32-byte ``secret``, any ``t`` of which rebuild it."""
    from Crypto.Protocol.SecretSharing import Shamir

    halves = [Shamir.split(t, n, secret[i:i + 16]) for i in (0, 16)]
    return [(i1, s1 + s2) for (i1, s1), (i2, s2) in zip(*halves)]


def _combine(shares: list[tuple[int, bytes]]) -> bytes:
    from Crypto.Protocol.SecretSharing import Shamir

    return b"".join(Shamir.combine([(i, s[h:h + 16]) for i, s in shares]) for h in (0, 16))


def _ids(xs: Iterable[str]) -> list[str]:
    return sorted(set(xs))


def neighbours(ids: Iterable[str], degree: int, seed: bytes) -> dict[str, list[str]]:
    """SecAgg+'s graph: ``ids`` on a ring in an order drawn from ``seed``, each linked to its
    ``degree`` nearest (``degree // 2`` each side, one more after it when ``degree`` is odd);
    everyone when ``degree >= n - 1``.  Symmetric; a device is not its own neighbour."""
    order = _ids(ids)
    n = len(order)
    if degree >= n - 1:
        return {u: [v for v in order if v != u] for u in order}
    random.Random(hashlib.sha256(seed).digest()).shuffle(order)
    out: dict[str, set[str]] = {u: set() for u in order}
    half = degree // 2
    for i, u in enumerate(order):
        for d in range(1, half + 1 + degree % 2):
            v = order[(i + d) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: sorted(vs) for u, vs in out.items()}


# ------------------------------------------------------------------------------ a device

class DeviceSecAgg:
    """A device's half of one round.  ``context`` binds everything to one run and round (the run's
    nonce and the round number); ``me`` is this device's id."""

    def __init__(self, me: str, context: bytes):
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self.me = me
        self.context = context
        self._c = X25519PrivateKey.generate()
        self._s = X25519PrivateKey.generate()
        self._b = secrets.token_bytes(_SEED_BYTES)
        self.params: Params | None = None
        self.roster: dict[str, dict[str, bytes]] = {}   # neighbour -> its public keys
        self.held: dict[str, tuple[int, bytes, bytes]] = {}  # neighbour -> (index, its s share, its b share)
        self.answered: tuple[list[str], list[str]] | None = None

    def keys(self) -> dict:
        """Stage 1: the public keys to advertise."""
        return {"c": _b64(self._c.public_key().public_bytes_raw()), "s": _b64(self._s.public_key().public_bytes_raw())}

    def share(self, roster: Mapping[str, Mapping[str, str]], params: Mapping | Params) -> dict[str, str]:
        """Stage 2: from the neighbours' public keys (``{id: {"c", "s"}}``) and the round's
        parameters, this device's encrypted shares, one per neighbour (``{id: base64}``)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        p = params if isinstance(params, Params) else Params.from_json(params)
        if self.me in roster:
            raise SecAggError(f"secure aggregation: the roster names this device ({self.me}) as its own neighbour")
        if len(roster) < p.threshold:
            raise SecAggError(f"secure aggregation: {len(roster)} neighbours cannot hold a secret of threshold "
                              f"{p.threshold}")
        self.params = p
        self.roster = {v: {"c": _unb64(k["c"], f"{v}'s key"), "s": _unb64(k["s"], f"{v}'s key")}
                       for v, k in roster.items()}
        peers = _ids(self.roster)
        s_shares = _split(self._s.private_bytes_raw(), p.threshold, len(peers) + 1)
        b_shares = _split(self._b, p.threshold, len(peers) + 1)
        # share 1 is this device's own (never sent: a device does not answer for itself)
        out = {}
        for v, (i, s_sh), (_, b_sh) in zip(peers, s_shares[1:], b_shares[1:]):
            body = json.dumps({"from": self.me, "to": v, "index": i, "s": _b64(s_sh), "b": _b64(b_sh)}).encode()
            nonce = secrets.token_bytes(12)
            key = _share_key(self._c, self.roster[v]["c"], self.context)
            out[v] = _b64(nonce + AESGCM(key).encrypt(nonce, body, self._aad(self.me, v)))
        return out

    def _aad(self, sender: str, recipient: str) -> bytes:
        return b"fedlora secagg share\0" + self.context + b"\0" + sender.encode() + b"\0" + recipient.encode()

    def receive(self, ciphertexts: Mapping[str, str]) -> list[str]:
        """Stage 2's answer: the shares the neighbours sent this device (``{sender: base64}``),
        decrypted and kept.  Returns the neighbours whose shares it holds (its part of ``U2``); a
        share that is not from a neighbour, does not decrypt or names another pair is refused."""
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        for u, ct in ciphertexts.items():
            if u not in self.roster:
                raise SecAggError(f"secure aggregation: a share from {u}, who is not a neighbour of {self.me}")
            raw = _unb64(ct, f"{u}'s share")
            key = _share_key(self._c, self.roster[u]["c"], self.context)
            try:
                body = json.loads(AESGCM(key).decrypt(raw[:12], raw[12:], self._aad(u, self.me)))
            except (InvalidTag, ValueError) as exc:
                raise SecAggError(f"secure aggregation: {u}'s share to {self.me} does not decrypt "
                                  f"({type(exc).__name__})") from None
            if body.get("from") != u or body.get("to") != self.me:
                raise SecAggError(f"secure aggregation: {u}'s share names another pair")
            self.held[u] = (int(body["index"]), _unb64(body["s"], "a share"), _unb64(body["b"], "a share"))
        return _ids(self.held)

    def mask(self, words: np.ndarray) -> np.ndarray:
        """Stage 3: the encoded vector (:func:`encode`) plus the self mask and the pairwise masks
        with every neighbour whose shares this device holds, modulo 2^32."""
        if self.params is None:
            raise SecAggError("secure aggregation: masking before the shares were exchanged")
        n = int(words.size)
        out = words.astype(np.uint32).copy()
        out += prg(self._b, n)
        for v in _ids(self.held):
            m = prg(_pair_seed(self._s, self.roster[v]["s"], self.context, self.me, v), n)
            if self.me < v:
                out += m
            else:
                out -= m
        return out

    def unmask(self, survivors: Iterable[str], dropped: Iterable[str]) -> dict:
        """Stage 4: for each neighbour it holds shares of, the share of ``b`` of a survivor or of
        ``s`` of a dropped one.  Refuses (SecAggError) a request that names a peer in both sets,
        or one that differs from a request it already answered."""
        alive, gone = _ids(survivors), _ids(dropped)
        both = set(alive) & set(gone)
        if both:
            raise SecAggError(f"secure aggregation: refusing to unmask: {sorted(both)} named both survived and "
                              "dropped (revealing both shares of one device would reveal its update)")
        if self.answered is not None and self.answered != (alive, gone):
            raise SecAggError("secure aggregation: refusing to unmask twice with different survivors")
        if self.me in gone:
            raise SecAggError(f"secure aggregation: {self.me} is alive and was named dropped")
        self.answered = (alive, gone)
        out: dict = {"b": {}, "s": {}}
        for v, (i, s_sh, b_sh) in self.held.items():
            if v in alive:
                out["b"][v] = [i, _b64(b_sh)]
            elif v in gone:
                out["s"][v] = [i, _b64(s_sh)]
        return out


# ------------------------------------------------------------------------------ the coordinator

class ServerSecAgg:
    """The coordinator's half of one round over the devices ``assigned``.  Feed each stage's
    messages as they come (``keys``, ``shares``, ``masked``, ``unmasking``) and move on when the
    transport's stage is over (everyone answered, or the deadline); :meth:`result` gives the sum of
    the survivors' encoded vectors and who they are.  It never holds a device's vector unmasked."""

    def __init__(self, assigned: Iterable[str], context: bytes, params: Params, length: int):
        self.assigned = _ids(assigned)
        self.context = context
        self.params = params
        self.length = length
        self.public: dict[str, dict[str, str]] = {}          # U1: id -> {"c", "s"} (base64)
        self.graph: dict[str, list[str]] = {}
        self.mailbox: dict[str, dict[str, str]] = {}         # recipient -> {sender: ciphertext}
        self.shared: set[str] = set()                        # U2
        self.total = np.zeros(length, dtype=np.uint32)       # the running sum of masked vectors
        self.sent: set[str] = set()                          # U3
        self.responses: dict[str, dict] = {}
        self.closed = False

    # stage 1
    def keys(self, device: str, keys: Mapping) -> None:
        self._member(device)
        if self.graph:
            raise SecAggError(f"secure aggregation: {device}'s keys came after the roster was sent")
        try:
            for k in ("c", "s"):
                _x25519_public(_unb64(keys[k], f"{device}'s key"))
        except (KeyError, TypeError) as exc:
            raise SecAggError(f"secure aggregation: {device}'s keys are malformed ({exc})") from None
        self.public[device] = {"c": keys["c"], "s": keys["s"]}

    def rosters(self) -> dict[str, dict]:
        """End of stage 1: for each device of ``U1``, its neighbours' public keys."""
        if len(self.public) < self.params.threshold:
            raise SecAggError(f"secure aggregation: {len(self.public)} devices sent keys; the threshold is "
                              f"{self.params.threshold}")
        graph = neighbours(self.public, self.params.degree, self.context)
        few = min((len(vs) for vs in graph.values()), default=0)
        if few < self.params.threshold:
            raise SecAggError(f"secure aggregation: {len(self.public)} devices sent keys, so a device has {few} "
                              f"neighbours, fewer than the threshold {self.params.threshold} (a round needs at least 3 "
                              "devices)")
        self.graph = graph
        return {u: {v: self.public[v] for v in vs} for u, vs in self.graph.items()}

    # stage 2
    def shares(self, device: str, ciphertexts: Mapping[str, str]) -> None:
        self._member(device)
        if device not in self.graph:
            raise SecAggError(f"secure aggregation: {device} sent shares without being on the roster")
        if set(ciphertexts) != set(self.graph[device]):
            raise SecAggError(f"secure aggregation: {device} sent shares for {sorted(ciphertexts)[:5]}, not for "
                              "exactly its neighbours")
        if device in self.shared or self.sent:
            raise SecAggError(f"secure aggregation: {device}'s shares came twice or too late")
        for v, ct in ciphertexts.items():
            self.mailbox.setdefault(v, {})[device] = ct
        self.shared.add(device)

    def relay(self) -> dict[str, dict[str, str]]:
        """End of stage 2: each device of ``U2``'s inbox (the ciphertexts its neighbours in ``U2``
        sent it)."""
        return {v: {u: ct for u, ct in self.mailbox.get(v, {}).items() if u in self.shared}
                for v in sorted(self.shared)}

    # stage 3
    def masked(self, device: str, vector: np.ndarray) -> None:
        self._member(device)
        if device not in self.shared:
            raise SecAggError(f"secure aggregation: {device} sent a masked vector without having shared its keys")
        if device in self.sent:
            raise SecAggError(f"secure aggregation: {device}'s masked vector came twice")
        v = np.asarray(vector)
        if v.dtype != np.uint32 or v.shape != (self.length,):
            raise SecAggError(f"secure aggregation: {device}'s masked vector is {v.dtype} {v.shape}, not uint32 "
                              f"({self.length},)")
        self.total += v
        self.sent.add(device)

    def request(self) -> tuple[list[str], list[str]]:
        """End of stage 3: (survivors ``U3``, dropped ``U2 \\ U3``), which every survivor is asked."""
        return sorted(self.sent), sorted(self.shared - self.sent)

    # stage 4
    def unmasking(self, device: str, response: Mapping) -> None:
        self._member(device)
        if device not in self.sent:
            raise SecAggError(f"secure aggregation: {device} answered the unmasking without a masked vector")
        self.responses[device] = {"b": dict(response.get("b", {})), "s": dict(response.get("s", {}))}

    def result(self) -> tuple[np.ndarray, list[str]]:
        """The sum of the survivors' encoded vectors (uint32) and the survivors.  SecAggError when a
        secret it needs has fewer than ``threshold`` shares."""
        survivors, dropped = self.request()
        t = self.params.threshold
        total = self.total.copy()

        def gathered(kind: str, owner: str) -> bytes:
            got = []
            for u, resp in self.responses.items():
                share = resp[kind].get(owner)
                if share is not None and owner in self.graph.get(u, []):
                    got.append((int(share[0]), _unb64(share[1], "a share")))
            if len(got) < t:
                raise SecAggError(f"secure aggregation: {len(got)} shares of {owner}'s "
                                  f"{'self mask' if kind == 'b' else 'mask key'} came back; {t} are needed to "
                                  "unmask the round")
            return _combine(sorted(got)[:t])

        for u in survivors:
            total -= prg(gathered("b", u), self.length)
        for v in dropped:
            s_v = _x25519_private(gathered("s", v))
            for u in self.graph.get(v, []):
                if u not in self.sent:
                    continue
                m = prg(_pair_seed(s_v, _unb64(self.public[u]["s"], "a key"), self.context, u, v), self.length)
                if u < v:  # u added +m
                    total -= m
                else:
                    total += m
        self.closed = True
        return total, survivors

    def _member(self, device: str) -> None:
        if device not in self.assigned:
            raise SecAggError(f"secure aggregation: {device} is not one of this round's devices")
        if self.closed:
            raise SecAggError("secure aggregation: the round is already unmasked")


def run_round(devices: Mapping[str, np.ndarray | Callable[[], np.ndarray]], context: bytes, params: Params,
              drop_before_masking: Iterable[str] = (), drop_after_masking: Iterable[str] = (),
              length: int | None = None) -> tuple[np.ndarray, list[str], dict]:
    """The whole protocol in one process, over real key agreement, shares and masks (``simulate``,
    tests and ``bench/secagg.py``): ``devices`` maps each id to its encoded vector (uint32), or to a
    callable that gives it when the device's turn to mask comes (``simulate`` trains there, after
    the keys are shared, as a device would; ``length`` then says the vectors' size; a callable that
    gives None is a device that vanished while it trained).  Devices in
    ``drop_before_masking`` vanish after sharing their keys (their pairwise masks are removed from
    their neighbours' shares of their ``s`` key); those in ``drop_after_masking`` after their masked
    vector (their self mask is removed from the survivors' shares of their ``b``).  Returns (the
    sum's words, the survivors, what each stage carried: ``bytes`` per stage, as JSON or raw
    words, and ``seconds``: every device's work added up, and the coordinator's)."""
    import time

    ids = _ids(devices)
    if length is None:
        first = next(iter(devices.values()), None)
        length = int(first.size) if isinstance(first, np.ndarray) else 0
    clock = {"devices": 0.0, "coordinator": 0.0}

    def timed(side: str, f, *args):
        t = time.perf_counter()
        out = f(*args)
        clock[side] += time.perf_counter() - t
        return out

    server = ServerSecAgg(ids, context, params, length)
    agents = {u: timed("devices", DeviceSecAgg, u, context) for u in ids}
    sizes = {"keys": 0, "roster": 0, "shares": 0, "relay": 0, "masked": 0, "request": 0, "unmasking": 0}
    for u, a in agents.items():
        k = timed("devices", a.keys)
        sizes["keys"] += len(json.dumps(k))
        timed("coordinator", server.keys, u, k)
    rosters = timed("coordinator", server.rosters)
    for u, roster in rosters.items():
        sizes["roster"] += len(json.dumps(roster))
        cts = timed("devices", agents[u].share, roster, params)
        sizes["shares"] += len(json.dumps(cts))
        timed("coordinator", server.shares, u, cts)
    for v, inbox in timed("coordinator", server.relay).items():
        sizes["relay"] += len(json.dumps(inbox))
        timed("devices", agents[v].receive, inbox)
    before, after = set(drop_before_masking), set(drop_after_masking)
    for u in ids:
        if u not in server.shared:
            continue
        vector = devices[u]
        if callable(vector):
            vector = vector()
        if u in before or vector is None:  # it vanished while it trained
            continue
        masked = timed("devices", agents[u].mask, vector)
        sizes["masked"] += masked.nbytes
        timed("coordinator", server.masked, u, masked)
    survivors, dropped = server.request()
    for u in survivors:
        if u in after:
            continue
        sizes["request"] += len(json.dumps([survivors, dropped]))
        resp = timed("devices", agents[u].unmask, survivors, dropped)
        sizes["unmasking"] += len(json.dumps(resp))
        timed("coordinator", server.unmasking, u, resp)
    total, survivors = timed("coordinator", server.result)
    return total, survivors, {"bytes": sizes, "seconds": clock}
