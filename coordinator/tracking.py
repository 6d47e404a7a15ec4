"""Experiment tracking: ``--log tensorboard|mlflow`` on ``simulate``, ``emulate``, ``coordinator``
and ``compare``.

What is logged, at the round as step (the base model is step 0): the held-out loss, perplexity
and exact match, overall and per domain (``heldout/<metric>/overall``, ``heldout/<metric>/<domain>``), the mean training loss, valid updates
and the MB up and down of the round; and every client's every step's loss (``train_loss/<client>``,
at step ``(round - 1) x local steps + i``), from the device's report.  TensorBoard writes to
``OUT/tensorboard``; MLflow to ``$MLFLOW_TRACKING_URI`` where it is set, else a local file store
in ``OUT/mlruns`` (``mlflow ui --backend-store-uri OUT/mlruns``: the full ``mlflow`` package; the
``mlflow-skinny`` that ``--log mlflow`` needs logs, but has no UI).

At the end of the run, once its outputs are written (:meth:`Tracker.outputs`): MLflow gets them as
the run's artifacts (``adapter/`` with its model card, ``report.json``, the plots under ``plots/``;
for a method without a global adapter, each client's folder under ``clients/`` up to
``ARTIFACT_CLIENTS`` clients), TensorBoard the plots as images (``plots/<name>``, at the last round).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

KINDS = ("none", "tensorboard", "mlflow")
PLOTS = ("accuracy.png", "loss.png", "bytes.png")
ARTIFACT_CLIENTS = 20  # past this many clients' own models, MLflow gets none of them (report.json says where)


class Tracker:
    """One run's log in TensorBoard or MLflow."""

    def __init__(self, kind: str, out: Path, name: str, params: dict | None = None):
        if kind not in KINDS[1:]:
            raise ValueError(f"--log must be one of {', '.join(KINDS)}, not '{kind}'")
        self.kind = kind
        self.out = Path(out)
        self.folder: Path | str  # where the log is: TensorBoard's folder, or MLflow's tracking URI
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.folder = Path(out) / "tensorboard"
            self._tb = SummaryWriter(str(self.folder))
            if params:
                self._tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())))
        else:
            try:
                import mlflow
            except ImportError:
                raise RuntimeError("--log mlflow needs mlflow: pip install mlflow-skinny (or mlflow)") from None
            self._ml = mlflow
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store needs no server
                mlflow.set_tracking_uri((Path(out) / "mlruns").resolve().as_uri())
            self.folder = mlflow.get_tracking_uri()
            mlflow.set_experiment("fedlora-edge")
            self._run = mlflow.start_run(run_name=name)
            if params:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def scalars(self, values: Mapping[str, float | None], step: int) -> None:
        """Log ``values`` at ``step``; a None (a figure the round does not have) is left out."""
        kept = {k: float(v) for k, v in values.items() if v is not None}
        if self.kind == "tensorboard":
            for k, v in kept.items():
                self._tb.add_scalar(k, v, step)
        else:
            self._ml.log_metrics({k.replace("@", "_"): v for k, v in kept.items()}, step=step)

    def evaluation(self, acc: dict, step: int) -> None:
        vals = {"heldout/exact_match/overall": acc.get("overall")}
        vals.update({f"heldout/exact_match/{d}": v for d, v in acc.get("per_domain", {}).items()})
        for key in ("loss", "perplexity", "rouge_l"):
            if key in acc:
                vals[f"heldout/{key}/overall"] = acc[key]["overall"]
                vals.update({f"heldout/{key}/{d}": v for d, v in acc[key]["per_domain"].items()})
        self.scalars(vals, step)

    def round(self, rec: dict) -> None:
        r = rec["round"]
        cl = rec["clients"]
        if rec.get("accuracy"):
            self.evaluation(rec["accuracy"], r)
        losses = [c["loss_last"] for c in cl if c.get("loss_last") is not None]
        self.scalars({"train/loss_last_mean": sum(losses) / len(losses) if losses else None,
                      "round/valid_updates": rec["valid_updates"],
                      "round/uplink_mb": sum(c["uplink_bytes"] for c in cl) / 1e6,
                      "round/downlink_mb": sum(c["downlink_bytes"] for c in cl) / 1e6,
                      "round/seconds": rec.get("seconds")}, r)
        if rec.get("privacy"):  # device-level DP: what the run has spent so far
            self.scalars({"privacy/epsilon": rec["privacy"]["epsilon"], "privacy/clip_norm": rec["privacy"]["clip_norm"]}, r)
        for c in cl:
            steps = c.get("losses") or []
            for i, loss in enumerate(steps):
                self.scalars({f"train_loss/{c['client']}": loss}, (r - 1) * len(steps) + i + 1)

    def outputs(self, step: int) -> list[str]:
        """Log the run's outputs in ``out`` (written by then): MLflow gets the adapter folder, the
        report and the plots as artifacts, TensorBoard the plots as images at ``step``.  Returns what
        was logged; an output that is absent (no global adapter, no plot) is skipped."""
        plots = [self.out / n for n in PLOTS if (self.out / n).is_file()]
        logged = []
        if self.kind == "tensorboard":
            import numpy as np
            from PIL import Image

            for path in plots:
                with Image.open(path) as img:
                    self._tb.add_image(f"plots/{path.stem}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
                logged.append(path.name)
            self._tb.flush()
            return logged
        if (self.out / "adapter").is_dir():
            self._ml.log_artifacts(str(self.out / "adapter"), artifact_path="adapter")
            logged.append("adapter")
        else:
            clients = sorted(p for p in (self.out / "clients").glob("*") if p.is_dir())
            if 0 < len(clients) <= ARTIFACT_CLIENTS:
                for folder in clients:
                    self._ml.log_artifacts(str(folder), artifact_path=f"clients/{folder.name}")
                logged.append("clients")
        if (self.out / "report.json").is_file():
            self._ml.log_artifact(str(self.out / "report.json"))
            logged.append("report.json")
        for path in plots:
            self._ml.log_artifact(str(path), artifact_path="plots")
            logged.append(path.name)
        return logged

    def close(self) -> None:
        if self.kind == "tensorboard":
            self._tb.close()
        else:
            self._ml.end_run()


class TrackingReporter:
    """A reporter that also logs to a :class:`Tracker`; everything else goes to ``inner``."""

    def __init__(self, inner, tracker: Tracker):
        self.inner, self.tracker = inner, tracker

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def base(self, acc, clients, global_rank) -> None:
        self.tracker.evaluation(acc, 0)
        self.inner.base(acc, clients, global_rank)

    def round_end(self, rec: dict) -> None:
        self.tracker.round(rec)
        self.inner.round_end(rec)

    def final(self, report: dict) -> None:
        self.inner.final(report)
        try:
            logged = self.tracker.outputs(len(report["rounds"]))
        finally:
            self.tracker.close()
        self.inner.status(f"logged to {self.tracker.kind}: {self.tracker.folder}"
                          + (f" (with {', '.join(logged)})" if logged else ""))


def tracked(reporter, kind: str, out: Path, cfg):
    """``reporter`` logging to ``kind`` as well (``none``: ``reporter`` itself)."""
    if kind in (None, "none"):
        return reporter
    name = f"{cfg.method}-{Path(out).name}"
    return TrackingReporter(reporter, Tracker(kind, Path(out), name, _flat(cfg.to_dict())))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
