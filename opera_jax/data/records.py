"""Rows from JSONL or ArrayRecord files, and the JSONL → ArrayRecord conversion.

JSONL is read whole into memory (validated, line-numbered errors; see data.jsonl): right for
the cold-start set (tens of thousands of rows). For larger sets, convert once:

    python -m opera_jax.data.records --input=/data/sft.jsonl --output=/data/sft.array_record

Conversion validates every row (errors and warnings name the JSONL file and line) and stores
one JSON object per record, `_source` included; training then reads records by index through
Grain's ArrayRecordDataSource without holding the rows in memory. (TFDS can write the same
ArrayRecord files without TensorFlow, but it pulls in ~200 MB of pyarrow; the `array_record`
package that Grain already depends on is all this needs.)
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import grain

from opera_jax.config.sections import OnBadRow
from opera_jax.data.jsonl import SFT_FIELDS, expand_paths, read_jsonl_files

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

    `*.array_record` files are opened for random access (validated when converted); anything
    else is read as JSONL with `read_jsonl_files(spec, required=…, on_error=…)`.

    Raises:
      ValueError: the spec mixes ArrayRecord and JSONL files.
    """
    paths = expand_paths(spec)
    is_ar = [p.endswith(ARRAY_RECORD_SUFFIX) for p in paths]
    if all(is_ar):
        return JsonRecords(paths)
    if any(is_ar):
        raise ValueError(f"data spec {spec!r} mixes {ARRAY_RECORD_SUFFIX} and JSONL files")
    return read_jsonl_files(spec, required=required, on_error=on_error)


def jsonl_to_array_record(spec: str, out_path: str | os.PathLike, *,
                          required: Sequence[str] = SFT_FIELDS,
                          on_error: OnBadRow | str = OnBadRow.RAISE) -> int:
    """Validates the JSONL rows of `spec` and writes them to one ArrayRecord file.

    Returns:
      The number of rows written.
    """
    from array_record.python import array_record_module

    rows = read_jsonl_files(spec, required=required, on_error=on_error)
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
