"""Line-numbered JSONL reading with per-row validation (data/schema.py).

Every problem names the file and the 1-based line number, e.g.

    /data/sft.jsonl:17: missing field 'thinking'

`on_error` decides what a bad row does: `OnBadRow.RAISE` stops at the first one with a
`BadRowError`; `OnBadRow.SKIP` names the first few, drops them all and logs a count. A bad row
is one that is not valid UTF-8, not JSON, not an object, or fails the schema (a missing
required field, a `task_type` that is not one of the reward's; schema.py). Blank lines are
ignored (a trailing newline is not an error). A file with no valid row is always an error.

Each returned record is the row, mapped onto the schema, plus `"_source": "path:line"`, so
later stages (tokenisation, packing) can name the row too.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

from opera_jax.config.sections import OnBadRow
from opera_jax.data.schema import (PROMPT_FIELDS, SFT_FIELDS, BadRowError, Rows, check_row,
                                   validate_rows)

__all__ = ["PROMPT_FIELDS", "SFT_FIELDS", "BadRowError", "Rows", "check_row", "expand_paths",
           "read_jsonl", "read_jsonl_files", "write_jsonl"]


def _lines(path: str):
    """(path, line number, JSON value or None, why it is unreadable or None) per non-blank
    line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield path, lineno, json.loads(raw.decode("utf-8")), None
            except UnicodeDecodeError as e:
                yield path, lineno, None, f"not valid UTF-8 (byte {e.start} of the line)"
            except json.JSONDecodeError as e:
                yield path, lineno, None, f"invalid JSON: {e.msg} at column {e.colno}"


def read_jsonl(path: str | os.PathLike, *, required: Sequence[str] = (),
               on_error: OnBadRow | str = OnBadRow.RAISE) -> Rows:
    """Reads one JSONL file, validating every row.

    Args:
      path: the file.
      required: fields each row must hold as non-empty strings (e.g. `SFT_FIELDS`).
      on_error: `OnBadRow.RAISE` (or "raise") or `OnBadRow.SKIP` (or "skip").

    Returns:
      The valid rows, in file order, each with `"_source": "path:line"` added (`.bad`: how
      many bad rows were skipped).

    Raises:
      BadRowError: a bad row with `on_error=RAISE` (naming file and line), or no valid row.
      FileNotFoundError: `path` does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no data file {path!r}")
    return validate_rows(path, _lines(path), required=required, on_error=on_error)


def expand_paths(spec: str) -> list[str]:
    """File paths from a spec: comma-separated paths and/or glob patterns, sorted per pattern.

    Raises:
      FileNotFoundError: a pattern matches nothing.
    """
    paths = []
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            continue
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"no data file matches {pattern!r}")
        paths.extend(matches)
    if not paths:
        raise FileNotFoundError(f"empty data file spec {spec!r}")
    return paths


def read_jsonl_files(spec: str, *, required: Sequence[str] = (),
                     on_error: OnBadRow | str = OnBadRow.RAISE) -> Rows:
    """`read_jsonl` over every file of `expand_paths(spec)`, concatenated in order."""
    out = Rows()
    for path in expand_paths(spec):
        rows = read_jsonl(path, required=required, on_error=on_error)
        out.extend(rows)
        out.bad += rows.bad
    return out


def write_jsonl(path: str | os.PathLike, rows) -> str:
    """Writes `rows` (dicts) one JSON object per line, creating parent directories; returns
    the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
