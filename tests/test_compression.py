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
    ("bool-dim", "not packed int4 codes"),
    ("huge-dim", "not packed int4 codes"),
    ("zero-times-huge", "not packed int4 codes"),
])
def test_a_bad_compressed_payload_is_refused_with_what_is_wrong(case, expect):
    t = {"a.lora_A.weight": torch.randn(4, 64), "a.lora_B.weight": torch.randn(64, 4)}
    codec = "int4" if case in ("int4-shape", "bool-dim", "huge-dim", "zero-times-huge") else "int8"
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
        elif case == "bool-dim":
            m["shapes"]["a.lora_A.weight"] = [True] * 2
        elif case == "huge-dim":
            m["shapes"]["a.lora_A.weight"] = [10**200, 10**200]
        elif case == "zero-times-huge":
            m["shapes"]["a.lora_A.weight"] = [0, 2**63]

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


def test_a_header_nested_to_break_the_parser_is_a_refusal_not_a_crash():
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(PayloadError, match="not JSON"):
        decode(struct.pack("<Q", len(body)) + body)
    blob = encode({"w": torch.randn(4, 64)}, "int8")
    nested = _tamper(blob)
    n = struct.unpack("<Q", nested[:8])[0]
    header = json.loads(nested[8:8 + n])
    header["__metadata__"][META_KEY] = "[" * 100_000 + "]" * 100_000
    text = json.dumps(header).encode()
    with pytest.raises(PayloadError, match="not the JSON object"):
        decode(struct.pack("<Q", len(text)) + text + nested[8 + n:])


def test_an_update_is_held_to_its_plans_encoding_and_tensors_before_it_is_decoded():
    t = {"a.lora_A.weight": torch.randn(4, 64), "a.lora_B.weight": torch.randn(64, 4)}
    plan = {k: tuple(v.shape) for k, v in t.items()}
    blob = encode(t, "int8")
    assert set(decode(blob, codec="int8", block=64, shapes=plan)) == set(t)
    with pytest.raises(PayloadError, match="asked for int4"):
        decode(blob, codec="int4", block=64, shapes=plan)
    with pytest.raises(PayloadError, match="in blocks of 32"):
        decode(blob, codec="int8", block=32, shapes=plan)
    with pytest.raises(PayloadError, match="asked for int8"):
        decode(encode_tensors(t), codec="int8", block=64, shapes=plan)
    # a tensor the plan does not hold, or of another size, is refused before its values are made
    big = encode({**t, "b.lora_A.weight": torch.randn(4096, 64)}, "int4", block=4096)
    with pytest.raises(PayloadError, match="not a tensor its plan asked for"):
        decode(big, codec="int4", block=4096, shapes=plan)


def test_importance_scores_go_plain_and_stay_non_negative_under_int4_error_feedback():
    from fedlora_edge.core.lora import ClientPlan, ModulePlan
    from fedlora_edge.edge_client.work import Sending

    plan = ClientPlan({"m": ModulePlan((0, 1, 2))}, 3, 2.0)
    meta = {"plan": plan.to_json(), "seed": 1,
            "compression": {"codec": "int4", "block": 64, "stochastic": False, "error_feedback": True}}
    start = {"base_model.model.m.lora_A.weight": torch.zeros(3, 64), "base_model.model.m.lora_B.weight": torch.zeros(64, 3)}
    fb: dict = {}
    for scores in ([1.0, 0.1, 0.5], [0.01, 0.0, 0.02]):
        sent = {**{k: v + 0.01 for k, v in start.items()}, "importance.m": torch.tensor(scores)}
        got = decode(Sending(meta, start, fb).encode(sent), reference=start)
        assert torch.equal(got["importance.m"], torch.tensor(scores))  # plain float32, as computed
    assert list(fb) == [";".join(["m:0,1,2"])]  # the residuals of these components only
    other = ClientPlan({"m": ModulePlan((3, 4, 5))}, 3, 2.0)
    Sending({**meta, "plan": other.to_json()}, start, fb).encode({k: v + 0.01 for k, v in start.items()})
    assert list(fb) == ["m:3,4,5"]  # other components: the old residuals are dropped, not added to them


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


def test_small_steady_progress_survives_the_plans_rounding():
    # The plan goes out rounded; the device's change comes back measured from that rounded copy and
    # is added to the run's exact adapter: a step far below int4's resolution still adds up.
    g = torch.Generator().manual_seed(5)
    exact = {"w": torch.randn(8, 576, generator=g) * 0.02}
    start = {k: v.clone() for k, v in exact.items()}
    for _ in range(20):
        plan = decode(encode(exact, "int4"))                       # what the device receives
        trained = {"w": plan["w"] + 1e-4}                          # its training: a steady small step
        update = encode(trained, "int4", reference=plan)            # its change, from what it received
        exact = decode(update, reference=exact)                    # added back to the exact start
    progress = float((exact["w"] - start["w"]).mean())
    assert abs(progress - 20 * 1e-4) < 0.05 * 20 * 1e-4


@pytest.mark.integration
def test_compressed_runs_end_near_the_fp32_run(tmp_path):
    ends, inits = {}, {}
    for codec in ("none", "fp16", "int8", "int4"):
        from fedlora_edge.coordinator.config import load_config
        from fedlora_edge.coordinator.simulate import Simulation

        sim = Simulation(load_config(overrides={**FAST, "method": "fedit", "transport.compression": codec,
                                                "rounds": 3}), tmp_path / codec)
        inits[codec] = {m: (a.clone(), b.clone()) for m, (a, b) in sim.engine.state.global_factors.items()}
        report = sim.run()
        ends[codec] = {m: (a.clone(), b.clone()) for m, (a, b) in sim.engine.state.global_factors.items()}
        if codec == "none":
            assert report["totals"]["uplink_vs_fp32"] > 0.99

    def change(codec):  # what the run learnt: the adapter's change over the run (B starts at zero)
        return {m: (ends[codec][m][0] - inits[codec][m][0], ends[codec][m][1]) for m in ends[codec]}

    want = change("none")

    def dist(codec):
        got = change(codec)
        num = sum(float((got[m][i] - want[m][i]).pow(2).sum()) for m in want for i in (0, 1))
        return (num / sum(float(want[m][i].pow(2).sum()) for m in want for i in (0, 1))) ** 0.5

    # the same examples from the same seeds; only the wire differs, and what it changes is small
    # beside what the run learnt
    assert dist("fp16") < 0.01
    assert dist("int8") < 0.05
    assert dist("int8") < dist("int4") < 0.3


def test_a_profile_may_pin_its_own_encoding_unless_the_run_refuses_compression(tmp_path):
    from pathlib import Path

    from fedlora_edge.coordinator.config import load_config
    from fedlora_edge.coordinator.fleetplan import fleet_plans
    from fedlora_edge.core.profile import DeviceProfile, ProfileError, load_profile, save_profile

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
