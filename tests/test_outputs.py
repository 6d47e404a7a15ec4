"""The end-of-run outputs: crash-consistent under a full disk, and summarised for large fleets.

A run summary with fakes carries only what ``save_outputs`` reads; a run's "version" is stamped into every
output (the factors' values and rank, the sidecar's system prompt, the report, the plots), so a
folder that mixes two runs is seen.
"""

from __future__ import annotations

import errno
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fedlora_edge.coordinator import console, plots
from fedlora_edge.coordinator import report as rep
from fedlora_edge.coordinator.summary import RunSummary
from fedlora_edge.core import durable
from fedlora_edge.core.lora import to_state_dict, uniform_plan

DIMS = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 4)}
TARGETS = ["q_proj", "v_proj"]
CLIENTS = ["pi5", "orin", "phone"]  # phone's own model is a FedLEASE mixture (clients/phone/model)


def factors(version: int) -> dict:
    """Rank version + 1, every value ``version``: a file's rank and values both name its run."""
    r = version + 1
    return {m: (torch.full((r, n), float(version)), torch.full((o, r), float(version))) for m, (n, o) in DIMS.items()}


def small_report(version: int, clients: list[str] = CLIENTS, rounds: int = 2, steps: int = 3,
                 classes: int = 2) -> dict:
    doms = ["add", "upper"]

    def acc(k: float) -> dict:
        return {"overall": k, "per_domain": {d: k for d in doms},
                "loss": {"overall": 2 - k, "per_domain": {d: 2 - k for d in doms}}}

    recs = [{"round": r, "status": "ok", "skipped": [], "failed": [], "rejected": [],
             "accuracy": acc(version * r / 10),
             "clients": [{"client": c, "device": f"class-{i % classes}", "rank": 2 + i % 3,
                          "uplink_bytes": 1000 * (i + 1), "downlink_bytes": 4000,
                          "losses": [3.0 - 0.1 * s - 0.01 * i for s in range(steps)]}
                         for i, c in enumerate(clients)]}
            for r in range(1, rounds + 1)]
    return {"version": version, "method": "hetlora", "model": "tiny-llama", "base_accuracy": acc(0.0),
            "global_adapter_accuracy": recs[-1]["accuracy"], "personalised": {}, "rounds": recs,
            "fleet": [{"client": c, "profile": f"class-{i % classes}"} for i, c in enumerate(clients)]}


def fake_run(out: Path, version: int) -> RunSummary:
    mixture = uniform_plan(DIMS, 2, 2.0, experts={"count": 2, "own": 0})

    def personal_model(cid, ctx, state):
        if cid == "phone":
            return mixture, {"router": torch.full((3, 4), float(version))}, None
        return uniform_plan(DIMS, version + 1, 2.0), to_state_dict(factors(version)), None

    from fedlora_edge.coordinator.config import load_config

    return RunSummary(
        out=out, source=SimpleNamespace(kind="tiny", spec="tiny-llama"), targets=tuple(TARGETS), ctx=None,
        R=version + 1, method=SimpleNamespace(global_model=True, personal_model=personal_model),
        state=SimpleNamespace(global_factors=factors(version), method_state={}, rounds=[]), eval_examples=(),
        system_prompt=f"v{version}",
        cfg=load_config(overrides={"model": "tiny-llama", "lora.scale": 2.0, "data.system_prompt": f"v{version}"}),
        clients=tuple(SimpleNamespace(id=c, fleet_device=SimpleNamespace(profile=SimpleNamespace(name="phone")),
                                      planned=SimpleNamespace(rank=4)) for c in CLIENTS), device="cpu",
        lead="exact_match", lead_reason="", data_notes=(), pooled=False, participants=frozenset(CLIENTS),
        contaminated=frozenset(), base_accuracy=None, t_start=0.0)


def adapter_version(folder: Path) -> int:
    """The run an adapter folder is from, after checking its three files agree on it."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    values = {float(t.flatten()[0]) for t in tensors.values()}
    ranks = {t.shape[0] for k, t in tensors.items() if "lora_A" in k}
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg_ranks = set(cfg.get("rank_pattern", {}).values()) | {cfg["r"]}
    sidecar = json.loads((folder / "fedlora.json").read_text())
    assert len(values) == 1 and len(ranks) == 1, f"{folder}: factors of two runs"
    version = int(values.pop())
    assert ranks == {version + 1} and cfg_ranks == {version + 1}, f"{folder}: config and factors disagree"
    assert sidecar["system_prompt"] == f"v{version}", f"{folder}: sidecar from another run"
    return version


def mixture_version(folder: Path) -> int:
    meta = json.loads((folder / "mixture.json").read_text())
    assert meta["base_model"] == "tiny-llama"
    return int(load_file(str(folder / "mixture.safetensors"))["router"][0, 0])


def snapshot(out: Path) -> dict:
    """Each output's version (None: absent); the plots' bytes; every leftover name."""
    return {
        "adapter": adapter_version(out / "adapter") if (out / "adapter").exists() else None,
        "pi5": adapter_version(out / "clients/pi5/adapter") if (out / "clients/pi5/adapter").exists() else None,
        "orin": adapter_version(out / "clients/orin/adapter") if (out / "clients/orin/adapter").exists() else None,
        "phone": mixture_version(out / "clients/phone/model") if (out / "clients/phone/model").exists() else None,
        "report": json.loads((out / "report.json").read_text())["version"] if (out / "report.json").exists() else None,
        "plots": {p.name: p.read_bytes() for p in out.glob("*.png")},
        "names": sorted(str(p.relative_to(out)) for p in out.rglob("*")),
    }


class FakeFigure:
    """Renders as its name and run: the plot files' path through save_plots without matplotlib's
    half second per save (the real figures are checked below)."""

    def __init__(self, name: str, version: int):
        self.data = f"{name} of run {version}".encode()

    def savefig(self, buf, format: str, dpi: int) -> None:  # noqa: A002 - matplotlib's keyword
        buf.write(self.data)


def fake_figures(report: dict):
    for name in ("accuracy.png", "loss.png", "bytes.png"):
        yield name, FakeFigure(name, report["version"])


def count_calls(monkeypatch, name: str, fail_at: int | None = None) -> list:
    """Wrap ``os.<name>``; the ``fail_at``-th call (1-based) raises ENOSPC instead."""
    real = getattr(os, name)
    calls: list = []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if len(calls) == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, wrapped)
    return calls


@pytest.mark.parametrize("primitive", ["fsync", "replace"])
def test_a_full_disk_anywhere_in_save_outputs_leaves_each_output_old_or_new_never_a_mix(tmp_path, monkeypatch,
                                                                                        primitive):
    # Prepare: count the calls a clean save makes, so every one of them can be the one that fails
    out = tmp_path / "run"
    monkeypatch.setattr(plots, "plot_figures", fake_figures)
    with monkeypatch.context() as m:
        calls = count_calls(m, primitive)
        rep.save_outputs(fake_run(out, 1), small_report(1))
    n = len(calls)
    assert n >= 7  # a swap per adapter/model folder, the report, three plots
    old, new = ({n: f.data for n, f in fake_figures({"version": v})} for v in (1, 2))
    for k in range(1, n + 1):
        # Prepare: a complete previous run's outputs in place
        rep.save_outputs(fake_run(out, 1), small_report(1))
        # Execute: the k-th fsync / rename of the next run hits a full disk
        with monkeypatch.context() as m:
            count_calls(m, primitive, fail_at=k)
            with pytest.raises(OSError) as caught:
                rep.save_outputs(fake_run(out, 2), small_report(2))
        # Assert: the error is the disk's, unchanged; each output is the whole old or the whole new one
        assert caught.value.errno == errno.ENOSPC and "injected" in str(caught.value), k
        got = snapshot(out)
        models = [got[x] for x in ("adapter", "pi5", "orin", "phone")]
        assert set(models) <= {1, 2} and got["report"] in {1, 2}, (k, got)
        assert models == sorted(models, reverse=True), (k, models)  # written in order: new ones first
        if got["report"] == 2:  # a new report means every model it describes is new
            assert models == [2, 2, 2, 2], k
        assert {p: b in (old[p], new[p]) for p, b in got["plots"].items()} == dict.fromkeys(old, True), k
        assert not [x for x in got["names"] if ".tmp" in x], (k, got["names"])
    # Assert: with space again, the next save puts every output in new, and nothing else stays
    rep.save_outputs(fake_run(out, 2), small_report(2))
    got = snapshot(out)
    assert [got[x] for x in ("adapter", "pi5", "orin", "phone", "report")] == [2] * 5 and got["plots"] == new
    assert not [x for x in got["names"] if ".tmp" in x or ".old-" in x], got["names"]


def test_a_failure_on_a_fresh_folder_leaves_nothing_half_written(tmp_path, monkeypatch):
    # Prepare: no previous run; the 3rd fsync (inside the global adapter's folder) fails
    out = tmp_path / "run"
    monkeypatch.setattr(rep, "save_plots", lambda report, folder: None)
    with monkeypatch.context() as m:
        count_calls(m, "fsync", fail_at=3)
        # Execute
        with pytest.raises(OSError, match="injected"):
            rep.save_outputs(fake_run(out, 1), small_report(1))
    # Assert: no adapter folder, half or whole, and no temporary folder
    assert sorted(p.name for p in out.iterdir()) == []


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    # Prepare: an old folder, a complete new one beside it, and a rename that fails for the new one
    final, tmp = tmp_path / "adapter", tmp_path / "adapter.tmp-1"
    final.mkdir()
    (final / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    real = os.replace

    def replace(src, dst):
        if Path(src) == tmp:
            raise OSError(errno.ENOSPC, "no space for the new entry")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    # Execute
    with pytest.raises(OSError, match="no space for the new entry"):
        durable.replace_dir(tmp, final)
    # Assert: the old folder is back under its name, the new one untouched beside it
    assert (final / "a").read_text() == "old" and (tmp / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.tmp-1"]


# ------------------------------------------------------------------------------------ large fleets

def _legend(ax) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def test_a_large_fleet_is_plotted_as_loss_quantiles_and_bytes_per_device_class(tmp_path):
    # Prepare: 60 clients of 25 device classes, 3 rounds
    names = [f"dev-{i:03d}" for i in range(60)]
    report = small_report(1, names, rounds=3, steps=4, classes=25)
    # Execute
    figs = dict(plots.plot_figures(report))
    # Assert: a band and a median per round, two legend entries; bars per class, at most PLOT_CLASSES ticks
    loss_ax = figs["loss.png"].axes[1]
    assert len(loss_ax.lines) == 3 and len(loss_ax.collections) == 3
    assert sorted(_legend(loss_ax)) == ["10-90 % of clients", "median"] and "60 clients" in loss_ax.get_title()
    bytes_ax = figs["bytes.png"].axes[0]
    ticks = [t.get_text() for t in bytes_ax.get_xticklabels()]
    assert len(ticks) == plots.PLOT_CLASSES and ticks[-1].startswith("other (6 classes)")
    assert sum(int(t.split("\n")[1].split()[0]) for t in ticks) == 60  # every client in one bar
    assert _legend(bytes_ax) == ["uplink", "downlink"]
    plots.save_plots(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "bytes.png", "loss.png"]


def test_the_quantile_band_is_the_10th_to_90th_percentile_per_step():
    # Prepare: 21 clients whose step-s loss is 10 * s + i (i = 0..20): percentiles are hand-checkable
    names = [f"c{i:02d}" for i in range(21)]
    report = small_report(1, names, rounds=1, steps=2)
    for i, row in enumerate(report["rounds"][0]["clients"]):
        row["losses"] = [float(i), 10.0 + i]
    # Execute
    ax = dict(plots.plot_figures(report))["loss.png"].axes[1]
    # Assert: the median at 10 and 20; the band from the 10th (2) to the 90th (18) percentile, +10 at step 2
    assert list(ax.lines[0].get_xdata()) == [0.5, 1.0] and list(ax.lines[0].get_ydata()) == [10.0, 20.0]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == pytest.approx(2.0) and max(band) == pytest.approx(28.0)


def test_a_small_fleet_keeps_a_line_and_a_bar_per_client():
    # Prepare
    report = small_report(1)
    # Execute
    figs = dict(plots.plot_figures(report))
    # Assert
    assert _legend(figs["loss.png"].axes[1]) == CLIENTS
    assert [t.get_text() for t in figs["bytes.png"].axes[0].get_xticklabels()] == sorted(CLIENTS)


def _round_line(rec: dict) -> str:
    buf = io.StringIO()
    console.ConsoleReporter(Console(file=buf, width=10_000), progress_every=0).round_end(rec)
    return buf.getvalue()


def _rec(n_clients: int, n_failed: int = 0, rejected: list | None = None) -> dict:
    return {"round": 4, "status": "ok", "seconds": 1.0, "skipped": [], "rejected": rejected or [],
            "clients": [{"client": f"dev-{i}", "rank": 32 if i < n_clients // 4 else 8, "uplink_bytes": 1,
                         "downlink_bytes": 1, "loss_last": 1.0} for i in range(n_clients)],
            "failed": [{"client": f"gone-{i}", "reason": "deadline"} for i in range(n_failed)]}


def test_the_round_line_counts_a_large_round_per_rank_and_names_only_the_first_missing():
    # Execute
    line = _round_line(_rec(40, n_failed=30))
    # Assert
    assert "40 clients: r32 x10, r8 x30" in line and "dev-0:" not in line
    assert "missing 30: gone-0, gone-1, gone-2, gone-3, gone-4 and 25 more" in line and "gone-5" not in line


def test_the_round_line_of_a_small_round_names_every_client_and_its_rank():
    line = _round_line(_rec(4, n_failed=2))
    assert "dev-0:r32 dev-1:r8 dev-2:r8 dev-3:r8" in line and "missing 2: gone-0, gone-1" in line


def test_rejected_counts_every_refused_copy_in_the_round_line_and_the_report(monkeypatch):
    # Prepare: one entry standing for 3 refused copies, one from aggregation without a count
    rejected = [{"client": "a", "reason": "bad signature", "count": 3}, {"client": "b", "reason": "NaN"}]
    rec = _rec(2, rejected=rejected)
    import fedlora_edge.coordinator.contamination as contamination

    monkeypatch.setattr(contamination, "contamination_report", lambda *a: {})
    acc = {"overall": 0.5, "per_domain": {"add": 0.5}, "loss": {"overall": 1.0, "per_domain": {"add": 1.0}}}
    run = RunSummary(
        state=SimpleNamespace(rounds=[rec], method_state={}), clients=(), device="cpu", R=8, targets=tuple(TARGETS),
        cfg=SimpleNamespace(method="hetlora", model="tiny-llama", to_dict=dict, contamination=None),
        lead="exact_match", lead_reason="", data_notes=(), contaminated=frozenset(), pooled=False,
        participants=frozenset(), method=SimpleNamespace(summary=lambda state: {}), t_start=0.0, out=Path("."),
        source=None, ctx=None, system_prompt=None, eval_examples=(), base_accuracy=None)
    # Execute
    line = _round_line(rec)
    report = rep.build_report(run, acc, acc, {}, 0.5, 1.0)
    # Assert
    assert "rejected 4: bad signature" in line and report["totals"]["rejected_updates"] == 4
