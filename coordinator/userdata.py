"""Reading a user's data: a JSONL pool, a folder of per-device JSONL files, or a Hugging Face
dataset (``datasets``: a ``save_to_disk`` folder, a json/jsonl/csv/parquet file, or a Hub id),
with ``data.columns`` mapping the fields to the user's column names.  Every row goes through
:func:`fedlora_edge.core.data.parse_row`, so the errors name the file (or dataset and split) and row.
"""

from __future__ import annotations

from pathlib import Path

from fedlora_edge.core.data import DataFormatError, Example, load_jsonl, parse_row

from .errors import ConfigError

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.dataset needs the datasets package: pip install datasets") from None
    datasets.disable_progress_bars()
    return datasets


def load_dataset_split(spec: str, split: str):
    """One split of a dataset: a ``save_to_disk`` folder, a data file, or a Hub id."""
    ds = _datasets()
    path = Path(spec)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = ds.load_from_disk(str(path))
            if isinstance(loaded, ds.DatasetDict):
                if split not in loaded:
                    raise ConfigError(f"data.dataset: {spec} has no split '{split}'; it has {', '.join(loaded)}")
                return loaded[split]
            return loaded
        if path.is_file():
            fmt = FILE_FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise ConfigError(f"data.dataset: {spec}: a data file must be {', '.join(FILE_FORMATS)}")
            return ds.load_dataset(fmt, data_files={split: str(path)}, split=split)
        if path.exists() or spec.startswith((".", "/")):
            raise ConfigError(f"data.dataset: {spec} is neither a save_to_disk folder nor a data file")
        from fedlora_edge.core.models import check_hub_reachable

        check_hub_reachable(spec, f"data.dataset {spec}", ConfigError)
        return ds.load_dataset(spec, split=split)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"data.dataset: {spec} split '{split}': {exc}") from None


def dataset_examples(spec: str, split: str, columns) -> list[Example]:
    """Every row of the split as an example; a column of ``columns`` the dataset does not have fails
    naming it and the dataset's columns."""
    rows = load_dataset_split(spec, split)
    names = list(getattr(rows, "column_names", None) or [])
    for f, c in (columns or {}).items():
        if names and c not in names:
            raise DataFormatError(f"{spec}[{split}]: no column {c!r} (data.columns.{f}); the dataset's columns: "
                                  f"{', '.join(names)}")
    out = [parse_row(row, f"{spec}[{split}] row {i}", columns) for i, row in enumerate(rows)]
    if not out:
        raise DataFormatError(f"{spec}[{split}]: no examples")
    return out


def load_user_data(d) -> tuple[list[Example], list[Example] | None, dict[str, list[Example]] | None, str]:
    """(pool, held-out examples or None when none were given, per-device examples or None, and
    the name of the source for messages) from a :class:`fedlora_edge.coordinator.config.DataConfig`."""
    cols = d.columns or None
    evals = load_jsonl(d.eval_file, cols) if d.eval_file else None
    if d.train_dir:
        folder = Path(d.train_dir)
        files = sorted(folder.glob("*.jsonl"))
        if not files:
            raise ConfigError(f"data.train_dir: {folder} holds no <device>.jsonl file")
        per_device = {f.stem: load_jsonl(f, cols) for f in files}
        return [ex for v in per_device.values() for ex in v], evals, per_device, f"data.train_dir {folder}"
    if d.dataset:
        pool = dataset_examples(d.dataset, d.dataset_split, cols)
        if d.eval_split:
            evals = dataset_examples(d.dataset, d.eval_split, cols)
        return pool, evals, None, f"data.dataset {d.dataset}"
    return load_jsonl(d.train_file, cols), evals, None, f"data.train_file {d.train_file}"
