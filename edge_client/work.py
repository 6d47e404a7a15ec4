"""One assignment: what a device does with a plan it received, in the simulator and on a device.

An assignment is the coordinator's JSON ``meta`` (plan, seed, training settings, LoRA targets)
plus the safetensors bytes of the factors to start from.  :func:`run_assignment` installs them,
trains, and returns the update's bytes and its JSON report.  ``fedlora simulate`` and the MQTT
edge client both call it, so the two paths train with the same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fedlora_edge.core.clip import clip_to_start, unit_norm
from fedlora_edge.core.compress import decode as decode_payload
from fedlora_edge.core.compress import encode as encode_payload
from fedlora_edge.core.data import Example, with_system
from fedlora_edge.core.lora import (
    ClientPlan,
    from_state_dict,
    get_factors,
    install_adapter,
    lora_config,
    slice_factors,
    to_state_dict,
)

from .experts import mixture_model, mixture_of
from .partial import (
    IMPORTANCE_PREFIX,
    PartialTraining,
    feedback_tag,
    folded,
    held_plan,
    split_update,
    update_reference,
)
from .trainer import TrainSettings, train_local

ADAPTER = "client"


def assignment_meta(*, round_idx: int, plan: ClientPlan, seed: int, settings: TrainSettings, targets: list[str],
                    dropout: float, model: str, system_prompt: str | None = None,
                    clip_norm: float | None = None, secagg: dict | None = None) -> dict:
    """The JSON a device needs, beside the start factors, to carry out one round.  ``system_prompt``
    is the run's, for the device's examples that carry none of their own; ``clip_norm`` (device-level
    DP) the norm its update is clipped to; ``secagg`` (secure aggregation) what its summed vector
    is: ``{"params", "dims", "rank", "weight"}`` (:func:`secure_vector`)."""
    meta = {"round": round_idx, "plan": plan.to_json(), "seed": seed, "model": model,
            "targets": list(targets), "dropout": dropout, "train": dataclasses.asdict(settings),
            "system_prompt": system_prompt}
    if clip_norm is not None:
        meta["privacy"] = {"clip_norm": clip_norm}
    if secagg is not None:
        meta["secagg"] = secagg
    return meta


def _needs_start(meta: dict) -> bool:
    """Whether what a device sends is computed from its change (a clip, or secure aggregation)."""
    return bool(meta.get("privacy") or meta.get("secagg"))


def secure_vector(meta: dict, tensors: dict, start: dict) -> bytes:
    """Under secure aggregation: the device's vector to sum (its weighted change in the global
    adapter's coordinates, its weight per component, and HAFL's weighted scores), encoded as
    little-endian 32-bit words (:mod:`fedlora_edge.core.secagg`), unmasked: the device's session
    masks it before it leaves."""
    from fedlora_edge.core.secagg import Params, contribution, encode

    sa = meta["secagg"]
    plan = ClientPlan.from_json(meta["plan"])
    factors, scores, _ = split_update(tensors)
    trained = from_state_dict(factors)
    begun = from_state_dict(start)
    changes = {m: ((a - begun[m][0]).numpy(), (b - begun[m][1]).numpy()) for m, (a, b) in trained.items()}
    vec = contribution(changes, {m: mp.components for m, mp in plan.modules.items()},
                       {m: (int(d[0]), int(d[1])) for m, d in sa["dims"].items()}, int(sa["rank"]),
                       float(sa["weight"]),
                       {m: (plan.scored(m), s.numpy()) for m, s in scores.items()} if plan.steps.importance else None)
    return encode(vec, Params.from_json(sa["params"])).astype("<u4").tobytes()


def wrap(model, meta: dict):
    """A peft model around ``model`` ready for assignments (the adapter is replaced per plan)."""
    from peft import get_peft_model

    plan = ClientPlan.from_json(meta["plan"])
    return get_peft_model(model, lora_config(plan, meta["targets"], meta["dropout"]), adapter_name=ADAPTER)


def trainer_of(meta: dict) -> str:
    """The backend an assignment is for: ``torch``, or ``executorch`` (``meta['trainer']``)."""
    return (meta.get("trainer") or {}).get("backend", "torch")


def run_assignment(peft_model, tokenizer, examples: Sequence[Example], meta: dict, start: bytes,
                   device="cpu", max_bytes: int | None = None, slowdown: float = 1.0,
                   programs=None, feedback: dict | None = None) -> tuple[bytes, dict]:
    """Install the start factors under the plan, train, and return ``(update bytes, report)``.

    The report is JSON: example count, steps, first/last loss, training seconds.  Plans that hold
    more than they train (``hold``/``frozen``) or score importance are handled as
    :mod:`fedlora_edge.edge_client.partial` describes; only the trained components go up.  A plan with
    ``experts`` (FedLEASE) trains the own expert and the router of :mod:`fedlora_edge.edge_client.experts`.
    An assignment for the ``executorch`` trainer runs the training program named by
    ``meta['trainer']['program']`` from ``programs`` (an :class:`fedlora_edge.edge_client.et_train.ProgramStore`);
    ``peft_model`` is not used then.

    Under ``meta['compression']`` (``transport.compression``) the start arrives encoded and the update
    goes back so, as its change from the start as decoded here (:mod:`fedlora_edge.core.compress`);
    ``feedback`` is the device's error feedback for int4, a dict kept across its rounds.
    """
    plan = ClientPlan.from_json(meta["plan"])
    received = decode_payload(start, max_bytes)
    sent = Sending(meta, received, feedback)
    settings = TrainSettings(**meta["train"])
    examples = with_system(examples, meta.get("system_prompt"))
    seed = int(meta["seed"])
    if trainer_of(meta) == "executorch":
        from .et_train import ProgramError, train_program

        if programs is None:
            raise ProgramError("an executorch assignment needs the device's training programs")
        tensors, res = train_program(programs.trainer(meta["trainer"]["program"]), tokenizer, examples, plan,
                                     received, settings, seed, slowdown)
        return _finish(meta, tensors, res, sent, start=received)
    from fedlora_edge.core.precision import base_form

    have, want = base_form(peft_model.get_base_model()), (settings.dtype, settings.base_quant)
    if have != want:
        raise ValueError(f"the base is loaded as train.dtype {have[0]}, train.base_quant {have[1]}; the plan asks "
                         f"for {want[0]}, {want[1]}")
    if mixture_of(plan) is not None:  # FedLEASE: own expert and router trained, other experts frozen
        with mixture_model(peft_model, ADAPTER, plan, received, meta["targets"], meta["dropout"]) as mix:
            assert mix is not None, "a plan with experts is routed"
            res = train_local(peft_model, tokenizer, examples, settings, seed, device, slowdown)
        # read after the peft layers are back in place (their state-dict keys are the wire's)
        return _finish(meta, {**to_state_dict(get_factors(peft_model, ADAPTER)), **mix.routers()}, res, sent)
    factors = from_state_dict(received)
    steps = plan.steps
    frozen = steps.frozen
    importance = steps.importance
    if frozen == "fold":
        with folded(peft_model, factors, plan):
            install_adapter(peft_model, ADAPTER, plan, slice_factors(factors, plan), meta["targets"],
                            meta["dropout"])
            hooks = PartialTraining(peft_model, ADAPTER, plan, False, importance) if importance else None
            res = train_local(peft_model, tokenizer, examples, settings, seed, device, slowdown, hooks)
        trained = get_factors(peft_model, ADAPTER)
        start_sd = to_state_dict(slice_factors(factors, plan)) if _needs_start(meta) else None
    else:
        # what it starts from, kept for the clip (device-level DP) before training moves anything
        start_sd = {k: v.clone() for k, v in received.items()} if _needs_start(meta) else None
        held = held_plan(plan)
        install_adapter(peft_model, ADAPTER, held, factors, meta["targets"], meta["dropout"])
        hooks = (PartialTraining(peft_model, ADAPTER, plan, frozen == "forward", importance)
                 if importance or frozen == "forward" else None)
        res = train_local(peft_model, tokenizer, examples, settings, seed, device, slowdown, hooks)
        trained = get_factors(peft_model, ADAPTER)
        if frozen == "forward":  # only the plan's components go up: so is the start they are clipped against
            trained = slice_factors(trained, plan)
            start_sd = to_state_dict(slice_factors(from_state_dict(start_sd), plan)) if start_sd is not None else None
    tensors = to_state_dict(trained)
    if hooks is not None:
        tensors.update(hooks.scores())
    return _finish(meta, tensors, res, sent, start=start_sd)


@dataclasses.dataclass
class Sending:
    """How an update goes back: the plan's ``compression`` (or none), the start as this device
    decoded it (its cut to the plan's components is a compressed update's reference), the device's
    error feedback (int4; kept per plan components, :func:`feedback_tag`).  HAFL's importance scores
    go plain (they are a few values, and must stay non-negative)."""

    meta: dict
    received: dict
    feedback: dict | None = None

    def encode(self, tensors: dict) -> bytes:
        import torch

        c = self.meta.get("compression")
        if not c:
            return encode_payload(tensors)
        plan = ClientPlan.from_json(self.meta["plan"])
        generator = torch.Generator().manual_seed(int(self.meta["seed"]) ^ 0x5EED) if c.get("stochastic") else None
        feedback = None
        if c.get("error_feedback") and self.feedback is not None:
            tag = feedback_tag(plan)
            for other in [t for t in self.feedback if t != tag]:  # other components: their residuals no longer apply
                del self.feedback[other]
            feedback = self.feedback.setdefault(tag, {})
        return encode_payload(tensors, c["codec"], block=int(c["block"]),
                              reference=update_reference(self.received, plan),
                              stochastic=bool(c.get("stochastic")), generator=generator, feedback=feedback,
                              plain=lambda k: k.startswith(IMPORTANCE_PREFIX))


def _finish(meta: dict, tensors: dict, res, sent: Sending | None = None, start: dict | None = None) -> tuple[bytes, dict]:
    report = {"round": meta["round"], "num_examples": res.num_examples, "steps": res.steps,
              "first_loss": res.first_loss, "last_loss": res.last_loss, "seconds": round(res.seconds, 3),
              "losses": [round(x, 5) for x in res.losses]}
    clip = (meta.get("privacy") or {}).get("clip_norm")
    if clip is not None:  # device-level DP: what goes up is the start plus the clipped change
        if start is None:
            raise ValueError("privacy.dp: this assignment's update has no start to clip against")
        scores = {k: tensors[k] for k in tensors if k.startswith(IMPORTANCE_PREFIX)}
        factors = {k: t for k, t in tensors.items() if k not in scores}
        tensors, norm = clip_to_start(factors, start, float(clip))
        tensors.update(unit_norm(scores))  # HAFL's scores: norm 1, the coordinator noises their sum
        report["dp_unclipped"] = norm <= float(clip)  # adaptive clipping counts these, with noise
    if meta.get("secagg"):
        if start is None:
            raise ValueError("secure aggregation: this assignment's update has no start to measure its change from")
        return secure_vector(meta, tensors, start), report
    return (sent or Sending(meta, {})).encode(tensors), report
