"""A run's outputs from a :class:`RunSummary` built by hand: the report dict, the output files and
the plots come without any engine, and the output modules never import it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from fedlora_edge.coordinator import plots
from fedlora_edge.coordinator.config import load_config
from fedlora_edge.coordinator.fleetplan import method_context
from fedlora_edge.coordinator.methods import get_method
from fedlora_edge.coordinator.report import build_report, save_outputs
from fedlora_edge.coordinator.runstate import RunState
from fedlora_edge.coordinator.summary import RunSummary
from fedlora_edge.core.models import resolve_model

DIMS = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 4)}


def _acc(k: float) -> dict:
    return {"overall": k, "per_domain": {"add": k, "upper": k},
            "loss": {"overall": 2 - k, "per_domain": {"add": 2 - k, "upper": 2 - k}}}


def _client(cid: str, rank: int) -> SimpleNamespace:
    capacity = SimpleNamespace(rank=rank, memory_gb=1.23456, usable_gb=4.0, round_s=12.34, reason="" if rank else "x")
    device = SimpleNamespace(profile=SimpleNamespace(name=f"class-{cid}"))
    return SimpleNamespace(id=cid, device=device, fleet_device=device, capacity=capacity, planned=capacity,
                           examples=8, mix={"add": 2 / 3, "upper": 1 / 3})


def summary(out: Path) -> RunSummary:
    """Two devices that train and one that cannot; one round of FedIT at rank 4."""
    cfg = load_config(overrides={"model": "tiny-llama", "method": "fedit", "lora.rank": 4, "lora.scale": 2.0})
    method = get_method(cfg.method)
    ctx = method_context(cfg, DIMS)
    r = method.global_rank(ctx)
    factors = {m: (torch.full((r, n), 0.5), torch.full((o, r), 0.25)) for m, (n, o) in DIMS.items()}
    rounds = [{"round": 1, "status": "ok", "skipped": [], "failed": [], "rejected": [], "valid_updates": 2,
               "accuracy": _acc(0.5), "seconds": 1.0,
               "clients": [{"client": c, "device": f"class-{c}", "rank": r, "uplink_bytes": 100, "downlink_bytes": 200,
                            "losses": [2.0, 1.5], "loss_last": 1.5} for c in ("a", "b")]}]
    return RunSummary(
        cfg=cfg, out=out, source=resolve_model("tiny-llama"), device="cpu", method=method, ctx=ctx, R=r,
        targets=("q_proj", "v_proj"), system_prompt="be brief", lead="exact_match", lead_reason="set by hand",
        data_notes=("a note",), clients=(_client("a", 4), _client("b", 4), _client("c", 0)), pooled=False,
        participants=frozenset({"a", "b"}), contaminated=frozenset(), eval_examples=(),
        state=RunState(factors, {}, rounds), base_accuracy=_acc(0.25), t_start=0.0)


def test_a_summary_built_by_hand_gives_the_report_without_an_engine(tmp_path):
    # Prepare
    run = summary(tmp_path)
    final = run.state.rounds[-1]["accuracy"]
    # Execute
    report = build_report(run, run.base_accuracy, final, {}, 0.5, 1.5)
    # Assert: what the summary holds, as report.json carries it
    assert (report["method"], report["model"], report["device"], report["global_rank"]) == ("fedit", "tiny-llama",
                                                                                           "cpu", 4)
    assert report["target_modules"] == ["q_proj", "v_proj"] and report["data_notes"] == ["a note"]
    assert [(f["client"], f["eligible"], f["capacity"]) for f in report["fleet"]] == [("a", True, 4), ("b", True, 4),
                                                                                     ("c", False, 0)]
    assert report["fleet"][0]["predicted_memory_gb"] == 1.235 and report["fleet"][0]["domain_mix"]["add"] == 0.667
    assert report["metrics"]["lead"] == "exact_match" and report["metrics"]["reason"] == "set by hand"
    assert report["rounds"] is run.state.rounds and report["totals"]["uplink_bytes"] == 200
    assert report["final_accuracy"]["evaluated"] == "the global adapter" and report["contamination"]["clients"] == []
    assert json.loads(json.dumps(report))["config"]["method"] == "fedit"


def test_a_summary_built_by_hand_writes_the_adapter_the_report_and_the_plots(tmp_path):
    # Prepare
    run = summary(tmp_path / "out")
    report = build_report(run, run.base_accuracy, run.state.rounds[-1]["accuracy"], {}, 0.5, 1.5)
    # Execute
    save_outputs(run, report)
    # Assert: the global adapter with its card and sidecar, the report as built, the three plots
    out = run.out
    assert json.loads((out / "report.json").read_text())["global_rank"] == 4
    sidecar = json.loads((out / "adapter" / "fedlora.json").read_text())
    assert sidecar["system_prompt"] == "be brief" and sidecar["model"] == "tiny-llama"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    assert "global rank R = 4" in (out / "adapter" / "README.md").read_text()
    assert sorted(p.name for p in out.glob("*.png")) == ["accuracy.png", "bytes.png", "loss.png"]
    assert [name for name, _ in plots.plot_figures(report)] == ["accuracy.png", "loss.png", "bytes.png"]


def test_the_output_modules_never_import_the_engine():
    # Execute: import every output module (and the console's plan table) in a fresh interpreter
    code = ("import sys\n"
            "import fedlora_edge.coordinator.report, fedlora_edge.coordinator.console, fedlora_edge.coordinator.plots\n"
            "print(sorted(m for m in sys.modules if m.endswith('coordinator.engine')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # Assert
    assert out.strip() == "[]"
