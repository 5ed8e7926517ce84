"""Rows from JSONL, Parquet or ArrayRecord files, and the conversion to ArrayRecord.

JSONL and Parquet are read whole into memory (validated, errors naming file and row; see
data/schema.py): right for the cold-start set and prompt sets (tens of thousands of rows). For
larger sets, convert once:

    python -m opera_jax.data.records --input=/data/sft.jsonl --output=/data/sft.array_record

Conversion validates every row (errors and warnings name the source file and row) and stores
one JSON object per record, mapped onto the row schema, `_source` included; training then
reads records by index through Grain's ArrayRecordDataSource without holding the rows in
memory (only the `array_record` package that Grain already depends on).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import grain

from opera_jax.config.sections import OnBadRow
from opera_jax.data.jsonl import SFT_FIELDS, expand_paths, read_jsonl
from opera_jax.data.schema import Rows
from opera_jax.data.tables import PARQUET_SUFFIX, read_parquet

ARRAY_RECORD_SUFFIX = ".array_record"


class JsonRecords:
    """Random-access rows of ArrayRecord files holding one JSON object per record.

    Args:
      paths: the files, in order (their records are concatenated).
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return json.loads(self._source[index])

    def __repr__(self) -> str:
        return f"JsonRecords({self.paths!r}, rows={len(self)})"


def open_files(spec: str, *, required: Sequence[str] = (),
               on_error: OnBadRow | str = OnBadRow.RAISE) -> Sequence[dict]:
    """The rows named by `spec` (comma-separated paths and/or globs).

    `*.array_record` files are opened for random access (validated when converted);
    `*.parquet` files are read with `tables.read_parquet`, anything else as JSONL, each
    validated (`required`, `on_error`) and concatenated in order.

    Raises:
      ValueError: the spec mixes ArrayRecord files with other kinds.
    """
    paths = expand_paths(spec)
    is_ar = [p.endswith(ARRAY_RECORD_SUFFIX) for p in paths]
    if all(is_ar):
        return JsonRecords(paths)
    if any(is_ar):
        raise ValueError(f"data spec {spec!r} mixes {ARRAY_RECORD_SUFFIX} and other files")
    return read_files(paths, required=required, on_error=on_error)


def read_files(paths: Sequence[str], *, required: Sequence[str] = (),
               on_error: OnBadRow | str = OnBadRow.RAISE) -> Rows:
    """Parquet and JSONL files read and validated one by one, concatenated in order."""
    out = Rows()
    for path in paths:
        read = read_parquet if path.endswith(PARQUET_SUFFIX) else read_jsonl
        rows = read(path, required=required, on_error=on_error)
        out.extend(rows)
        out.bad += rows.bad
    return out


def jsonl_to_array_record(spec: str, out_path: str | os.PathLike, *,
                          required: Sequence[str] = SFT_FIELDS,
                          on_error: OnBadRow | str = OnBadRow.RAISE) -> int:
    """Validates the JSONL (or Parquet) rows of `spec` and writes them to one ArrayRecord
    file, mapped onto the row schema (data/schema.py).

    Returns:
      The number of rows written.
    """
    from array_record.python import array_record_module

    rows = read_files(expand_paths(spec), required=required, on_error=on_error)
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # group_size:1 makes every record individually seekable (random access for shuffling).
    writer = array_record_module.ArrayRecordWriter(out_path, "group_size:1")
    try:
        for row in rows:
            writer.write(json.dumps(row, ensure_ascii=False).encode("utf-8"))
    finally:
        writer.close()
    return len(rows)


def main(argv) -> None:
    """`python -m opera_jax.data.records --input=IN.jsonl --output=OUT.array_record`."""
    from absl import flags

    del argv
    f = flags.FLAGS
    n = jsonl_to_array_record(f.input, f.output,
                              required=[x for x in f.required.split(",") if x],
                              on_error=f.on_bad_row)
    print(f"wrote {n} rows to {f.output}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("input", None, "JSONL rows: comma-separated paths and/or globs",
                        required=True)
    flags.DEFINE_string("output", None, f"output file (…{ARRAY_RECORD_SUFFIX})", required=True)
    flags.DEFINE_string("required", ",".join(SFT_FIELDS), "fields every row must hold")
    flags.DEFINE_enum("on_bad_row", "raise", [e.value for e in OnBadRow], "bad rows")
    app.run(main)
