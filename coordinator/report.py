"""Outputs of a run: the report dict (``report.json``), the adapters in peft's format (the global
one, each client's own, a round's checkpoint), and the files they go to; all from a
:class:`~.summary.RunSummary`, never the engine.  The plots are :mod:`.plots`', the console
:mod:`.console`'s.

Every output file and folder is written new and renamed into place (``fedlora_edge.core.durable``), so a
full disk or a crash while a run's outputs are written leaves each output either as it was or
complete, never half-written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedlora_edge.core import durable
from fedlora_edge.core.lora import Factors, adapter_config_json, to_state_dict
from fedlora_edge.core.wire import write_factors_file

from .plots import save_plots
from .summary import RunSummary


def save_adapter(folder: Path, factors: Factors, scale: float, targets: list[str], base_model: str,
                 model_spec: str | None = None, system_prompt: str | None = None, *,
                 local_base: str | None = None, card: str | None = None) -> None:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` that stock
    ``peft.PeftModel.from_pretrained(base, folder)`` loads (per-module ranks via rank_pattern), and
    ``AutoPeftModelForCausalLM.from_pretrained(folder)`` where ``base_model`` is what transformers
    loads (a run's adapters name the public Hub id of a known base: :func:`fedlora_edge.core.models.public_reference`);
    ``fedlora.json`` keeps the run's model spec, its system prompt (for ``fedlora export`` and
    ``generate``) and ``base_local``, the base as transformers loads it where the run ran
    (``local_base``; default ``base_model``); ``card``, where given, is the folder's ``README.md``
    (:mod:`.modelcard`).

    The folder is written whole: built beside ``folder``, fsynced, then swapped in by a rename
    (:func:`fedlora_edge.core.durable.new_dir`), so it holds either its previous content or the complete
    new adapter, never a mix; it is replaced as a whole (files of other kinds in it go with the old
    version).  An OSError (a full disk) propagates unchanged, with ``folder`` as it was and the
    temporary folder removed."""
    from fedlora_edge.core.models import ADAPTER_SIDECAR

    dims = {m: (a.shape[1], b.shape[0]) for m, (a, b) in factors.items()}
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    cfg = adapter_config_json(dims, ranks, scale, targets, base_model)
    with durable.new_dir(folder) as tmp:  # plain writes: the folder is fsynced whole before the swap
        write_factors_file(tmp / "adapter_model.safetensors", to_state_dict(factors))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
        (tmp / ADAPTER_SIDECAR).write_text(json.dumps({"model": model_spec or base_model,
                                                        "system_prompt": system_prompt,
                                                        "base_local": local_base or base_model}, indent=1))
        if card is not None:
            (tmp / "README.md").write_text(card)


def save_checkpoint(s: RunSummary, round_idx: int) -> Path:
    """The global adapter of run ``s`` after round ``round_idx`` as a peft checkpoint,
    ``OUT/checkpoints/round-NNNN/`` (the files of the final ``adapter/``, its model card saying what
    is known at that round), written whole like every adapter (:func:`save_adapter`); returns the
    folder.  An OSError propagates unchanged (the caller says what it means for the run)."""
    from fedlora_edge.core.models import base_reference, public_reference

    from .modelcard import model_card

    folder = s.out / "checkpoints" / f"round-{round_idx:04d}"
    public = public_reference(s.source)
    evaluated = [r for r in s.state.rounds if r["round"] <= round_idx and r.get("accuracy")]
    acc, at = (evaluated[-1]["accuracy"], evaluated[-1]["round"]) if evaluated else (None, None)
    card = model_card(s, public, round_idx=round_idx, acc=acc, acc_round=at, base=s.base_accuracy)
    save_adapter(folder, s.state.global_factors, s.cfg.lora.scale, list(s.targets), public, s.cfg.model,
                 s.system_prompt, local_base=base_reference(s.source), card=card)
    return folder


def build_report(s: RunSummary, base: dict, final: dict, personal: dict, own_mix: float,
                 own_mix_loss: float) -> dict:
    """The run's report (report.json) from run ``s`` at its end: ``base``, ``final`` and
    ``personal`` are the base model's, the global adapter's and the clients' own models' held-out
    figures ({} where the method keeps none); ``own_mix`` and ``own_mix_loss`` the headline's on
    each client's own domain mix."""
    from fedlora_edge.core import __version__

    from .contamination import contamination_report
    from .evaluate import perplexity

    rounds = s.state.rounds
    headline = personal if personal else final
    return {
        "fedlora_edge_version": __version__,
        "method": s.cfg.method, "model": s.cfg.model, "device": s.device,
        "config": s.cfg.to_dict(), "global_rank": s.R, "target_modules": list(s.targets),
        "fleet": [{"client": c.id, "profile": c.fleet_device.profile.name, "capacity": c.planned.rank,
                   "predicted_memory_gb": round(c.planned.memory_gb, 3),
                   "usable_memory_gb": c.planned.usable_gb,
                   "predicted_round_seconds": round(c.planned.round_s, 1),
                   "reason": c.planned.reason, "eligible": s.pooled or c.id in s.participants,
                   "train_examples": c.examples,
                   "domain_mix": {k: round(v, 3) for k, v in c.mix.items()}} for c in s.clients],
        "metrics": {"lead": s.lead, "reason": s.lead_reason,
                    "loss": "held-out negative log-likelihood per response token (nats), teacher-forced; "
                            "overall is the mean over domains; perplexity is exp(loss)",
                    "exact_match": "greedy answer of at most max_new_tokens tokens equals the reference"},
        "data_notes": list(s.data_notes),
        "base_accuracy": base,
        "rounds": rounds,
        "final_accuracy": {"overall": headline["overall"], "per_domain": headline["per_domain"],
                           "own_mix": own_mix, "loss": headline["loss"], "own_mix_loss": own_mix_loss,
                           "perplexity": perplexity(headline["loss"]),
                           **({"rouge_l": headline["rouge_l"]} if "rouge_l" in headline else {}),
                           **({"backdoor": headline["backdoor"]} if "backdoor" in headline else {}),
                           **({"per_example": headline["per_example"]} if "per_example" in headline else {}),
                           "evaluated": "each client's own adapter" if personal else "the global adapter"},
        "global_adapter_accuracy": final,
        "personalised": personal,
        "totals": {"uplink_bytes": sum(r["uplink_bytes"] for x in rounds for r in x["clients"]),
                   "downlink_bytes": sum(r["downlink_bytes"] for x in rounds for r in x["clients"]),
                   **wire_ratios(rounds),
                   "failed_rounds": sum(x["status"] == "failed" for x in rounds),
                   # an entry may stand for several refused copies (``count``; absent: one)
                   "rejected_updates": sum(x.get("count", 1) for r in rounds for x in r["rejected"])},
        "contamination": contamination_report(s.cfg.contamination, s.contaminated, s.clients, rounds, final, personal),
        "method_summary": s.method.summary(s.state.method_state),
        **({"privacy": s.privacy} if s.privacy is not None else {}),
        "wall_seconds": round(time.perf_counter() - s.t_start, 1),
    }


def wire_ratios(rounds: list[dict]) -> dict:
    """What went on the wire against the same tensors in float32 (the payloads' bytes, framing
    aside), up and down: 1.0 without ``transport.compression``; and each encoding's device count."""
    rows = [r for x in rounds for r in x["clients"] if r.get("tensor_bytes") and r.get("uplink_bytes")]
    if not rows:  # nothing went on the wire (a centralized run, or no update came back)
        return {"uplink_vs_fp32": None, "downlink_vs_fp32": None, "compression": {}}
    up = sum(r["uplink_bytes"] for r in rows) / max(1, sum(r["tensor_bytes"] for r in rows))
    down = sum(r["downlink_bytes"] for r in rows) / max(1, sum(r.get("downlink_tensor_bytes") or 0 for r in rows))
    codecs: dict[str, set] = {}
    for r in rows:
        codecs.setdefault(r.get("compression", "none"), set()).add(r["client"])
    return {"uplink_vs_fp32": round(up, 4), "downlink_vs_fp32": round(down, 4),
            "compression": {c: len(v) for c, v in sorted(codecs.items())}}


def write_report(out: Path, report: dict) -> None:
    """``report.json`` in ``out``, written new, fsynced and renamed into place: it is either the
    previous report or the complete new one.  An OSError propagates unchanged."""
    durable.write_bytes(out / "report.json", json.dumps(report, indent=1).encode())


def save_outputs(s: RunSummary, report: dict) -> None:
    """Everything a run leaves in its output folder: the global adapter (``adapter/``), each
    client's model (``clients/<id>/adapter`` or ``clients/<id>/model``), ``report.json``, the plots.

    Each folder is built whole beside its place and swapped in, and each file written new and
    renamed into place (``fedlora_edge.core.durable``), in this order: the adapters and client models,
    then the report, then the plots; so a ``report.json`` in place means every model it describes
    is complete.  An OSError (a full disk) propagates unchanged at the first output that fails:
    the outputs before it are new and complete, that one is whole, old or new (new only when the
    fsync after its rename failed), those after it are as they were (the previous run's, or
    absent), and its temporary file or folder is removed (best effort)."""
    from fedlora_edge.core.lora import from_state_dict
    from fedlora_edge.core.models import base_reference, public_reference
    from fedlora_edge.edge_client.experts import mixture_of, save_mixture

    from .modelcard import model_card

    s.out.mkdir(parents=True, exist_ok=True)
    base, local = public_reference(s.source), base_reference(s.source)
    targets = list(s.targets)
    done = len(report["rounds"])
    if s.method.global_model:
        card = model_card(s, base, round_idx=done, acc=report["global_adapter_accuracy"], acc_round=done,
                          base=report["base_accuracy"], final=True)
        save_adapter(s.out / "adapter", s.state.global_factors, s.cfg.lora.scale, targets, base,
                     s.cfg.model, s.system_prompt, local_base=local, card=card)
    own_figures = (report.get("personalised") or {}).get("clients") or {}
    for c in s.clients:
        own = s.method.personal_model(c.id, s.ctx, s.state.method_state)
        if own is None:
            continue
        plan, tensors, _ = own
        folder = s.out / "clients" / c.id
        if mixture_of(plan) is not None:
            with durable.new_dir(folder / "model") as tmp:
                save_mixture(tmp, plan, tensors, s.cfg.model, targets)
        else:
            card = model_card(s, base, round_idx=done, acc=own_figures.get(c.id), acc_round=done,
                              base=report["base_accuracy"], client=c.id, final=True)
            save_adapter(folder / "adapter", from_state_dict(tensors), s.cfg.lora.scale, targets, base,
                         s.cfg.model, s.system_prompt, local_base=local, card=card)
    from .faults import crash_point

    crash_point("outputs")  # the tests kill the process here: the models are new, the report not yet
    write_report(s.out, report)
    save_plots(report, s.out)
