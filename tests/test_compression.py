"""Compressed transfers (``transport.compression``): the encodings' error and bytes, the validation
of what a device sends, error feedback, the planner's choice, and a run that uses them."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from fedlora_edge.core.compress import BLOCK_SCALES, META_KEY, TENSOR_SCALES, codec_of, decode, encode
from fedlora_edge.core.wire import PayloadError, decode_tensors, encode_tensors


def smollm2_rank8(seed: int = 0, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A SmolLM2-135M-shaped rank-8 adapter on q and v (30 layers; q 576 -> 576, v 576 -> 192)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(30):
        for proj, width in (("q_proj", 576), ("v_proj", 192)):
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            out[f"{p}.lora_A.weight"] = torch.randn(8, 576, generator=g) * scale
            out[f"{p}.lora_B.weight"] = torch.randn(width, 8, generator=g) * scale
    return out


def rel_error(got: dict, want: dict) -> float:
    num = sum(float((got[k] - want[k]).pow(2).sum()) for k in want)
    return (num / sum(float(want[k].pow(2).sum()) for k in want)) ** 0.5


def test_each_encoding_keeps_its_error_and_its_bytes_on_a_smollm2_sized_update():
    t = smollm2_rank8()
    assert sum(v.numel() for v in t.values()) == 460_800
    fp32 = len(encode_tensors(t))
    bounds = {"none": (1.0, 0.0), "fp16": (0.51, 1e-3), "int8": (0.27, 0.01), "int4": (0.15, 0.15)}
    for codec, (ratio, err) in bounds.items():
        blob = encode(t, codec)
        assert codec_of(blob) == codec
        got = decode(blob)
        assert set(got) == set(t) and all(got[k].dtype == torch.float32 and got[k].shape == t[k].shape for k in t)
        assert len(blob) / fp32 <= ratio, (codec, len(blob) / fp32)
        assert rel_error(got, t) <= err, (codec, rel_error(got, t))


def test_a_change_is_sent_as_the_change_and_decodes_against_the_start():
    start = smollm2_rank8(1)
    g = torch.Generator().manual_seed(2)
    trained = {k: v + 0.001 * torch.randn(v.shape, generator=g) for k, v in start.items()}
    blob = encode(trained, "int8", reference=start)
    got = decode(blob, reference=start)
    change = {k: trained[k] - start[k] for k in start}
    # the error is the change's int8 error, far below the factors' own
    assert rel_error({k: got[k] - start[k] for k in start}, change) < 0.01
    assert rel_error(got, trained) < 0.01 * 0.001 / 0.02 * 2
    with pytest.raises(PayloadError, match="no start was given"):
        decode(blob)  # without the start its plan sent, the change means nothing


def test_stochastic_rounding_is_unbiased():
    x = {"w": torch.linspace(-1, 1, 640).reshape(10, 64) * 0.013}
    nearest = decode(encode(x, "int4"))["w"]
    runs = [decode(encode(x, "int4", stochastic=True, generator=torch.Generator().manual_seed(s)))["w"]
            for s in range(400)]
    mean = torch.stack(runs).mean(0)
    # one stochastic draw is noisier than rounding to nearest; their mean converges on the value
    assert rel_error({"w": runs[0]}, x) > rel_error({"w": nearest}, x)
    assert rel_error({"w": mean}, x) < rel_error({"w": nearest}, x) / 3


def test_error_feedback_carries_what_int4_lost_into_the_next_update():
    g = torch.Generator().manual_seed(3)
    start = {"w": torch.zeros(16, 64)}
    changes = [{"w": torch.randn(16, 64, generator=g) * 0.01 + 0.004} for _ in range(30)]
    fb: dict = {}
    with_fb = sum(decode(encode(c, "int4", reference=start, feedback=fb), reference=start)["w"] for c in changes)
    without = sum(decode(encode(c, "int4", reference=start), reference=start)["w"] for c in changes)
    truth = sum(c["w"] for c in changes)
    # with feedback the running sum is off by one round's rounding at most; without, the errors pile up
    assert float((with_fb - truth).abs().max()) <= float(fb["w"].abs().max()) + 1e-6
    assert rel_error({"w": with_fb}, {"w": truth}) < rel_error({"w": without}, {"w": truth}) / 3


def _tamper(blob: bytes, meta_change=None, tensors_change=None) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    tensors = decode_tensors(blob)
    meta = json.loads(header["__metadata__"][META_KEY])
    if meta_change:
        meta_change(meta)
    if tensors_change:
        tensors_change(tensors)
    return encode_tensors(tensors, {META_KEY: json.dumps(meta)})


@pytest.mark.parametrize("case, expect", [
    ("codec", "not one this coordinator knows"),
    ("block", "not one this coordinator knows"),
    ("shape-of-nothing", "which it does not hold as codes"),
    ("scale-count", "block scales"),
    ("inf-scale", "finite"),
    ("negative-scale", "finite and non-negative"),
    ("int4-shape", "bytes of codes for shape"),
    ("dtype", "under int8 a tensor is"),
    ("stray", "which no int8 encoding has"),
    ("not-json", "not the JSON object"),
])
def test_a_bad_compressed_payload_is_refused_with_what_is_wrong(case, expect):
    t = {"a.lora_A.weight": torch.randn(4, 64), "a.lora_B.weight": torch.randn(64, 4)}
    codec = "int4" if case == "int4-shape" else "int8"
    blob = encode(t, codec)

    def meta(m):
        if case == "codec":
            m["codec"] = "int3"
        elif case == "block":
            m["block"] = 3
        elif case == "shape-of-nothing":
            m["shapes"] = {"b.lora_A.weight": [4, 64]}
        elif case == "int4-shape":
            m["shapes"]["a.lora_A.weight"] = [400, 64]

    def tensors(ts):
        if case == "scale-count":
            ts[BLOCK_SCALES] = ts[BLOCK_SCALES][:-1].contiguous()
        elif case == "inf-scale":
            ts[TENSOR_SCALES] = torch.tensor([float("inf"), 1.0])
        elif case == "negative-scale":
            ts[BLOCK_SCALES] = -ts[BLOCK_SCALES]
        elif case == "dtype":
            ts["a.lora_A.weight"] = ts["a.lora_A.weight"].to(torch.int16)
        elif case == "stray":
            ts["::extra"] = torch.zeros(1)

    if case == "not-json":
        bad = encode_tensors(decode_tensors(blob), {META_KEY: "{not json"})
    else:
        bad = _tamper(blob, meta, tensors)
    with pytest.raises(PayloadError, match=expect):
        decode(bad)


def test_the_size_limit_holds_before_a_compressed_payload_is_read():
    blob = encode(smollm2_rank8(), "int8")
    with pytest.raises(PayloadError, match="exceeds the limit"):
        decode(blob, max_bytes=len(blob) - 1)


def test_auto_gives_each_device_the_least_lossy_encoding_it_can_take_part_with():
    # spread10: its slow devices cannot move Fed-PLoRA's rank-32 download in fp32 within the budget
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.fleetplan import fleet_plans

    plain = fleet_plans(load_config(overrides={"method": "fed-plora", "fleet": "spread10"}))
    auto = fleet_plans(load_config(overrides={"method": "fed-plora", "fleet": "spread10",
                                              "transport.compression": "auto"}))
    left_out = [p.device for p in plain if p.plan is None]
    assert left_out, "spread10 under fp32 leaves nobody out: this test no longer tests anything"
    by_id = {p.device: p for p in auto}
    for p in plain:
        a = by_id[p.device]
        if p.plan is not None:
            assert a.capacity.compression == "none" and a.capacity.rank == p.capacity.rank
    joined = [d for d in left_out if by_id[d].plan is not None]
    assert joined, [by_id[d].reason for d in left_out]
    assert all(by_id[d].capacity.compression in ("fp16", "int8", "int4") for d in joined)


def test_compression_with_dp_or_secure_aggregation_is_refused_before_the_run():
    from fedlora_edge.coordinator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="transport.compression.*privacy.dp"):
        load_config(overrides={"method": "fedit", "transport.compression": "int8",
                               "privacy.dp.noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="transport.compression.*secure_aggregation"):
        load_config(overrides={"method": "fedit", "transport.compression": "int8",
                               "privacy.secure_aggregation.enabled": True})
    with pytest.raises(ConfigError, match="transport.compression"):
        load_config(overrides={"transport.compression": "int3"})


FAST = {"model": "tiny-llama", "rounds": 2, "clients_per_round": 3, "train.steps": 2, "train.batch_size": 4,
        "data.eval_per_domain": 3, "data.samples_per_client": 12, "data.tasks": ["add", "upper"],
        "max_new_tokens": 4, "lora.max_rank": 8, "lora.rank": 4}


def simulate(tmp_path, method, **extra):
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={**FAST, "method": method, **({"fedlease.warmup_rounds": 1} if method == "fedlease"
                                                                else {}), **extra})
    sim = Simulation(cfg, tmp_path)
    return sim, sim.run()


def _methods():
    from fedlora_edge.coordinator.methods import method_names

    return [m for m in method_names() if m != "centralized"]  # centralized sends nothing


@pytest.mark.integration
@pytest.mark.parametrize("method", _methods())
def test_every_method_runs_with_int8_transfers_both_ways(tmp_path, method):
    sim, report = simulate(tmp_path / method, method, **{"transport.compression": "int8"})
    assert [r["status"] for r in report["rounds"]] == ["ok", "ok"]
    assert report["totals"]["rejected_updates"] == 0
    rows = [c for r in report["rounds"] for c in r["clients"]]
    assert rows and all(c["compression"] == "int8" for c in rows)
    assert report["totals"]["compression"] == {"int8": len({c["client"] for c in rows})}
    # tiny-llama's tensors are small, so the header weighs more than on a real model
    assert report["totals"]["uplink_vs_fp32"] < 0.45 and report["totals"]["downlink_vs_fp32"] < 0.45


@pytest.mark.integration
def test_compressed_runs_end_near_the_fp32_run(tmp_path):
    ends = {}
    for codec in ("none", "fp16", "int8", "int4"):
        sim, report = simulate(tmp_path / codec, "fedit", **{"transport.compression": codec, "rounds": 3})
        ends[codec] = {m: (a.clone(), b.clone()) for m, (a, b) in sim.engine.state.global_factors.items()}
        if codec == "none":
            assert report["totals"]["uplink_vs_fp32"] > 0.99
    base = ends["none"]

    def dist(x):
        num = sum(float((x[m][i] - base[m][i]).pow(2).sum()) for m in base for i in (0, 1))
        return (num / sum(float(base[m][i].pow(2).sum()) for m in base for i in (0, 1))) ** 0.5

    # each run trains the same examples from the same seeds; only the wire differs
    assert dist(ends["fp16"]) < 1e-3
    assert dist(ends["int8"]) < 1e-2
    assert dist(ends["int8"]) < dist(ends["int4"]) < 0.2


def test_a_profile_may_pin_its_own_encoding_unless_the_run_refuses_compression(tmp_path):
    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.fleetplan import fleet_plans
    from fedlora_edge.core.profile import DeviceProfile, ProfileError, load_profile, save_profile

    from pathlib import Path

    base = load_profile(Path(__file__).parents[1] / "profiles" / "phone-3g.yaml")
    import dataclasses

    save_profile(dataclasses.replace(base, name="phone-3g-int8", compression="int8"), tmp_path / "pinned.yaml")
    (tmp_path / "fleet.yaml").write_text(
        f"devices:\n  - {{id: plain, profile: phone-3g}}\n  - {{id: pinned, profile: {tmp_path / 'pinned.yaml'}}}\n"
        "  - {id: other, profile: jetson-agx-orin}\n")
    plans = {p.device: p for p in fleet_plans(load_config(overrides={"method": "hetlora",
                                                                    "fleet": str(tmp_path / "fleet.yaml")}))}
    assert plans["pinned"].capacity.compression == "int8" and plans["plain"].capacity.compression == "none"
    assert plans["pinned"].capacity.rank > plans["plain"].capacity.rank  # its bytes are a quarter
    dp = {p.device: p for p in fleet_plans(load_config(overrides={
        "method": "hetlora", "fleet": str(tmp_path / "fleet.yaml"), "privacy.dp.noise_multiplier": 1.0}))}
    assert dp["pinned"].capacity.compression == "none"
    with pytest.raises(ProfileError, match="compression must be one of"):
        DeviceProfile.from_dict({**base.to_dict(), "compression": "zip"})
