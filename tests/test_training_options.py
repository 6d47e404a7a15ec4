"""Training options as peft/transformers users know them: train.dtype, a quantized frozen base
(torchao NF4 and int8), gradient checkpointing and packing, on the tiny model built from a config."""

import math

import pytest
import torch
from peft import get_peft_model

from fedlora_edge.coordinator.config import load_config
from fedlora_edge.coordinator.errors import ConfigError
from fedlora_edge.coordinator.planner import FP32, ModelShape, TrainForm, memory_bytes, plan_capacity
from fedlora_edge.core.data import (
    Example,
    collate,
    collate_packed,
    encode_examples,
    generate_task,
    pack_examples,
)
from fedlora_edge.core.lora import adapted_modules, lora_config, uniform_plan
from fedlora_edge.core.models import load_model
from fedlora_edge.core.precision import FrozenQuantLinear, PrecisionError, base_form, base_linears
from fedlora_edge.core.profile import DeviceProfile
from fedlora_edge.edge_client.trainer import TrainSettings, checkpointing, train_local

TARGETS = ["q_proj", "v_proj"]


def wrapped(dtype="fp32", base_quant="none", rank=4):
    model, tok = load_model("tiny-llama", dtype=dtype, base_quant=base_quant)
    dims = adapted_modules(model, TARGETS)
    return get_peft_model(model, lora_config(uniform_plan(dims, rank, 2.0), TARGETS)), tok


def lora_params(pm):
    return {n: p for n, p in pm.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dtype,base_quant,gc,packing", [
    ("fp32", "none", False, False), ("bf16", "none", False, False), ("fp32", "nf4", False, False),
    ("fp32", "int8", False, False), ("bf16", "nf4", False, False), ("bf16", "int8", False, False),
    ("fp32", "none", True, False), ("fp32", "none", False, True), ("bf16", "nf4", True, True),
    ("fp32", "int8", True, True),
])
def test_each_option_trains_with_a_finite_loss_and_moves_only_lora(dtype, base_quant, gc, packing):
    pm, tok = wrapped(dtype, base_quant)
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" not in n and base_quant == "none"}
    settings = TrainSettings(steps=2, batch_size=4, lr=0.01, max_seq_len=64, dtype=dtype, base_quant=base_quant,
                             gradient_checkpointing=gc, packing=packing)

    res = train_local(pm, tok, generate_task("add", 12, 0), settings, seed=0)

    assert len(res.losses) == 2 and all(math.isfinite(x) for x in res.losses)
    lora = lora_params(pm)
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at zero: it trained
    assert all(torch.equal(p, frozen[n]) for n, p in pm.named_parameters() if n in frozen)
    base = pm.get_base_model()
    assert base_form(base) == (dtype, base_quant)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in base.modules())  # switched off after


@pytest.mark.parametrize("base_quant,kind", [("nf4", "NF4Tensor"), ("int8", "Int8Tensor")])
def test_a_quantized_base_holds_quantized_linears_and_float32_trainable_lora(base_quant, kind):
    pm, tok = wrapped("fp32", base_quant)
    base = pm.get_base_model()
    linears = list(base_linears(base))
    before = {n: m.weight.dequantize() if hasattr(m.weight, "dequantize") and kind == "Int8Tensor"
              else m.weight.to(torch.float32) for n, m in linears}

    assert len(linears) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers (LoRA's own left out)
    for _, m in linears:
        assert type(m.weight).__name__ == kind and not m.weight.requires_grad
        assert isinstance(m, FrozenQuantLinear)
    assert type(base.lm_head.weight) is torch.nn.Parameter and base.lm_head.weight.dtype == torch.float32
    assert base.lm_head.weight is base.get_input_embeddings().weight  # the tied head stays tied, unquantized
    lora = lora_params(pm)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert set(n for n, p in pm.named_parameters() if p.requires_grad) == set(lora)

    train_local(pm, tok, generate_task("upper", 8, 0), TrainSettings(steps=1, batch_size=4, lr=0.01,
                                                                     base_quant=base_quant), seed=0)
    for n, m in list(base_linears(base)):  # the frozen base did not move
        after = m.weight.dequantize() if kind == "Int8Tensor" else m.weight.to(torch.float32)
        assert torch.equal(after, before[n])


def test_quantized_base_is_close_to_the_float_base():
    """NF4 and int8 are approximations of the same base: the logits stay near the float32 ones."""
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29, 33]])
    ref, _ = load_model("tiny-llama")
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        for quant, tol in (("int8", 0.05), ("nf4", 0.5)):
            got = load_model("tiny-llama", base_quant=quant)[0](input_ids=ids).logits
            assert (got - want).abs().max() < tol and not torch.equal(got, want)


def test_fp16_is_refused_on_a_cpu():
    with pytest.raises(PrecisionError, match="train.dtype: fp16 needs a CUDA device"):
        load_model("tiny-llama", dtype="fp16")


def test_packing_keeps_whole_examples_and_prompt_tokens_unscored(tiny):
    model, tok = tiny
    examples = generate_task("add", 5, 0) + [Example("Write in capital letters: abc", "ABC")]
    enc = encode_examples(tok, examples, 96)

    blocks = pack_examples(enc, 192)
    batch = collate_packed(blocks, tok.pad_token_id)

    assert sorted(map(tuple, (ids for b in blocks for ids, _ in b))) == sorted(tuple(ids) for ids, _ in enc)
    assert all(sum(len(ids) for ids, _ in b) <= 192 for b in blocks) and len(blocks) < len(enc)
    assert "attention_mask" not in batch
    for row, block in enumerate(blocks):
        at = 0
        for ids, plen in block:
            n = len(ids)
            assert batch["position_ids"][row, at:at + n].tolist() == list(range(n))
            assert (batch["labels"][row, at:at + plen] == -100).all()  # the prompt, unscored
            assert batch["labels"][row, at + plen:at + n].tolist() == ids[plen:]  # the response, scored
            at += n
        assert (batch["labels"][row, at:] == -100).all()  # padding, unscored
    # attention stays within each example: the packed rows give the loss of the examples unpacked
    with torch.no_grad():
        packed = model(**batch).loss
        unpacked = model(**collate(enc, tok.pad_token_id)).loss
    assert packed == pytest.approx(float(unpacked), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(gc):
        torch.manual_seed(0)  # peft draws A from torch's generator
        pm, tok = wrapped()
        for n, p in lora_params(pm).items():  # B off zero, so that A gets a gradient too
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        batch = collate(encode_examples(tok, generate_task("add", 4, 0), 64), tok.pad_token_id)
        pm.train()
        with checkpointing(pm, gc):
            assert all(layer.gradient_checkpointing == gc for layer in pm.get_base_model().model.layers)
            loss = pm(**batch).loss
            loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in lora_params(pm).items()}

    (l0, g0), (l1, g1) = grads(False), grads(True)
    assert l0 == pytest.approx(l1, rel=1e-6)
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-7) for n in g0)
    assert all(g.abs().sum() > 0 for g in g0.values())


@pytest.mark.parametrize("override,key", [
    ({"train.dtype": "fp8"}, "train.dtype: must be one of fp32, bf16, fp16"),
    ({"train.base_quant": "nf3"}, "train.base_quant: must be one of none, nf4, int8"),
    ({"train.gradient_checkpointing": "yes"}, "train.gradient_checkpointing: expected true or false"),
    ({"train.packing": 1}, "train.packing: expected true or false"),
    ({"train.dtype": "fp16", "device": "cpu"}, "train.dtype: fp16 needs a CUDA device"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(overrides=override)


def test_options_load_and_reach_the_devices_with_the_plan():
    from fedlora_edge.edge_client.work import assignment_meta

    cfg = load_config(overrides={"train.dtype": "bf16", "train.base_quant": "nf4", "train.packing": True,
                                 "train.gradient_checkpointing": True})
    meta = assignment_meta(round_idx=1, plan=uniform_plan({"m": (4, 4)}, 1, 2.0), seed=0, settings=cfg.train,
                           targets=TARGETS, dropout=0.0, model="tiny-llama")
    assert {k: meta["train"][k] for k in ("dtype", "base_quant", "gradient_checkpointing", "packing")} == \
        {"dtype": "bf16", "base_quant": "nf4", "gradient_checkpointing": True, "packing": True}


def test_a_plan_for_another_base_form_is_refused():
    from fedlora_edge.core.wire import encode_tensors
    from fedlora_edge.edge_client.work import assignment_meta, run_assignment, wrap

    model, tok = load_model("tiny-llama")
    dims = adapted_modules(model, TARGETS)
    plan = uniform_plan(dims, 2, 2.0)
    meta = assignment_meta(round_idx=1, plan=plan, seed=0, settings=TrainSettings(steps=1, base_quant="nf4"),
                           targets=TARGETS, dropout=0.0, model="tiny-llama")
    with pytest.raises(ValueError, match="loaded as train.dtype fp32, train.base_quant none; the plan asks for fp32, nf4"):
        run_assignment(wrap(model, meta), tok, generate_task("add", 4, 0), meta, encode_tensors({}))


def test_executorch_devices_refuse_the_torch_trainers_options():
    from fedlora_edge.edge_client.et_train import schedule_unsupported

    assert schedule_unsupported(TrainSettings()) is None
    why = schedule_unsupported(TrainSettings(base_quant="nf4", packing=True))
    assert "train.base_quant nf4, train.packing True needs the torch trainer" in why


SHAPE = ModelShape(n_params=134_515_008, hidden=576, intermediate=1536, layers=30, heads=9, kv_dim=192, vocab=49152,
                   adapted={f"l{i}.{p}": (576, 576 if p == "q" else 192) for i in range(30) for p in "qv"})


def test_planner_counts_dtype_quantized_base_and_checkpointing():
    def parts(**form):
        return memory_bytes(SHAPE, 8, 8, 64, 0.35, form=TrainForm(**form))

    fp32, bf16 = parts(), parts(dtype="bf16")
    nf4, int8 = parts(base_quant="nf4"), parts(base_quant="int8")
    gc = parts(checkpointing=True)
    assert parts() == memory_bytes(SHAPE, 8, 8, 64, 0.35)  # the default form is the float32 trainer's
    assert nf4["base"] < int8["base"] < bf16["base"] < fp32["base"] == SHAPE.n_params * 4
    embedding = SHAPE.vocab * SHAPE.hidden
    assert nf4["base"] == pytest.approx((SHAPE.n_params - embedding) * (0.5 + 1 / 64) + embedding * 4)
    assert gc["activations"] < fp32["activations"] / 3 and gc["base"] == fp32["base"]
    assert bf16["activations"] < fp32["activations"]

    def total(**form):
        return sum(parts(**form).values())

    assert total(dtype="bf16", base_quant="nf4") < total(dtype="bf16", base_quant="int8") < total(dtype="bf16") \
        < total()
    assert total(base_quant="nf4", checkpointing=True) < total(checkpointing=True) < total()
    assert total(dtype="bf16", base_quant="nf4", checkpointing=True) < total(dtype="bf16", base_quant="nf4")
    # a quantized base computing in float32 holds more in the heap around its activations (QUANT_FP32_SLACK)
    assert nf4["activations"] > fp32["activations"]
    assert total(packing=True) > total()  # the packed rows' attention mask: k and v repeated per head


def test_a_small_device_fits_a_higher_rank_with_nf4_and_checkpointing():
    prof = DeviceProfile(name="d", memory_total_gb=2.0, memory_usable_gb=1.3, compute_gflops=1000.0,
                         uplink_mbps=1000.0, downlink_mbps=1000.0)
    kw = dict(max_rank=32, steps=10, batch=8, seq=64, deadline_s=1800.0, overhead_gb=0.35)
    plain = plan_capacity(prof, SHAPE, **kw, form=FP32)
    small = plan_capacity(prof, SHAPE, **kw, form=TrainForm("fp32", "nf4", True))
    assert plain.rank == 0 and "needs" in plain.reason
    assert small.rank == 32 and small.memory_gb < plain.memory_gb


@pytest.mark.integration
def test_simulate_trains_on_a_quantized_checkpointed_packed_base(tmp_path):
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={"model": "tiny-llama", "method": "hetlora", "rounds": 1, "clients_per_round": 2,
                                 "train.steps": 2, "train.batch_size": 4, "data.eval_per_domain": 2,
                                 "data.samples_per_client": 8, "data.tasks": ["add"], "max_new_tokens": 3,
                                 "lora.max_rank": 4, "lora.rank": 2, "train.dtype": "bf16",
                                 "train.base_quant": "nf4", "train.gradient_checkpointing": True,
                                 "train.packing": True})
    report = Simulation(cfg, tmp_path).run()
    losses = [x for c in report["rounds"][0]["clients"] for x in c["losses"]]
    assert losses and all(math.isfinite(x) for x in losses)
    assert math.isfinite(report["rounds"][0]["accuracy"]["loss"]["overall"])
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "the frozen base in bf16 with its Linear weights quantized to nf4" in card and "packed rows" in card


def test_a_method_that_folds_refuses_a_quantized_base(tmp_path):
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={"model": "tiny-llama", "method": "fed-plora", "train.base_quant": "int8",
                                 "data.samples_per_client": 4, "data.eval_per_domain": 1})
    with pytest.raises(ConfigError, match="^train.base_quant: method fed-plora folds components into the base"):
        Simulation(cfg, tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["hafl", "fedlease", "flexlora"])
def test_methods_that_hold_route_or_refactor_run_on_a_bf16_nf4_base(tmp_path, method):
    from fedlora_edge.coordinator.simulate import Simulation

    cfg = load_config(overrides={"model": "tiny-llama", "method": method, "rounds": 2, "clients_per_round": 2,
                                 "train.steps": 1, "train.batch_size": 2, "data.eval_per_domain": 1,
                                 "data.samples_per_client": 4, "data.tasks": ["add", "upper"], "max_new_tokens": 2,
                                 "lora.max_rank": 4, "lora.rank": 2, "train.dtype": "bf16", "train.base_quant": "nf4",
                                 **({"fedlease.warmup_rounds": 1} if method == "fedlease" else {})})
    report = Simulation(cfg, tmp_path).run()
    losses = [x for r in report["rounds"] for c in r["clients"] for x in c["losses"]]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)


def test_a_device_loads_the_base_its_plan_asks_for():
    from fedlora_edge.edge_client.session import load_for_training, same_base

    meta = {"model": "tiny-llama", "targets": TARGETS, "dropout": 0.0,
            "plan": uniform_plan({"model.layers.0.self_attn.q_proj": (64, 64)}, 1, 2.0).to_json(),
            "train": {"dtype": "bf16", "base_quant": "int8"}}
    pm, _ = load_for_training(meta, None)
    assert base_form(pm.get_base_model()) == ("bf16", "int8") and same_base(pm, meta)
    assert not same_base(pm, {**meta, "train": {"dtype": "bf16", "base_quant": "nf4"}})
    assert not same_base(pm, {k: v for k, v in meta.items() if k != "train"})  # an older plan: fp32, none
