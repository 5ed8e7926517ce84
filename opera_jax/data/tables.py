"""Rows from columnar sources: Parquet files, Hugging Face datasets on disk, TFDS from a
local data_dir. Each reader yields the rows as Python dicts to `schema.validate_rows`, so the
published forms are mapped and every error names the file (or dataset and split), the row
and the field:

    /data/rl.parquet row 17: field 'reward_model.ground_truth' is missing
    hf:/data/rl_ds:train row 3: missing field 'prompt'

The libraries are optional (`pip install -e ".[data]"`) and imported only when such a source
is read. Rows are read whole into memory, validated, like JSONL: right for prompt sets and
cold-start SFT sets; convert larger ones to ArrayRecord (data/records.py).

Hugging Face: never the Hub. `hf:PATH[:SPLIT]` is a directory written by `save_to_disk` (a
Dataset, or a DatasetDict whose split is chosen; default "train" or its only split), or local
data files (paths, globs, commas) read by the packaged builder of their suffix.
TFDS: `tfds:NAME[/CONFIG][:SPLIT]` (split default "train") prepared in ArrayRecord format
under `data.tfds_data_dir`, else $TFDS_DATA_DIR; never downloaded. TensorFlow is not needed.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from opera_jax.config.sections import OnBadRow
from opera_jax.data.jsonl import expand_paths
from opera_jax.data.schema import Rows, validate_rows

PARQUET_SUFFIX = ".parquet"
HF_SCHEME = "hf:"
TFDS_SCHEME = "tfds:"
# Suffix of a local data file -> the `datasets` packaged builder that reads it.
HF_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
               ".arrow": "arrow"}


def _need(module: str, extra: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ImportError(f"reading {what} needs the '{module}' package: "
                          f"pip install -e \".[{extra}]\"") from None


def read_parquet(path: str, *, required: Sequence[str] = (),
                 on_error: OnBadRow | str = OnBadRow.RAISE) -> Rows:
    """The rows of one Parquet file (nested columns become dicts and lists), validated.

    Raises:
      BadRowError: as `schema.validate_rows`, the row numbered from 1 in file order.
    """
    pq = _need("pyarrow.parquet", "data", f"{path!r}")

    def items():
        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield path, n, row, None

    return validate_rows(path, items(), unit="row", required=required, on_error=on_error)


def split_spec(spec: str) -> tuple[str, str | None]:
    """`PATH[:SPLIT]` → (path, split or None); a path that exists as written keeps its
    colons."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, split = spec.rsplit(":", 1)
    return path, split


def _hf_dataset(path: str, split: str | None, spec: str):
    datasets = _need("datasets", "data", spec)
    if os.path.isdir(path):
        saved = ("dataset_dict.json", "dataset_info.json", "state.json")
        if not any(os.path.isfile(os.path.join(path, f)) for f in saved):
            raise FileNotFoundError(f"{spec}: {path!r} is not a dataset written by "
                                    f"save_to_disk (no {' / '.join(saved)})")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            names = sorted(ds)
            split = split or ("train" if "train" in ds or len(names) != 1 else names[0])
            if split not in ds:
                raise KeyError(f"{spec}: no split {split!r}; splits: {', '.join(names)}")
            return ds[split], split
        if split is not None and ds.split is not None and str(ds.split) != split:
            raise KeyError(f"{spec}: the saved dataset is split {str(ds.split)!r}, not {split!r}")
        return ds, split or (str(ds.split) if ds.split is not None else "train")
    files = expand_paths(path)
    suffixes = {os.path.splitext(f)[1] for f in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in HF_BUILDERS:
        raise ValueError(f"{spec}: local data files must share one suffix of "
                         f"{', '.join(HF_BUILDERS)}; got {', '.join(sorted(suffixes))}")
    split = split or "train"
    builder = HF_BUILDERS[suffixes.pop()]
    return datasets.load_dataset(builder, data_files={split: files}, split=split), split


def read_hf(spec: str, *, required: Sequence[str] = (),
            on_error: OnBadRow | str = OnBadRow.RAISE) -> Rows:
    """The rows of `hf:PATH[:SPLIT]` (module docstring), validated."""
    path, split = split_spec(spec[len(HF_SCHEME):])
    ds, split = _hf_dataset(path, split, spec)
    name = f"{HF_SCHEME}{path}:{split}"
    items = ((name, n, row, None) for n, row in enumerate(ds, start=1))
    return validate_rows(name, items, unit="row", required=required, on_error=on_error)


def parse_tfds(spec: str) -> tuple[str, str]:
    """`tfds:NAME[/CONFIG][:SPLIT]` → (name, split); the split defaults to "train"."""
    name, _, split = spec[len(TFDS_SCHEME):].partition(":")
    if not name:
        raise ValueError(f"TFDS spec {spec!r}: expected tfds:NAME[/CONFIG][:SPLIT]")
    return name, split or "train"


def _plain(value: Any) -> Any:
    """TFDS feature values (bytes, numpy scalars and arrays, dicts) as JSON-like Python."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value] if value.dtype == object else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_tfds(spec: str, *, data_dir: str | None, required: Sequence[str] = (),
              on_error: OnBadRow | str = OnBadRow.RAISE) -> Rows:
    """The rows of `tfds:NAME[/CONFIG][:SPLIT]` from a local data_dir, validated.

    Args:
      data_dir: `data.tfds_data_dir`; None = $TFDS_DATA_DIR.
    Raises:
      ValueError: no data_dir, or the dataset is not prepared there in ArrayRecord format.
    """
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    if not data_dir:
        raise ValueError(f"{spec}: set data.tfds_data_dir or $TFDS_DATA_DIR (TFDS datasets "
                         f"are read from a local directory, never downloaded)")
    tfds = _need("tensorflow_datasets", "data", spec)
    name, split = parse_tfds(spec)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 — tfds raises many kinds; name them all the same way
        raise ValueError(f"{spec}: cannot open {name!r} split {split!r} in {data_dir!r} "
                         f"(prepared in ArrayRecord format?): {type(e).__name__}: {e}") from None
    where = f"{spec} ({data_dir})"

    def items() -> Iterator:
        for n in range(len(source)):
            yield where, n + 1, _plain(source[n]), None

    return validate_rows(where, items(), unit="row", required=required, on_error=on_error)
