"""A GGUF base's own 4-bit/8-bit grid carried into ONNX ``MatMulNBits`` without loss (export/gguf_grid.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

from fedlora_edge.export.gguf_grid import (  # noqa: E402
    Grid,
    apply_grids,
    as_int8,
    decoder_on_4bit,
    dequantize,
    fuse_qkv,
    read_grids,
)

N, K = 48, 96  # three blocks of 32 per row


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, T]]) -> dict[str, np.ndarray]:
    """A GGUF with ``tensors`` quantized as given; returns each tensor's dequantized values."""
    w = gguf.GGUFWriter(str(path), "llama")
    values = {}
    for name, (x, kind) in tensors.items():
        if kind == T.F32:
            w.add_tensor(name, x)
            values[name] = x
        else:
            q = quants.quantize(x, kind)
            w.add_tensor(name, q, raw_dtype=kind)
            values[name] = quants.dequantize(q, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return values


@pytest.fixture
def gguf_file(tmp_path):
    rng = np.random.default_rng(0)
    x = {n: rng.standard_normal((N, K)).astype(np.float32) for n in ("q", "down", "emb", "k")}
    values = _write(tmp_path / "m.gguf", {"blk.0.attn_q.weight": (x["q"], T.Q4_1),
                                           "blk.0.ffn_down.weight": (x["down"], T.Q4_0),
                                           "token_embd.weight": (x["emb"], T.Q8_0),
                                           "blk.0.attn_k.weight": (x["k"], T.F32)})
    return tmp_path / "m.gguf", values


def test_grids_reproduce_the_loaded_weights(gguf_file):
    path, values = gguf_file
    perm = np.random.default_rng(1).permutation(N)  # the converter permutes q's rows: matched by content
    state = {"model.layers.0.self_attn.q_proj.weight": torch.from_numpy(values["blk.0.attn_q.weight"][perm]),
             "model.layers.0.mlp.down_proj.weight": torch.from_numpy(values["blk.0.ffn_down.weight"]),
             "model.embed_tokens.weight": torch.from_numpy(values["token_embd.weight"]),
             "model.layers.0.self_attn.k_proj.weight": torch.from_numpy(values["blk.0.attn_k.weight"])}
    grids = read_grids(path, state)
    # attn_k is f32: no grid to keep, the builder quantizes it
    assert set(grids) == {"model.layers.0.attn.q_proj.MatMul", "model.layers.0.mlp.down_proj.MatMul", "lm_head.MatMul"}
    q = grids["model.layers.0.attn.q_proj.MatMul"]
    # Q4_1's offset goes into integer zero points (codes centred) and what is left of it
    np.testing.assert_allclose(dequantize(q), state["model.layers.0.self_attn.q_proj.weight"].numpy(), rtol=0, atol=1e-6)
    assert q.zero.max() > 0 and np.all(np.abs(q.offset) <= q.scale / 2 + 1e-7)
    assert np.array_equal(dequantize(grids["model.layers.0.mlp.down_proj.MatMul"]), values["blk.0.ffn_down.weight"])
    assert np.array_equal(dequantize(grids["lm_head.MatMul"]), values["token_embd.weight"])
    # weights that are not the file's (a model changed after loading) are not given a grid
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"] + 1e-3
    grids = read_grids(path, state)
    assert set(grids) == {"model.layers.0.attn.q_proj.MatMul", "lm_head.MatMul"}


def test_fused_qkv_grid_is_q_k_v_stacked_along_the_output(gguf_file):
    """The builder's fused q/k/v matmul takes the three grids concatenated along N: the same values,
    q's rows first; a projection without an offset term (Q4_0) gives zeros to the fused one's."""
    rng = np.random.default_rng(4)

    def grid(n, offset):
        scale = rng.random((n, K // 32), dtype=np.float32)
        return Grid(rng.integers(0, 16, (n, K), dtype=np.uint8), scale,
                    (scale * 0.3).astype(np.float32) if offset else None,
                    rng.integers(0, 16, (n, K // 32), dtype=np.uint8), 4)

    grids = {f"model.layers.0.attn.{p}_proj.MatMul": grid(n, p != "k") for p, n in (("q", 64), ("k", 32), ("v", 32))}
    fused = fuse_qkv(grids)["model.layers.0.attn.qkv_proj.MatMul"]
    assert np.array_equal(dequantize(fused), np.concatenate([dequantize(grids[f"model.layers.0.attn.{p}_proj.MatMul"])
                                                            for p in "qkv"], 0))
    grids["model.layers.0.attn.v_proj.MatMul"] = as_int8(grids["model.layers.0.attn.v_proj.MatMul"])
    assert "model.layers.0.attn.qkv_proj.MatMul" not in fuse_qkv(grids)  # bit widths differ: left to the builder
    state = {f"model.layers.0.self_attn.{p}_proj.weight": None for p in "qkv"}
    assert not decoder_on_4bit(grids, state)  # v is 8-bit
    del state["model.layers.0.self_attn.v_proj.weight"]
    assert decoder_on_4bit(grids, state) and not decoder_on_4bit({}, state)


def _nbits_model(path: Path, bits: int, level: int, rng) -> None:
    """Two MatMulNBits nodes reading one input (q and k), as the model builder writes them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nb = K // 32
    nodes, inits = [], []
    for proj, out in (("q_proj", "y"), ("k_proj", "y2")):
        pre = f"model.layers.0.attn.{proj}.MatMul" if bits == 4 else "lm_head.MatMul"
        if bits == 8 and proj == "k_proj":
            pre = "model.layers.0.attn.k_proj.MatMul"  # no grid for it: left as built
        inits += [numpy_helper.from_array(rng.integers(0, 255, (N, nb, 16 if bits == 4 else 32), dtype=np.uint8),
                                          f"{pre}.weight_Q{bits}G32"),
                  numpy_helper.from_array(rng.random((N, nb), dtype=np.float32), f"{pre}.weight_scale"),
                  numpy_helper.from_array(np.zeros((N, (nb + 1) // 2 if bits == 4 else nb), dtype=np.uint8),
                                          f"{pre}.weight_zp")]
        nodes.append(helper.make_node("MatMulNBits", ["x"] + [t.name for t in inits[-3:]], [out],
                                      domain="com.microsoft", name=f"/model/layers.0/attn/{proj}/MatMul_Q4", K=K, N=N,
                                      bits=bits, block_size=32, accuracy_level=level))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, "s", N]) for y in ("y", "y2")], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10)
    onnx.save(m, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def _computes_the_file_values(ort, model, values, names, level, rng):
    """Each output of ``model`` is ``x @ W.T`` for the file's values ``W``: exactly with fp32
    activations (level 1), within the int8 activations' rounding at level 4."""
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    ys = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for y, name in zip(ys, names):
        expect = x @ values[name].T
        tol = 1e-4 if level == 1 else 2e-2
        np.testing.assert_allclose(y, expect, rtol=0, atol=tol * np.abs(expect).max())


@pytest.mark.parametrize("level", [1, 4])
@pytest.mark.parametrize("kind,bits", [(T.Q4_1, 4), (T.Q4_0, 4), (T.Q8_0, 8)])
def test_matmulnbits_computes_with_the_file_grid(tmp_path, kind, bits, level):
    """fp32 activations (level 1): the file's values exactly; int8 activations (level 4, what the
    exports use): within the activations' own rounding.  q and k share one input's block sums."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    rng = np.random.default_rng(2)
    names = {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight"} if bits == 4 else \
        {"token_embd.weight": "model.embed_tokens.weight"}
    values = _write(tmp_path / "m.gguf", {g: (rng.standard_normal((N, K)).astype(np.float32), kind) for g in names})
    grids = read_grids(tmp_path / "m.gguf", {hf: torch.from_numpy(values[g]) for g, hf in names.items()})
    model = tmp_path / "model.onnx"
    _nbits_model(model, bits, level, rng)
    carried, other = apply_grids(model, grids)
    assert len(carried) == len(names) and len(other) == 2 - len(names)
    block_sums = [n for n in onnx.load(str(model), load_external_data=False).graph.node if "/BlockSum" in n.name]
    assert len(block_sums) == (1 if kind == T.Q4_1 else 0)  # one per input, only where there is an offset
    _computes_the_file_values(ort, model, values, names, level, rng)


@pytest.mark.parametrize("level", [1, 4])
@pytest.mark.parametrize("kind", [T.Q4_1, T.Q4_0])
def test_a_4bit_grid_in_a_symmetric_int8_matmul_is_the_file_grid(tmp_path, kind, level):
    """The int8 build's MatMulNBits (8-bit, no zero-point input: 128 implied) carries a 4-bit grid
    shifted to zero point 128: the file's values exactly with fp32 activations, within the int8
    activations' rounding at level 4."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    names = {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
             "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight"}
    values = _write(tmp_path / "m.gguf", {g: (rng.standard_normal((N, K)).astype(np.float32), kind) for g in names})
    grids = {k: as_int8(g) for k, g in
             read_grids(tmp_path / "m.gguf", {hf: torch.from_numpy(values[g]) for g, hf in names.items()}).items()}
    for name in names:  # the same values, codes around 128
        grid = grids[f"model.layers.0.attn.{'q' if 'attn_q' in name else 'k'}_proj.MatMul"]
        assert grid.bits == 8 and (grid.zero == 128).all()
        assert np.array_equal(dequantize(grid), values[name])
    nb, nodes, inits = K // 32, [], []
    for proj, out in (("q_proj", "y"), ("k_proj", "y2")):
        pre = f"model.layers.0.attn.{proj}.MatMul"
        inits += [numpy_helper.from_array(rng.integers(0, 255, (N, nb, 32), dtype=np.uint8), f"{pre}.weight_Q8"),
                  numpy_helper.from_array(rng.random(N * nb, dtype=np.float32), f"{pre}.weight_scales")]
        nodes.append(helper.make_node("MatMulNBits", ["x"] + [t.name for t in inits[-2:]], [out], domain="com.microsoft",
                                      name=f"/model/layers.0/attn/{proj}/MatMul_Q8", K=K, N=N, bits=8, block_size=32,
                                      accuracy_level=level))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, "s", N]) for y in ("y", "y2")], inits)
    model = tmp_path / "model.onnx"
    import onnx

    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                                ir_version=10), str(model), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    carried, other = apply_grids(model, grids)
    assert len(carried) == 2 and other == []
    _computes_the_file_values(ort, model, values, names, level, rng)


@pytest.mark.integration
@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_an_onnx_base_from_a_4bit_gguf_keeps_the_file_grid(tmp_path, quant):
    """A base whose weights are a Q4_1 file's values: the int4 and int8 exports carry the file's
    codes (q|k|v into the fused matmul), and their logits are closer to the model's than an export
    of the same weights quantized again; int8 on that base is the int4 graph (4-bit matmuls, the
    head in 8 bits) and says so."""
    pytest.importorskip("onnxruntime_genai")
    import onnx

    from fedlora_edge.core.lora import adapted_modules
    from fedlora_edge.core.models import load_model
    from fedlora_edge.export.onnx_genai import INT8_ON_4BIT, GenaiRunner, build_base

    model, tok = load_model("tiny-llama")
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    tensors = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if len(parts) > 4 and parts[-2] in names:
            tensors[f"blk.{parts[2]}.{names[parts[-2]]}.weight"] = (name, T.Q4_1)
    tensors["output.weight"] = ("lm_head.weight", T.Q8_0)
    state = model.state_dict()
    values = _write(tmp_path / "m.gguf", {g: (state[hf].numpy(), kind) for g, (hf, kind) in tensors.items()})
    with torch.no_grad():  # the model as loaded from that file
        for g, (hf, _) in tensors.items():
            state[hf].copy_(torch.from_numpy(values[g]))
    modules = adapted_modules(model, ["q_proj", "v_proj"])
    ids = np.array([[3, 8, 1, 22, 9, 14, 2, 5]], dtype=np.int64)
    want = model(input_ids=torch.from_numpy(ids)).logits.detach().numpy()
    err = {}
    for kind, path in (("grid", tmp_path / "m.gguf"), ("again", None)):
        artifact, left, info = build_base(model, tok, modules, tmp_path / kind, quant, 64, log_file=tmp_path / "b.log",
                                          gguf=path)
        assert left == []
        err[kind] = float(np.abs(GenaiRunner(artifact.parent, None, 1).logits(ids) - want).max())
        nbits = [n for n in onnx.load(str(artifact), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
        bits = {n.name.split("/")[-2]: {a.name: a.i for a in n.attribute}["bits"] for n in nbits}
        layers = len([n for n in nbits if "/attn/qkv_proj/" in n.name])
        assert layers and not [n for n in nbits if "/attn/q_proj/" in n.name]  # q/k/v fused
        if kind == "grid":  # q, k and v: one fused tensor per layer
            assert info["grid_tensors"] == len(tensors) - 2 * layers and info["requantized"] == []
            assert info.get("weights_note") == (INT8_ON_4BIT if quant == "int8" else None)
            assert bits.pop("lm_head") == 8 and set(bits.values()) == {4}  # int8 too: the int4 graph
        else:
            assert "grid" not in info and "weights_note" not in info
            assert set(info["lora"]) == {f"layers.{i}.attn.qkv" for i in range(layers)}
            assert set(bits.values()) == ({8} if quant == "int8" else {4, 8})
    # an 8-bit second rounding errs less than a 4-bit one: the file's grid gains less there
    assert err["grid"] < err["again"] / (2 if quant == "int4" else 1.2)
