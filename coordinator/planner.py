"""The planner: from a device profile, a model and a run config to a capacity (a LoRA rank).

A device's capacity is the largest LoRA rank ``r ≤ lora.max_rank`` such that

1. the predicted peak memory of local training fits ``memory_usable_gb``:

   ``mem(r) = base weights + activations(b, T) + logits(b, T) + LoRA(r) × 4 (weights, grads,
   two AdamW moments) + LoRA activations(r) + runtime overhead``;

2. the predicted device time of one round fits ``planner.round_deadline_s``:

   ``time(r) = download(r) + steps × step_flops(r) / (compute_gflops × efficiency) + upload(r)``;

3. the adapter's download plus upload fits ``planner.transfer_budget_s``, the time a device may
   spend moving its adapter each round (the transport's transfer timeout).  For small models
   this is what binds the rank: LoRA's share of memory and compute is tiny, its share of a slow
   link is not.

A device that cannot train rank 1 gets capacity 0 and a reason; it is reported, never dropped
silently.

A device with ``trainer: executorch`` (:mod:`fedlora_edge.edge_client.et_train`) runs SGD in an ExecuTorch
training program: its LoRA term is weights and gradients (no optimiser moments), an int8 base
(``trainer_base: int8``) counts one byte per weight outside the embedding, and its step takes
``EXECUTORCH_STEP_FACTOR`` times the torch step on the same batch (its matmuls in XNNPACK;
measured by ``bench/executorch_training.py``), and XNNPACK adds ``XNNPACK_WORKSPACE`` times the
head's weight at peak.  Its training program (about the base's size) is downloaded once per
distinct plan shape, not every round.

The activation term counts what autograd keeps for the backward pass of a frozen Llama-style
decoder with LoRA on some projections, per layer and token: the two RMSNorms' input and
normalised output (4h), the query and attention output (2h), key and value (2·kv), the
attention's log-sum-exp (one per head), and the three MLP tensors of ``SiLU(gate)·up`` (3·I);
times ``ACTIVATION_SLACK`` for the backward pass's transient gradients and allocator slack,
measured on this stack.  The logits term is four float32 copies of ``tokens × vocab``: logits,
log-softmax, and their two gradients, alive together at the loss.  ``bench/planner_memory.py``
checks the prediction against measured peak RSS.

The torch trainer's training options (:class:`TrainForm`) change the terms: ``train.dtype`` bf16
or fp16 halves the base's bytes and the activations' (peft's float32 copy of each adapted input
counted on top), and adds a half-precision copy of the logits and its gradient; ``train.base_quant``
counts the decoder's Linear weights at NF4's ~0.52 or int8's ~1 byte a weight (the embedding and an
untied head in ``dtype``), and a float32-computing quantized base holds ``QUANT_FP32_SLACK``
instead of ``ACTIVATION_SLACK`` (measured); ``train.gradient_checkpointing`` keeps each layer's
input and ``GC_LIVE_LAYERS`` layers' activations, and its step recomputes the layers' forward;
``train.packing`` adds what the attention mask of packed rows costs (key and value repeated per
head).  ``bench/planner_memory.py --options`` measures each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlora_edge.core.profile import DeviceProfile

BYTES = 4  # float32 training
GB = 2**30
HEADER_BYTES = 1024  # safetensors header and metadata of an adapter payload, generously
# Fraction of peak matmul throughput a training step achieves (the rest is attention, norms,
# elementwise ops and the Python loop).  Measured on the development host by bench/planner_memory.py.
STEP_EFFICIENCY = 0.5
# Measured/counted activation memory of training SmolLM2 on torch 2.13 CPU (bench/planner_memory.py):
# the counted saved tensors are ~74% of what the training phase holds at its peak.
ACTIVATION_SLACK = 1.35
# Step time of the executorch trainer over the torch trainer on the same model and batches
# (bench/executorch_training.py on the development host, SmolLM2 batch 8, one thread on each side)
# since the programs' matmuls run in XNNPACK: fp32 base 1.24x and 1.34x on a run's batches, 1.14x
# and 1.36x on batches of 64 (two runs), int8 base 1.07-1.52x; 1.28x on average, and 1.4 keeps
# room.  Before: 2.69x and 2.72x with the runtime's own matmul kernels, 3.17x and 3.02x while every
# matmul copied a transposed weight.  One factor serves both bases.
EXECUTORCH_STEP_FACTOR = 1.4
# What running an executorch program's matmuls in XNNPACK adds at peak, in units of the head's
# float32 bytes (vocab x hidden, the largest weight XNNPACK packs at run time): the SmolLM2
# program's peak RSS rose 159 MiB (the head: 108 MiB) when its matmuls moved to XNNPACK;
# bench/planner_memory.py --trainer executorch then predicts 0.955 of the measured peak (0.881
# without the term).
XNNPACK_WORKSPACE = 1.5
# A quantized base computing in float32 dequantizes every weight to float32 in each forward and
# backward pass (0.4 GB a pass on SmolLM2): these transients churn through the heap between the
# activations, and glibc's heap holds more at its peak than with a float base: measured 1.9-2.2x
# the counted activations at batch 4, 8 and 16 for NF4 and int8 (bench/planner_memory.py), where a
# float base (or a quantized one computing in bf16, whose transients are half the size) holds 1.35x
QUANT_FP32_SLACK = 2.05
# Gradient checkpointing keeps each decoder layer's input and recomputes the layer in the backward
# pass; at the peak the process holds about this many layers' activations beside them (the
# recomputed layer, its gradients, and the heap's hold on the forward pass's freed intermediates;
# fitted on SmolLM2 fp32 batch 8, where counting one layer predicted 0.89 of the measured peak)
GC_LIVE_LAYERS = 6
# Bytes per token and vocabulary entry at the loss: float32 logits, their log-softmax and the two
# gradients (4 x 4); off float32, the head's output in the base's dtype is upcast to float32 for
# the loss (transformers does), so its half-precision copy and gradient come on top (2 x 2)
LOGITS_BYTES = {"fp32": 16, "bf16": 20, "fp16": 20}


@dataclass(frozen=True)
class TrainForm:
    """How the torch trainer holds the frozen base and what it keeps for the backward pass:
    ``train.dtype``, ``train.base_quant``, ``train.gradient_checkpointing`` and ``train.packing``
    (a packed row is ``max_seq_len`` tokens, the worst case the planner counts for every batch; what
    packing adds is the attention mask that keeps each example to itself, with which transformers
    repeats the key and value heads for the attention kernel)."""

    dtype: str = "fp32"
    base_quant: str = "none"
    checkpointing: bool = False
    packing: bool = False

    @classmethod
    def of(cls, train) -> TrainForm:
        """The form a run config's ``train`` section asks for."""
        return cls(train.dtype, train.base_quant, train.gradient_checkpointing, train.packing)


FP32 = TrainForm()
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# bytes per quantized weight: NF4 packs two 4-bit codes a byte, plus an int8 scale per block of 64
# and a second-level scale per block of scales (core/precision.py); int8 is a byte a weight
# (its per-row scale is counted apart, per row)
QUANT_BYTES = {"nf4": 0.5 + 1 / 64, "int8": 1.0}


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know of a model, read from its config and modules."""

    n_params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    adapted: dict  # module path -> (in_features, out_features)
    untied_head: int = 0  # parameters of an output head that is not the embedding (0: tied, or none)

    @classmethod
    def from_model(cls, model, adapted: Mapping[str, tuple[int, int]]) -> ModelShape:
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        # tied embeddings are one tensor; parameters() already yields it once
        n = sum(p.numel() for p in model.parameters())
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        untied = (head.weight.numel() if head is not None and emb is not None and head.weight is not emb.weight
                  else 0)
        return cls(n, cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size),
                   cfg.num_hidden_layers, heads, kv * head_dim, cfg.vocab_size, dict(adapted), untied)

    def lora_params(self, rank: int) -> int:
        return rank * sum(i + o for i, o in self.adapted.values())


def adapter_bytes(shape: ModelShape, rank: int, compression: str = "none", block: int = 64) -> int:
    """Bytes of a rank-``rank`` adapter payload on the wire (safetensors; float32, or under
    ``compression`` its bytes per value, block scales of ``block`` values included:
    :mod:`fedlora_edge.core.compress`; int4's header also lists every tensor's shape)."""
    from fedlora_edge.core.compress import value_bytes

    shapes_text = 64 * 2 * len(shape.adapted) if compression == "int4" else 0
    return int(shape.lora_params(rank) * value_bytes(compression, block)) + HEADER_BYTES + shapes_text


def base_bytes(shape: ModelShape, dtype: str = "fp32", base_quant: str = "none") -> float:
    """Bytes of the frozen base as the torch trainer holds it: every parameter in ``dtype``, or
    with ``base_quant`` the decoder's Linear weights quantized (everything but the embedding and
    an untied head; the norms, a few thousand weights, are counted with them) and the rest in
    ``dtype``."""
    b = DTYPE_BYTES[dtype]
    if base_quant == "none":
        return shape.n_params * b
    kept = shape.vocab * shape.hidden + shape.untied_head
    quantized = shape.n_params - kept
    scales = quantized / shape.hidden * 4 if base_quant == "int8" else 0  # one float32 scale per row
    return quantized * QUANT_BYTES[base_quant] + scales + kept * b


def memory_bytes(shape: ModelShape, rank: int, batch: int, seq: int, overhead_gb: float,
                 trainer: str = "torch", base: str = "fp32", form: TrainForm = FP32) -> dict[str, float]:
    """Predicted peak memory of local training, by part, in bytes (``trainer``/``base``: the
    profile's ``trainer`` and ``trainer_base``; ``form``: the torch trainer's dtype, quantized base
    and checkpointing, :class:`TrainForm`)."""
    tokens = batch * seq
    embedding = shape.vocab * shape.hidden
    if trainer == "torch":
        weights = base_bytes(shape, form.dtype, form.base_quant)
    else:
        weights = (shape.n_params * BYTES if base == "fp32" else (shape.n_params - embedding) + embedding * BYTES)
        form = FP32
    act = DTYPE_BYTES[form.dtype]
    lora_copies = 4 if trainer == "torch" else 2  # AdamW: weights, grads, two moments; SGD: weights, grads
    h, inter, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_layer_token = 6 * h + 2 * kv + 3 * inter + shape.heads  # see module docstring
    if form.packing:  # a mask (the examples' bounds): transformers repeats k and v for all heads before sdpa
        per_layer_token += 2 * (h - kv)
    slack = QUANT_FP32_SLACK if form.base_quant != "none" and form.dtype == "fp32" else ACTIVATION_SLACK
    # per adapted module, A·x (float32), and off float32 the float32 copy of x that peft makes for A
    lora_act = sum(rank + (n_in if form.dtype != "fp32" else 0) for n_in, _ in shape.adapted.values()) * BYTES
    layer_act = slack * per_layer_token * act + lora_act / shape.layers  # one layer's, per token
    if form.checkpointing:  # each layer's input kept, and a few layers' activations live (GC_LIVE_LAYERS)
        activations = tokens * (shape.layers * h * act + min(shape.layers, GC_LIVE_LAYERS) * layer_act)
    else:
        activations = tokens * shape.layers * layer_act
    parts = {
        "base": weights,
        "activations": activations,
        "logits": tokens * shape.vocab * LOGITS_BYTES[form.dtype],
        "lora_train": lora_copies * shape.lora_params(rank) * BYTES,
        "runtime": overhead_gb * GB,
    }
    if trainer == "executorch":  # XNNPACK's workspace packs one weight at a time: the head is the largest
        parts["xnnpack_workspace"] = XNNPACK_WORKSPACE * embedding * BYTES
    return parts


def step_flops(shape: ModelShape, rank: int, batch: int, seq: int, checkpointing: bool = False) -> float:
    """FLOPs of one training step: forward, plus the input-gradient half of the backward pass
    (the base is frozen), plus full forward+backward of the LoRA factors, plus attention; with
    gradient checkpointing the backward pass runs every layer's forward again (the head's not)."""
    tokens = batch * seq
    dense = 2 * shape.n_params * tokens * 2
    attn = 2 * 2 * batch * seq * seq * shape.hidden * shape.layers * 2
    lora = 6 * tokens * shape.lora_params(rank)
    again = (2 * (shape.n_params - shape.vocab * shape.hidden) * tokens + attn / 2 + lora / 3) if checkpointing else 0
    return float(dense + attn + lora + again)


@dataclass(frozen=True)
class Capacity:
    device: str
    rank: int            # 0: cannot train even rank 1
    memory_gb: float     # at ``rank`` (at rank 1 when rank is 0)
    usable_gb: float
    step_s: float
    round_s: float
    reason: str = ""
    compression: str = "none"  # the adapter's encoding on the wire, both ways (transport.compression)

    @property
    def can_train(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True)
class Footprint:
    """What a method makes a device carry beyond the rank it trains: a download of another rank
    (all R components), a rank held in the forward pass (frozen components kept as LoRA), and a
    copy of the adapted base weights (folding into the base, restored afterwards)."""

    down_rank: int | None = None
    hold_rank: int | None = None
    fold: bool = False


NO_FOOTPRINT = Footprint()


def device_estimate(profile: DeviceProfile, shape: ModelShape, rank: int, steps: int, batch: int,
                    seq: int, overhead_gb: float, fp: Footprint = NO_FOOTPRINT,
                    form: TrainForm = FP32, compression: str = "none", block: int = 64) -> tuple[float, float, float]:
    """(memory GB, seconds per step, seconds per round) for ``profile`` at ``rank``; ``form``: the
    torch trainer's dtype, quantized base and checkpointing (a device with another trainer has its own)."""
    held = max(rank, fp.hold_rank or 0)
    fold_bytes = sum(n * m for n, m in shape.adapted.values()) * DTYPE_BYTES[form.dtype] if fp.fold else 0
    parts = memory_bytes(shape, held, batch, seq, overhead_gb, profile.trainer, profile.trainer_base, form)
    mem = (sum(parts.values()) + fold_bytes) / GB
    gc = form.checkpointing and profile.trainer == "torch"
    step = step_flops(shape, held, batch, seq, gc) / (profile.compute_gflops * 1e9 * STEP_EFFICIENCY)
    if profile.trainer == "executorch":
        step *= EXECUTORCH_STEP_FACTOR
    return mem, step, transfer_seconds(profile, shape, rank, fp.down_rank, compression, block) + steps * step


def transfer_seconds(profile: DeviceProfile, shape: ModelShape, rank: int, down_rank: int | None = None,
                     compression: str = "none", block: int = 64) -> float:
    """Seconds to download the start adapter (rank ``down_rank``, default ``rank``) and upload the
    rank-``rank`` update, both under ``compression`` in blocks of ``block``."""
    down = adapter_bytes(shape, rank if down_rank is None else down_rank, compression, block) * 8
    up = adapter_bytes(shape, rank, compression, block) * 8
    return down / (profile.downlink_mbps * 1e6) + up / (profile.uplink_mbps * 1e6)


def plan_capacity(profile: DeviceProfile, shape: ModelShape, *, max_rank: int, steps: int, batch: int,
                  seq: int, deadline_s: float, overhead_gb: float, transfer_budget_s: float = float("inf"),
                  footprint: Footprint = NO_FOOTPRINT, form: TrainForm = FP32,
                  compression: str = "none", block: int = 64) -> Capacity:
    """The largest rank in 1..max_rank that fits memory, deadline and transfer budget; rank 0 with
    a reason if none.  ``footprint``: what the method adds (see :class:`Footprint`); ``form``: the
    torch trainer's dtype, quantized base and checkpointing (:class:`TrainForm`); ``compression``:
    the adapter's encoding on the wire in blocks of ``block`` (its bytes count in the transfer's time)."""
    down_rank = footprint.down_rank
    for rank in range(max_rank, 0, -1):
        mem, step, total = device_estimate(profile, shape, rank, steps, batch, seq, overhead_gb, footprint, form,
                                           compression, block)
        if (mem <= profile.memory_usable_gb and total <= deadline_s
                and transfer_seconds(profile, shape, rank, down_rank, compression, block) <= transfer_budget_s):
            return Capacity(profile.name, rank, mem, profile.memory_usable_gb, step, total, compression=compression)
    mem, step, total = device_estimate(profile, shape, 1, steps, batch, seq, overhead_gb, footprint, form, compression,
                                       block)
    reasons = []
    moving = transfer_seconds(profile, shape, 1, down_rank, compression, block)
    if moving > transfer_budget_s:
        what = "a rank-1 adapter" if down_rank is None else f"a rank-{down_rank} download and a rank-1 upload"
        reasons.append(f"moving {what}{'' if compression == 'none' else f' ({compression})'} takes {moving:.1f} s, "
                       f"budget {transfer_budget_s:.0f} s")
    if mem > profile.memory_usable_gb:
        reasons.append(f"needs {mem:.2f} GB at rank 1, {profile.memory_usable_gb:.2f} GB usable")
    if total > deadline_s:
        reasons.append(f"a round takes {total:.0f} s at rank 1, deadline {deadline_s:.0f} s")
    return Capacity(profile.name, 0, mem, profile.memory_usable_gb, step, total, "; ".join(reasons), compression)


def meta_shape(model_spec: str, target_modules: list[str] | None) -> ModelShape:
    """The model's shape without loading its weights (a meta-device instance from its config)."""
    from fedlora_edge.core.lora import adapted_modules
    from fedlora_edge.core.models import default_target_modules, load_config

    cfg = load_config(model_spec)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    targets = list(target_modules) if target_modules else default_target_modules(model)
    return ModelShape.from_model(model, adapted_modules(model, targets))
