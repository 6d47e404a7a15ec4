"""Export at the end of a run, one artifact per device class of the fleet.

A device class is what a profile's ``runtime`` and ``quant`` name: the export format
(``onnxruntime`` -> ONNX, ``executorch`` -> a ``.pte``) and the quantization the device can hold.
``--export`` on ``simulate``, ``emulate`` and ``coordinator`` writes ``OUT/export/<format>-<quant>/``
for each class present (artifact, tokenizer, ``export.json``, parity report) and
``OUT/export/index.json``: per class, its devices, artifact, size and parity.  A class whose
parity is broken is reported and the others are still exported; the command then exits 3.

Every class is a base and an update.  ONNX: the base (KV cache, quantized) is built once per
model, adapted modules, quantization and length and cached, and the update is the adapter file.
ExecuTorch: the base's weights are a ``.ptd`` and the update is the ``.pte`` (the program with the
adapter's LoRA branches).  The next run's export has the same base (the same ``base_sha256``), so
a device that holds it downloads only ``update_bytes``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ExportError

if TYPE_CHECKING:
    from fedlora_edge.core.profile import DeviceProfile

MODULES = {"onnx": ("onnxruntime", "onnx", "onnxruntime_genai"), "executorch": ("executorch", "torchao")}


def device_classes(devices: Iterable[tuple[str, DeviceProfile]]) -> dict[tuple[str, str], list[str]]:
    """(format, quant) -> device ids, from ``(id, profile)`` pairs, in a stable order."""
    out: dict[tuple[str, str], list[str]] = {}
    for did, profile in devices:
        out.setdefault(profile.export_class, []).append(did)
    return dict(sorted(out.items()))


def check_ready(method, classes: Iterable[tuple[str, str]]) -> None:
    """Fail before a run starts if its end-of-run export cannot happen: a method with no single
    global model, or a runtime's packages missing (the ``export`` extra)."""
    import importlib.util

    if not method.global_model:
        raise ExportError(f"--export: method {method.name} leaves no single global adapter to export "
                          "(its clients keep their own models)")
    for fmt in sorted({fmt for fmt, _ in classes}):
        missing = [m for m in MODULES[fmt] if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"--export: the fleet has {fmt} devices, and {', '.join(missing)} is not installed "
                              "(pip install '.[export]')")


def export_fleet(model_spec: str, adapter: str | Path, classes: dict[tuple[str, str], list[str]],
                 out: str | Path, log=print, max_seq_len: int = 256, per_task: int | None = None) -> list[dict]:
    """Export ``adapter`` on ``model_spec`` for every class; returns the index rows."""
    from .build import export
    from .parity import PROMPTS_PER_TASK, ParityError, parity_report

    per_task = per_task or PROMPTS_PER_TASK

    out = Path(out)
    rows = []
    for (fmt, quant), devices in classes.items():
        folder = out / f"{fmt}-{quant}"
        log(f"exporting {fmt} {quant} for {', '.join(devices)}")
        row: dict[str, Any] = {"format": fmt, "quant": quant, "devices": devices, "folder": folder.name}
        try:
            artifact, meta, reference, tok = export(model_spec, adapter, fmt, quant, folder, max_seq_len, log=log)
            row.update(artifact=f"{folder.name}/{artifact.name}", skipped_layers=meta["skipped_layers"])
            try:
                rep = parity_report(reference, tok, artifact, meta, per_task=per_task, threads=1, log=log)
                row["parity"] = "ok"
            except ParityError:
                rep = json.loads((folder / "parity.json").read_text())
                row["parity"] = f"broken: {'; '.join(rep['failures'])} (report: {folder / 'parity.md'})"
            row.update(size_bytes=rep["size_bytes"], max_abs_logits_diff=rep["max_abs_logits_diff"],
                       top1_agreement=rep["top1_agreement"], base_sha256=meta.get("base_sha256"),
                       update_bytes=meta.get("adapter_bytes", rep["size_bytes"]),
                       accuracy_torch=rep["accuracy_torch"]["overall"],
                       accuracy_artifact=rep["accuracy_artifact"]["overall"])
        except ExportError as exc:
            row["parity"] = f"not exported: {exc}"
        except Exception as exc:  # noqa: BLE001 - one class failing must not stop the others or the index
            row["parity"] = f"not exported: {type(exc).__name__}: {str(exc)[:300]}"
        log(f"  {fmt} {quant}: {row['parity']}")
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").write_text(json.dumps({"model": model_spec, "adapter": str(adapter), "classes": rows},
                                               indent=1))
    return rows
