"""Watching a run and the training knobs: per-step losses, TensorBoard and MLflow logs, progress
in a log file, quiet third-party output, --version and help; learning-rate warm-up and schedule,
gradient accumulation; and adapters that stock transformers + peft load, and export reads."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedlora_edge.coordinator.cli import main
from fedlora_edge.coordinator.config import ConfigError, load_config
from fedlora_edge.coordinator.simulate import Simulation
from fedlora_edge.edge_client.trainer import train_steps

ROOT = Path(__file__).resolve().parent.parent
FAST = {"model": "tiny-llama", "method": "fedit", "rounds": 2, "clients_per_round": 2, "train.steps": 3,
        "train.batch_size": 4, "data.eval_per_domain": 2, "data.samples_per_client": 8,
        "data.tasks": ["add", "upper"], "max_new_tokens": 2, "lora.rank": 2, "lora.max_rank": 4}


class _Quadratic(torch.nn.Module):
    """loss = mean over the batch of (w - x)^2, so gradients are known in closed form."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return type("Out", (), {"loss": ((self.w - x) ** 2).mean()})()


def _run_steps(steps, batches, **kw):
    m = _Quadratic()
    it = iter({"x": torch.tensor(b)} for b in batches)
    losses = train_steps(m, [m.w], it, steps, lr=0.1, grad_clip=0.0, optimizer="sgd", **kw)
    return float(m.w.detach()), losses


def test_warm_up_starts_at_a_zero_rate_and_a_linear_schedule_decays_to_zero():
    w, losses = _run_steps(1, [[1.0]], warmup_steps=1, schedule="constant")
    assert w == 0.0 and losses == [1.0]  # the first step of a warm-up has rate 0
    w_lin, _ = _run_steps(2, [[1.0], [1.0]], schedule="linear")  # rates 0.1 then 0.05
    assert w_lin == pytest.approx(0.2 + 0.05 * 2 * (1 - 0.2))


def test_gradient_accumulation_steps_on_the_mean_of_its_batches():
    w, losses = _run_steps(1, [[1.0], [3.0]], grad_accum=2)
    assert w == pytest.approx(0.1 * (2 * 1.0 + 2 * 3.0) / 2)  # SGD on the mean gradient
    assert losses == [pytest.approx((1.0 + 9.0) / 2)]


def test_executorch_devices_refuse_a_schedule_before_the_run(tmp_path):
    cfg = load_config(overrides={**FAST, "fleet": "edge-runtimes", "train.lr_schedule": "cosine",
                                 "train.optimizer": "sgd"})
    with pytest.raises(ConfigError, match="executorch.*constant rate.*cosine"):
        Simulation(cfg, tmp_path)


@pytest.mark.integration
def test_a_run_logs_per_step_losses_to_the_report_tensorboard_and_the_loss_plot(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["simulate", "--config", str(_cfg_file(tmp_path)), "--out", str(tmp_path / "out"),
                 "--log", "tensorboard"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = [c for r in report["rounds"] for c in r["clients"]]
    assert rows and all(len(c["losses"]) == 3 and c["losses"][-1] == pytest.approx(c["loss_last"], abs=1e-4)
                        for c in rows)
    assert report["metrics"]["lead"] == "exact_match" and "loss" in report["final_accuracy"]
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    acc = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"heldout/loss/overall", "heldout/loss/add", "heldout/exact_match/overall", "round/uplink_mb"} <= tags
    client = rows[0]["client"]
    steps = [e.step for e in acc.Scalars(f"train_loss/{client}")]
    assert len(steps) == 3 * sum(c["client"] == client for c in rows)
    assert [e.step for e in acc.Scalars("heldout/loss/overall")] == [0, 1, 2]
    # the plots as images, at the last round, the same pictures as the files
    assert set(acc.Tags()["images"]) == {"plots/accuracy", "plots/loss", "plots/bytes"}
    from PIL import Image

    (image,) = acc.Images("plots/loss")
    with Image.open(tmp_path / "out" / "loss.png") as png:
        assert image.step == 2 and (image.width, image.height) == png.size


@pytest.mark.integration
def test_a_run_logs_to_a_local_mlflow_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["simulate", "--config", str(_cfg_file(tmp_path)), "--out", str(tmp_path / "out"),
                 "--log", "mlflow"]) == 0
    client = mlflow.tracking.MlflowClient((tmp_path / "out" / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora-edge").experiment_id])
    history = client.get_metric_history(run.info.run_id, "heldout/loss/overall")
    assert [m.step for m in history] == [0, 1, 2] and run.data.params["method"] == "fedit"
    # the run's outputs as artifacts: the adapter (with its model card), the report and the plots
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"adapter", "plots", "report.json"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} == {
        f"adapter/{n}" for n in ("adapter_config.json", "adapter_model.safetensors", "fedlora.json", "README.md")}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/accuracy.png", "plots/loss.png", "plots/bytes.png"}
    got = Path(client.download_artifacts(run.info.run_id, "report.json", str(tmp_path / "dl")))
    assert json.loads(got.read_text()) == json.loads((tmp_path / "out" / "report.json").read_text())


def _cfg_file(tmp_path):
    import yaml

    tree: dict = {}
    for k, v in FAST.items():
        node = tree
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_progress_reads_in_a_log_file_a_line_per_client_and_a_heartbeat():
    import threading

    from rich.console import Console

    from fedlora_edge.coordinator.console import ConsoleReporter

    buf = io.StringIO()
    rep = ConsoleReporter(Console(file=buf, width=120), progress_every=0.01)
    rep.round_start(3, 2)
    seen = threading.Event()
    for _ in range(2000):  # the heartbeat thread writes on its own; wait for its line
        if "clients in after" in buf.getvalue():
            seen.set()
            break
        seen.wait(0.005)
    rep.client_done("pi5", {"first_loss": 2.0, "last_loss": 1.5}, 4)
    rec = {"round": 3, "clients": [], "skipped": [], "rejected": [], "status": "ok", "seconds": 1.0,
           "valid_updates": 1}
    rep.round_end(rec)
    out = buf.getvalue()
    assert seen.is_set() and "round 3: 0/2 clients in after" in out
    assert "round 3 [1/2] pi5: r=4 loss 2.00->1.50" in out


def test_version_and_every_run_flag_says_its_default(capsys):
    from fedlora_edge.core import __version__
    from fedlora_edge.edge_client.cli import main as fedlora

    assert fedlora(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedlora-edge {__version__}"
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--rounds", "5"), ("--seed", "0"), ("--clients-per-round", "4"), ("--local-steps", "10"),
                          ("--method", "hetlora"), ("--log", "none")):
        assert f"{flag}" in text and f"(default: {default}" in text.split(flag, 2)[-1][:400], flag


@pytest.mark.integration
def test_third_party_noise_is_off_unless_verbose(tmp_path):
    cmd = [sys.executable, "-m", "fedlora_edge.coordinator.cli", "simulate", "--config", str(_cfg_file(tmp_path)),
           "--rounds", "1", "--out", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "FEDLORA_VERBOSE"}
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert quiet.returncode == 0, quiet.stderr
    for noise in ("FutureWarning", "Failed to load", "_pytree"):
        assert noise not in quiet.stderr + quiet.stdout
    loud = subprocess.run(cmd + ["--verbose"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert loud.returncode == 0 and "FutureWarning" in loud.stderr


@pytest.mark.integration
def test_an_adapter_loads_with_auto_peft_and_export_reads_its_base(tmp_path, tiny):
    from peft import AutoPeftModelForCausalLM

    from fedlora_edge.core.models import adapter_base
    from fedlora_edge.export.build import ExportError, merged_model

    model, tok = tiny
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    cfg = load_config(overrides={**FAST, "model": str(base_dir), "rounds": 1})
    Simulation(cfg, tmp_path / "out").run()
    adapter = tmp_path / "out" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).merge_and_unload()
    ours, _ = merged_model(str(base_dir), adapter)
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(loaded(x).logits, ours(x).logits, atol=1e-5)
    assert adapter_base(adapter) == str(base_dir)
    with pytest.raises(ExportError, match=f"trained on {base_dir}.*give --model"):
        merged_model("tiny-llama-4l", adapter)
