"""Experiment tracking: ``--log tensorboard|mlflow`` on ``simulate``, ``emulate``, ``coordinator``
and ``compare``.

What is logged, at the round as step (the base model is step 0): the held-out loss, perplexity
and exact match, overall and per domain (``heldout/<metric>/overall``, ``heldout/<metric>/<domain>``), the mean training loss, valid updates
and the MB up and down of the round; and every client's every step's loss (``train_loss/<client>``,
at step ``(round - 1) x local steps + i``), from the device's report.  TensorBoard writes to
``OUT/tensorboard``; MLflow to ``$MLFLOW_TRACKING_URI`` where it is set, else a local file store
in ``OUT/mlruns`` (``mlflow ui --backend-store-uri OUT/mlruns``).
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("none", "tensorboard", "mlflow")


class Tracker:
    """One run's log in TensorBoard or MLflow."""

    def __init__(self, kind: str, out: Path, name: str, params: dict | None = None):
        if kind not in KINDS[1:]:
            raise ValueError(f"--log must be one of {', '.join(KINDS)}, not '{kind}'")
        self.kind = kind
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

    def scalars(self, values: dict[str, float], step: int) -> None:
        values = {k: float(v) for k, v in values.items() if v is not None}
        if self.kind == "tensorboard":
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)
        else:
            self._ml.log_metrics({k.replace("@", "_"): v for k, v in values.items()}, step=step)

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
        for c in cl:
            steps = c.get("losses") or []
            for i, loss in enumerate(steps):
                self.scalars({f"train_loss/{c['client']}": loss}, (r - 1) * len(steps) + i + 1)

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
        self.tracker.close()
        self.inner.status(f"logged to {self.tracker.kind}: {self.tracker.folder}")


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
