"""Compressed tensor payloads: fp16, and int8 or int4 in blocks with scales (``transport.compression``).

A compressed payload is still a safetensors blob (never pickle), whose string metadata carries
``fedlora.encoding``, a JSON object: ``{"codec", "block", "delta", "shapes"}`` (``delta`` false when
absent; ``shapes`` int4's only).  Its *keys* are its tensors of the codec's dtype (float16, int8 or
uint8), taken in sorted name order; a float32 tensor in it is plain, as in an uncompressed payload,
and never a change (HAFL's importance scores go so); names starting ``::`` are the scales below.
docs/protocol.md, "Compressed payloads", is the normative text.

- ``fp16``: each key holds its values as float16, in its own shape.
- ``int8``: each key holds int8 codes in its own shape; ``int4``: uint8, two codes a byte (the
  value at an even flat index in the low nibble, the next in the high one, each code stored as
  ``code + 8``; an odd count ends with the nibble 8), flat, its shape in ``shapes``.  A key's
  ``n`` values are taken flat (row-major) in ``ceil(n / block)`` blocks (the last may be short);
  block ``j`` of key ``k`` decodes as ``code * (tensor_scale[k] * block_scale[j])`` in float32,
  where ``::tensor_scales`` (float32, one per key) is the key's largest block scale and
  ``::block_scales`` (float16, every key's blocks one after another, in key order) each block's
  scale relative to it, rounded up to float16 (so no code passes the level).  A block's scale is
  its largest magnitude over 127 (int8) or 7 (int4): symmetric codes in ``[-127, 127]`` or
  ``[-7, 7]``.  Storing the block scales relative to a float32 per-tensor scale keeps them in
  float16's range however small the tensor's values (a LoRA factor's change after a few steps is
  often below float16's smallest normal number).
- ``delta`` true: every key that the receiver's reference holds under the same name and shape is
  the change from it: the decoded value is ``reference[k] + decoded``.  An update's reference is its
  plan's start cut to the plan's components (:func:`fedlora_edge.edge_client.partial.update_reference`):
  the device measures its change from the start as it decoded it, the coordinator adds it to the
  exact start it encoded, so the plan's rounding never eats the run's progress.  A change is a few
  percent of the factors it changes, and so is its quantization error.

Rounding is to nearest, or stochastic (``floor(x / scale + u)``, ``u`` uniform in ``[0, 1)``, from
the assignment's seed): unbiased, so that errors average out over many devices.  Error feedback
(int4 on the device): what quantization lost in one round is added to the next round's change
before it is quantized, while the plan's components stay the same.

:func:`decode` checks before it decodes: the blob's size against the limit, the metadata, the
plan's codec and block, every key's dtype, int4's byte count against its shape, every encoded
key against the tensors the plan allows (so decoding makes no more values than the plan's
update holds), the scales' count and finiteness; then that the values are finite.  Whatever is
wrong is a PayloadError.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping

import torch

from .wire import PayloadError, decode_tensors, encode_tensors

CODECS = ("none", "fp16", "int8", "int4")  # least lossy first
DEFAULT_BLOCK = 64
META_KEY = "fedlora.encoding"
TENSOR_SCALES = "::tensor_scales"
BLOCK_SCALES = "::block_scales"
_LEVELS = {"int8": 127, "int4": 7}
_MAX_BLOCK = 4096
_MAX_DIM = 2**31
FP16_MAX = 65504.0


def value_bytes(codec: str, block: int = DEFAULT_BLOCK) -> float:
    """Bytes per value on the wire under ``codec`` (the block scales included, the header not)."""
    return {"none": 4.0, "fp16": 2.0, "int8": 1 + 2 / block, "int4": 0.5 + 2 / block}[codec]


def check_codec(codec: str, block: int = DEFAULT_BLOCK) -> None:
    if codec not in CODECS:
        raise ValueError(f"compression {codec!r}: use one of {', '.join(CODECS)}")
    if not (2 <= block <= _MAX_BLOCK and block % 2 == 0):
        raise ValueError(f"compression block {block}: use an even number of values from 2 to {_MAX_BLOCK}")


def encode(tensors: Mapping[str, torch.Tensor], codec: str = "none", *, block: int = DEFAULT_BLOCK,
           reference: Mapping[str, torch.Tensor] | None = None, stochastic: bool = False,
           generator: torch.Generator | None = None, feedback: dict | None = None,
           plain: Callable[[str], bool] | None = None) -> bytes:
    """``tensors`` as a payload under ``codec`` (see the module text).  ``reference``: what the receiver
    holds (an update's start), sent as the change from it where a key has the same shape there;
    ``stochastic``: stochastic rounding from ``generator``; ``feedback``: error feedback, a dict the
    caller keeps across rounds (key -> what the last rounding lost), read and updated here;
    ``plain``: names sent as they are, in float32 (never a change)."""
    check_codec(codec, block)
    if codec == "none":
        return encode_tensors(tensors)
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    tensor_scales, block_scales = [], []
    for k in sorted(tensors):
        if k.startswith("::"):
            raise ValueError(f"compression: tensor name {k!r} is reserved for the encoding's scales")
        v = tensors[k].detach().to("cpu")
        if not v.is_floating_point():
            raise ValueError(f"compression: tensor {k!r} is {v.dtype}; only floating-point tensors are encoded")
        v = v.float()
        if plain is not None and plain(k):
            out[k] = v.contiguous()
            continue
        if reference is not None and k in reference and tuple(reference[k].shape) == tuple(v.shape):
            v = v - reference[k].float()
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"compression: tensor {k!r} is not finite")
        if codec == "fp16":
            if v.numel() and float(v.abs().max()) > FP16_MAX:
                raise ValueError(f"compression: tensor {k!r} holds a value beyond float16's range")
            out[k] = v.half().contiguous()
            continue
        if feedback is not None:
            carried = feedback.get(k)
            if carried is not None and tuple(carried.shape) == tuple(v.shape):
                v = v + carried
        codes, t_scale, b_scales, decoded = _quantize(v, codec, block, stochastic, generator)
        if feedback is not None:
            feedback[k] = v - decoded
        tensor_scales.append(t_scale)
        block_scales.append(b_scales)
        if codec == "int8":
            out[k] = codes.to(torch.int8).reshape(v.shape).contiguous()
        else:
            shapes[k] = list(v.shape)
            out[k] = _pack4(codes)
    if codec != "fp16":
        out[TENSOR_SCALES] = torch.tensor(tensor_scales, dtype=torch.float32)
        out[BLOCK_SCALES] = torch.cat(block_scales) if block_scales else torch.zeros(0, dtype=torch.float16)
    meta: dict = {"codec": codec, "block": block, "delta": reference is not None}
    if shapes:
        meta["shapes"] = shapes
    return encode_tensors(out, {META_KEY: json.dumps(meta, separators=(",", ":"))})


def _blocks(v: torch.Tensor, block: int) -> torch.Tensor:
    flat = v.reshape(-1)
    nb = -(-flat.numel() // block)
    return torch.nn.functional.pad(flat, (0, nb * block - flat.numel())).view(nb, block)


def _round_up_half(x: torch.Tensor) -> torch.Tensor:
    """``x`` (non-negative float32) as float16, rounded up: never below ``x``."""
    h = x.half()
    low = h.float() < x
    if bool(low.any()):  # the next float16 up: its bit pattern plus one (non-negative values)
        h = torch.where(low, (h.view(torch.int16) + 1).view(torch.float16), h)
    return h


def _quantize(v: torch.Tensor, codec: str, block: int, stochastic: bool, generator):
    """(codes flat, the tensor's scale, its blocks' relative scales in fp16, the decoded values)."""
    levels = _LEVELS[codec]
    b = _blocks(v, block)
    raw = b.abs().amax(dim=1) / levels if b.numel() else torch.zeros(0)   # each block's scale
    t_scale = float(raw.max()) if raw.numel() else 0.0
    # relative to the tensor's scale, rounded up: no value's code passes the level
    rel = _round_up_half(raw / t_scale) if t_scale > 0 else torch.zeros(raw.shape, dtype=torch.float16)
    scale = (torch.tensor(t_scale, dtype=torch.float32) * rel.float()).unsqueeze(1)  # what the receiver computes
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    x = b / safe
    if stochastic:
        x = torch.floor(x + torch.rand(x.shape, generator=generator))
    else:
        x = torch.round(x)
    codes = torch.where(scale > 0, x.clamp(-levels, levels), torch.zeros_like(x))
    decoded = (codes * scale).reshape(-1)[: v.numel()].view(v.shape)
    return codes.reshape(-1)[: v.numel()], t_scale, rel, decoded


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    n = (codes.to(torch.int16) + 8).to(torch.uint8)
    if n.numel() % 2:
        n = torch.cat([n, torch.tensor([8], dtype=torch.uint8)])
    pairs = n.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def _unpack4(packed: torch.Tensor, count: int) -> torch.Tensor:
    lo = (packed & 0x0F).to(torch.int16) - 8
    hi = (packed >> 4).to(torch.int16) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1)[:count].float()


def metadata(blob: bytes) -> dict:
    """The safetensors header's ``__metadata__`` (string to string), {} if none; PayloadError if the
    header cannot be read."""
    if len(blob) < 8:
        raise PayloadError("payload is not valid safetensors: shorter than its header's length")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > len(blob) - 8:
        raise PayloadError("payload is not valid safetensors: its header runs past the end")
    try:
        header = json.loads(bytes(blob[8:8 + n]))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise PayloadError("payload is not valid safetensors: its header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def codec_of(blob: bytes) -> str:
    """The codec a payload was encoded with ("none" for a plain one)."""
    raw = metadata(blob).get(META_KEY)
    if raw is None:
        return "none"
    try:
        return str(json.loads(raw).get("codec", "?"))
    except (ValueError, AttributeError):
        return "?"


def decode(blob: bytes, max_bytes: int | None = None, reference: Mapping[str, torch.Tensor] | None = None, *,
           codec: str | None = None, block: int | None = None,
           shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """A payload's tensors as float32 (a plain one as it is): see the module text.  ``reference``:
    what a ``delta`` payload's keys are the change from.  What the receiver expects, checked before
    anything is decoded: ``codec`` and ``block`` (an update under its plan's), ``shapes`` (name ->
    shape of every tensor the plan allows; an encoded key outside it, or of another size, is
    refused before its values are made).  PayloadError naming what is wrong, for anything wrong."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise PayloadError(f"payload of {len(blob)} bytes exceeds the limit of {max_bytes} bytes")
    raw = metadata(blob).get(META_KEY)
    if codec not in (None, "none") and raw is None:
        raise PayloadError(f"payload is plain float32; its plan asked for {codec}")
    if raw is not None and codec == "none":
        raise PayloadError("payload is compressed; its plan asked for none")
    tensors = decode_tensors(blob)
    if raw is None:
        if any(k.startswith("::") for k in tensors):
            raise PayloadError(f"payload has {TENSOR_SCALES}/{BLOCK_SCALES} tensors but no {META_KEY} metadata")
        return tensors
    try:
        return _decode(tensors, raw, reference, codec, block, shapes)
    except PayloadError:
        raise
    except (ValueError, TypeError, OverflowError, RuntimeError, RecursionError, KeyError, IndexError) as exc:
        raise PayloadError(f"payload's encoding cannot be decoded: {exc}"[:300]) from None


def _decode(tensors: dict, raw: str, reference, want_codec, want_block, want_shapes) -> dict[str, torch.Tensor]:
    try:
        meta = json.loads(raw)
        codec, block, delta = meta["codec"], meta["block"], meta.get("delta", False)
        shapes = dict(meta.get("shapes", {}))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise PayloadError(f"payload's {META_KEY} is not the JSON object of docs/protocol.md") from None
    if codec not in CODECS[1:] or type(block) is not int or not (2 <= block <= _MAX_BLOCK and block % 2 == 0):
        raise PayloadError(f"payload's encoding {str(codec)[:20]!r} with block {str(block)[:20]!r} is not one this "
                           "coordinator knows")
    if (want_codec is not None and codec != want_codec) or (want_block is not None and block != want_block):
        raise PayloadError(f"payload is {codec} in blocks of {block}; its plan asked for {want_codec} in blocks of "
                           f"{want_block}")
    if not isinstance(delta, bool):
        raise PayloadError(f"payload's encoding has delta {str(delta)[:20]!r}, not true or false")
    extra = [k for k in tensors if k.startswith("::") and (codec == "fp16" or k not in (TENSOR_SCALES, BLOCK_SCALES))]
    if extra:
        raise PayloadError(f"payload holds {extra[0][:80]!r}, which no {codec} encoding has")
    dtype = {"fp16": torch.float16, "int8": torch.int8, "int4": torch.uint8}[codec]
    keys = sorted(k for k, v in tensors.items() if not k.startswith("::") and v.dtype == dtype)
    out = {k: v for k, v in tensors.items() if k not in keys and not k.startswith("::")}
    for k, v in out.items():
        if v.dtype != torch.float32:
            raise PayloadError(f"payload's {k[:80]!r} is {v.dtype}: under {codec} a tensor is {dtype} or plain float32")
    stray = [k for k in shapes if k not in keys]
    if stray:
        raise PayloadError(f"payload's encoding gives a shape for {stray[0][:80]!r}, which it does not hold as codes")
    sizes: dict[str, tuple[int, ...]] = {}
    for k in keys:
        v = tensors[k]
        if codec != "int4":
            sizes[k] = tuple(v.shape)
            continue
        shape = shapes.get(k)
        if v.dim() != 1 or not isinstance(shape, list) or len(shape) > 8 or \
                not all(type(d) is int and 0 <= d < _MAX_DIM for d in shape):
            raise PayloadError(f"payload's {k[:80]!r} is not packed int4 codes with a shape as its encoding says")
        n = math.prod(shape)
        if (n + 1) // 2 != v.numel():
            raise PayloadError(f"payload's {k[:80]!r} holds {v.numel()} bytes of codes for shape {shape}")
        sizes[k] = tuple(shape)
    if want_shapes is not None:
        for k, shape in sizes.items():
            if k not in want_shapes or tuple(want_shapes[k]) != shape:
                raise PayloadError(f"payload's {k[:80]!r} of shape {list(shape)} is not a tensor its plan asked for"
                                   + (f" (shape {list(want_shapes[k])})" if k in want_shapes else ""))
    if codec == "fp16":
        for k in keys:
            out[k] = tensors[k].float()
    else:
        t_scales, b_scales = tensors.get(TENSOR_SCALES), tensors.get(BLOCK_SCALES)
        if t_scales is None or b_scales is None or t_scales.dtype != torch.float32 or \
                b_scales.dtype != torch.float16 or t_scales.dim() != 1 or b_scales.dim() != 1:
            raise PayloadError(f"payload under {codec} needs {TENSOR_SCALES} (float32) and {BLOCK_SCALES} (float16), "
                               "each one-dimensional")
        if t_scales.numel() != len(keys):
            raise PayloadError(f"payload has {t_scales.numel()} tensor scales for {len(keys)} keys")
        counts = [math.prod(sizes[k]) for k in keys]
        blocks = [-(-n // block) for n in counts]
        if b_scales.numel() != sum(blocks):
            raise PayloadError(f"payload has {b_scales.numel()} block scales; its keys have {sum(blocks)} blocks")
        if not bool(torch.isfinite(t_scales).all()) or not bool(torch.isfinite(b_scales).all()) or \
                bool((t_scales < 0).any()) or bool((b_scales < 0).any()):
            raise PayloadError("payload's scales are not all finite and non-negative")
        at = 0
        for i, (k, n, nb) in enumerate(zip(keys, counts, blocks)):
            scale = t_scales[i] * b_scales[at:at + nb].float()
            at += nb
            codes = tensors[k].reshape(-1).float() if codec == "int8" else _unpack4(tensors[k], n)
            out[k] = (codes * scale.repeat_interleave(block)[:n]).view(sizes[k])
    for k in keys:
        if not bool(torch.isfinite(out[k]).all()):
            raise PayloadError(f"payload's {k[:80]!r} decodes to values that are not finite")
    if delta and reference is None:
        raise PayloadError("payload holds changes from the start its plan sent, and no start was given to add them to")
    if delta:
        assert reference is not None
        for k in keys:
            ref = reference.get(k)
            if ref is not None and tuple(ref.shape) == tuple(out[k].shape):
                out[k] = ref.float() + out[k]
    return out
