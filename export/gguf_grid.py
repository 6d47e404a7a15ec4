"""A GGUF base's own quantization grid, carried into the ONNX int4 and int8 bases instead of a second one.

A base that comes from a GGUF file (the built-in SmolLM2 is ``Q4_1``: every decoder projection in
4-bit blocks of 32, the tied embedding/head in ``Q8_0``) is already quantized: the float weights
the model loads are exactly ``d * q + m`` per block.  Quantizing those floats again for an int4
export (onnxruntime's RTN or k-quant, on a grid of its own) stacks a second rounding on the first,
which is where int4 exports of such a base lose agreement.  The file's own codes fit onnxruntime's
``MatMulNBits`` without loss, block for block:

- ``Q4_0`` (``d * (q - 8)``): 4-bit codes ``q``, scale ``d``, zero point 8;
- ``Q4_1`` (``d * q + m``): 4-bit codes ``q``, scale ``d``, the block's zero point
  ``z = round(-m / d)`` (so that the codes are centred, as the kernel's int8 activations want:
  their error scales with ``d·(q - z)``), and what is left of the offset, ``r = m + d·z``
  (``|r| <= d/2``), added back by a small exact term: the input summed over each block of 32
  times ``r`` (``x · W_blockᵀ = d·((q - z) · x_b) + r·Σx_b``), a matmul 1/32 the size of the
  projection's, the block sums shared by the projections that read one input;
- ``Q8_0`` (``d * q``, ``q`` signed): 8-bit codes ``q + 128``, scale ``d``, zero point 128: the
  head (``output.weight``, or ``token_embd.weight`` when the head is tied to the embedding, as in
  SmolLM2; then the embedding's ``GatherBlockQuantized`` reads the same tensors).

A tensor is carried only where its dequantized values equal the loaded model's weights bit for
bit (rows matched by content: the GGUF converter permutes the rows of q and k for its rotary
layout); any other tensor (a K-quant, a type not listed, a mismatch) keeps the builder's own
quantization, and the export reports it.  The adapter stays apart in fp32, so an int4 base built
this way loses nothing on the weights: what is left is the int8 activations inside the kernel.

The builder fuses a layer's q, k and v into one matmul (``model.layers.N.attn.qkv_proj.MatMul``):
:func:`fuse_qkv` concatenates their grids along the output dimension, q|k|v, scales, zero points
and offsets alike, so the fused matmul holds the same codes and the same offset term.

On a base whose every decoder projection has a 4-bit grid (:func:`decoder_on_4bit`), an int8 export
builds the int4 graph (export/onnx_genai.py ``build_base``): an 8-bit matmul holds no more than those
4-bit codes, and its kernel measured slower and noisier.  Elsewhere an int8 base (symmetric
``MatMulNBits``, 8-bit codes with the implied zero point 128) carries the grids it can: a 4-bit
block's codes, shifted by 128 minus its zero point (:func:`as_int8`), with the same scale and offset
term, the file's weights exactly, as int4 has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import numpy as np

BLOCK = 32
# GGUF tensor name -> the ONNX builder's initializer prefix (llama-family decoders; transformers
# names the same projection with ``self_attn.`` for ``attn.``)
_NAMES = {"attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj", "attn_output": "attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


@dataclass
class Grid:
    """One weight ``[N, K]`` on its file's grid: ``codes`` (unsigned, ``[N, K]``), ``scale``,
    ``zero`` and ``offset`` (``[N, K/32]``): value = ``scale * (codes - zero) + offset``."""
    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None
    zero: np.ndarray
    bits: int


def _blocks(raw: np.ndarray, n_blocks: int, size: int) -> np.ndarray:
    return np.asarray(raw, dtype=np.uint8).reshape(n_blocks, size)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[:, 0]


def decode(tensor) -> Grid | None:
    """The grid of a ``gguf.GGUFReader`` tensor of a supported type (None for any other)."""
    kind = tensor.tensor_type.name
    if len(tensor.shape) != 2 or int(tensor.shape[0]) % BLOCK:
        return None
    k, n = (int(x) for x in tensor.shape)
    nb = n * k // BLOCK
    if kind == "Q4_0":  # d f16, 16 bytes: element j low nibble, j+16 high nibble
        raw = _blocks(tensor.data, nb, 18)
        d, qs = _f16(raw[:, 0:2]), raw[:, 2:]
        q, offset, zero = np.concatenate([qs & 0xF, qs >> 4], axis=1), None, 8
    elif kind == "Q4_1":  # d f16, m f16, 16 bytes
        raw = _blocks(tensor.data, nb, 20)
        d, m, qs = _f16(raw[:, 0:2]), _f16(raw[:, 2:4]), raw[:, 4:]
        q, offset, zero = np.concatenate([qs & 0xF, qs >> 4], axis=1), m.reshape(n, k // BLOCK), 0
    elif kind == "Q8_0":  # d f16, 32 signed bytes
        raw = _blocks(tensor.data, nb, 34)
        d = _f16(raw[:, 0:2])
        q, offset, zero = (raw[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), None, 128
    else:
        return None
    nb_row = k // BLOCK
    return Grid(q.reshape(n, k).astype(np.uint8), d.reshape(n, nb_row), offset,
                np.full((n, nb_row), zero, dtype=np.uint8), 4 if kind != "Q8_0" else 8)


def centred(g: Grid) -> Grid:
    """``g`` with each block's offset moved into an integer zero point where it can be: the same
    values (to fp32 rounding), codes centred on zero."""
    if g.offset is None:
        return g
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(g.scale != 0, np.rint(-g.offset / g.scale), 0.0)
    z = np.clip(z, 0, 2 ** g.bits - 1)
    return Grid(g.codes, g.scale, (g.offset + g.scale * z).astype(np.float32), g.zero + z.astype(np.uint8), g.bits)


def as_int8(g: Grid) -> Grid:
    """``g`` as 8-bit codes with zero point 128 (what a symmetric int8 ``MatMulNBits`` implies when it
    has no zero-point input): the same values, every code shifted by ``128 - zero``."""
    if g.bits == 8 and bool((g.zero == 128).all()):
        return g
    n, k = g.codes.shape
    shift = 128 - np.repeat(g.zero.astype(np.int16), BLOCK, axis=1)
    codes = g.codes.astype(np.int16) + shift
    assert codes.min() >= 0 and codes.max() <= 255, "a 4-bit grid always fits 8 bits"
    return Grid(codes.astype(np.uint8), g.scale, g.offset, np.full_like(g.zero, 128), 8)


def fuse_qkv(grids: dict[str, Grid]) -> dict[str, Grid]:
    """``grids`` and, for each layer whose q, k and v all have grids of one bit width, their
    concatenation along the output dimension (q|k|v, the builder's fused ``qkv_proj``); a projection
    without an offset term contributes zeros to the fused one's."""
    out = dict(grids)
    layers = {m[1] for name in grids if (m := re.match(r"^model\.layers\.(\d+)\.attn\.q_proj\.MatMul$", name))}
    for layer in sorted(layers, key=int):
        parts = [grids.get(f"model.layers.{layer}.attn.{p}_proj.MatMul") for p in "qkv"]
        gs = [g for g in parts if g is not None]
        if len(gs) != 3 or len({g.bits for g in gs}) != 1:
            continue
        offset = None
        if any(g.offset is not None for g in gs):
            offset = np.concatenate([g.offset if g.offset is not None else np.zeros_like(g.scale) for g in gs], 0)
        out[f"model.layers.{layer}.attn.qkv_proj.MatMul"] = Grid(
            np.concatenate([g.codes for g in gs], 0), np.concatenate([g.scale for g in gs], 0), offset,
            np.concatenate([g.zero for g in gs], 0), gs[0].bits)
    return out


def decoder_on_4bit(grids: dict[str, Grid], state_dict: dict) -> bool:
    """Whether every decoder projection of the model (``state_dict``'s ``layers.N.self_attn|mlp.*_proj``
    weights of the kinds :data:`_NAMES` knows) has a 4-bit grid in ``grids``."""
    projections = set(_NAMES.values())
    found = 0
    for name in state_dict:
        m = re.match(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$", name)
        if m is None:
            continue
        proj = f"{'attn' if m[2] == 'self_attn' else 'mlp'}.{m[3]}"
        if proj not in projections:
            continue
        g = grids.get(f"model.layers.{m[1]}.{proj}.MatMul")
        if g is None or g.bits != 4:
            return False
        found += 1
    return found > 0


def dequantize(g: Grid) -> np.ndarray:
    n, k = g.codes.shape
    q = g.codes.reshape(n, k // BLOCK, BLOCK).astype(np.float32) - g.zero[:, :, None]
    w = g.scale[:, :, None] * q
    if g.offset is not None:
        w = w + g.offset[:, :, None]
    return w.reshape(n, k)


def _match_rows(grid: Grid, weight: np.ndarray) -> Grid | None:
    """``grid`` with its rows in ``weight``'s order, if every row of ``weight`` is one of its rows."""
    w = dequantize(grid)
    if w.shape != weight.shape:
        return None
    if np.array_equal(w, weight):
        return grid
    index = {row.tobytes(): i for i, row in enumerate(w)}
    order: list[int] = []
    for row in np.ascontiguousarray(weight, dtype=np.float32):
        i = index.get(row.tobytes())
        if i is None:
            return None
        order.append(i)
    return Grid(grid.codes[order], grid.scale[order], None if grid.offset is None else grid.offset[order],
                grid.zero[order], grid.bits)


def read_grids(gguf_path: Path, state_dict: dict) -> dict[str, Grid]:
    """``{ONNX initializer prefix: Grid}`` for the GGUF's tensors that reproduce ``state_dict``
    (the loaded model's float weights) exactly, zero points centred (:func:`centred`); the others
    are left to the builder's own quantization."""
    from gguf import GGUFReader

    grids = {}
    tensors = GGUFReader(str(gguf_path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)  # the head is the embedding's tensor
    for t in tensors:
        if t.name == "output.weight":
            onnx_name, hf = "lm_head.MatMul", "lm_head.weight"
        elif t.name == "token_embd.weight" and tied:
            onnx_name, hf = "lm_head.MatMul", "model.embed_tokens.weight"
        elif (m := _BLK.match(t.name)) and m[2] in _NAMES:
            proj = _NAMES[m[2]]
            hf_proj = "self_" + proj if proj.startswith("attn.") else proj
            onnx_name, hf = f"model.layers.{m[1]}.{proj}.MatMul", f"model.layers.{m[1]}.{hf_proj}.weight"
        else:
            continue
        g = decode(t)
        weight = state_dict.get(hf)
        g = None if g is None or weight is None else _match_rows(g, weight.detach().float().numpy())
        if g is not None:
            grids[onnx_name] = centred(g)
    return grids


def _pack4(codes: np.ndarray) -> np.ndarray:
    """``[N, K]`` 4-bit codes -> ``MatMulNBits``' ``[N, K/32, 16]`` (element 2j low nibble, 2j+1 high)."""
    n, k = codes.shape
    c = codes.reshape(n, k // BLOCK, BLOCK // 2, 2)
    return (c[..., 0] | (c[..., 1] << 4)).astype(np.uint8)


def _fits(grid: Grid | None, attrs: dict, implied: bool) -> TypeGuard[Grid]:
    """Whether ``grid`` can replace the codes of a ``MatMulNBits`` node with attributes ``attrs``
    (``implied``: the node has no zero-point input)."""
    return not (grid is None or attrs.get("bits") != grid.bits or attrs.get("block_size") != BLOCK
                or (attrs.get("N"), attrs.get("K")) != grid.codes.shape
                or (implied and not (grid.bits == 8 and bool((grid.zero == 128).all()))))


def apply_grids(model_path: Path, grids: dict[str, Grid]) -> tuple[list[str], list[str]]:
    """Put ``grids`` into the built base's ``MatMulNBits`` initializers in place (graph and
    external data), adding the offset term where a grid has one; returns the initializer
    prefixes carried and those of every other quantized matmul (left as the builder quantized
    them: no grid for it, no zero-point input (8-bit codes carry one of 128 without it: :func:`as_int8`),
    or another bit width or block size)."""
    import onnx
    from onnx import helper, numpy_helper

    from .onnx_edit import insert_after

    m = onnx.load(str(model_path))
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    carried, other, after = [], [], {}
    sums: dict[str, str] = {}  # input -> its block sums: q/k/v and gate/up share theirs

    def put(name: str, array: np.ndarray) -> None:
        old = inits[name]
        new = numpy_helper.from_array(np.ascontiguousarray(array).reshape(tuple(old.dims)).astype(
            helper.tensor_dtype_to_np_dtype(old.data_type)), name)
        old.CopyFrom(new)

    for i, node in enumerate(g.node):
        if node.op_type != "MatMulNBits":
            continue
        prefix = node.input[1].rsplit(".weight_", 1)[0]
        grid = grids.get(prefix)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        implied = len(node.input) < 4  # no zero-point input: 2^(bits-1), the symmetric int8 build's
        if not _fits(grid, attrs, implied):
            other.append(prefix)
            continue
        n, k = grid.codes.shape
        put(node.input[1], _pack4(grid.codes) if grid.bits == 4 else grid.codes.reshape(n, k // BLOCK, BLOCK))
        put(node.input[2], grid.scale)
        nb = k // BLOCK
        if grid.bits == 4:  # two per byte, the even block in the low nibble
            z = np.zeros((n, nb + nb % 2), dtype=np.uint8)
            z[:, :nb] = grid.zero
            zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)
        else:
            zp = grid.zero
        if not implied:
            put(node.input[3], zp)
        carried.append(prefix)
        if grid.offset is None:
            continue
        # y += (x summed over each block of 32) · offsetᵀ; the sums are x · S, S the [K, K/32]
        # block indicator (one per K, shared), whatever x's rank
        base = node.name.rsplit("/", 1)[0]
        out = node.output[0]
        node.output[0] = f"{out}/grid"
        off = f"{prefix}.grid_offset"
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(grid.offset.T, dtype=np.float32), off))
        new = []
        summed = sums.get(node.input[0])
        if summed is None:
            summed = sums[node.input[0]] = f"{base}/grid/BlockSum/output_0"
            indicator = f"grid.block_sum.{k}"
            if indicator not in inits:
                inits[indicator] = numpy_helper.from_array(
                    np.kron(np.eye(nb, dtype=np.float32), np.ones((BLOCK, 1), dtype=np.float32)), indicator)
                g.initializer.append(inits[indicator])
            new.append(helper.make_node("MatMul", [node.input[0], indicator], [summed], name=f"{base}/grid/BlockSum"))
        new += [helper.make_node("MatMul", [summed, off], [f"{base}/grid/MatMul/output_0"], name=f"{base}/grid/MatMul"),
                helper.make_node("Add", [node.output[0], f"{base}/grid/MatMul/output_0"], [out], name=f"{base}/grid/Add")]
        after[i] = new
    insert_after(g, after)
    data = model_path.name + ".data"
    (model_path.parent / data).unlink(missing_ok=True)
    onnx.save(m, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
              size_threshold=1024)
    return carried, other
