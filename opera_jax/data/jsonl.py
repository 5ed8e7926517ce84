"""Line-numbered JSONL reading with per-row validation.

Every problem names the file and the 1-based line number, e.g.

    /data/sft.jsonl:17: missing field 'thinking'

`on_error` decides what a bad row does: `OnBadRow.RAISE` stops at the first one with a
`BadRowError`; `OnBadRow.SKIP` names the first few, drops them all and logs a count. A bad row
is one that is not valid UTF-8, not JSON, not an object, lacks a required field, or holds a
`task_type` that is not one of the reward's. Blank lines are ignored (a trailing newline is
not an error). A file with no valid row is always an error.

Each returned record is the row's JSON object plus `"_source": "path:line"`, so later stages
(tokenisation, packing) can name the row too.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any, Sequence

from opera_jax.config.sections import OnBadRow
from opera_jax.reward.config import TaskType

log = logging.getLogger(__name__)

# The fields an SFT row must hold (non-empty strings); `id` and `reference` are optional.
SFT_FIELDS = ("prompt", "thinking", "output")
# Bad rows named one by one before the count takes over.
_NAMED = 3


class Rows(list):
    """The valid rows of a read, with the number of bad ones that were skipped."""

    bad: int = 0


class BadRowError(ValueError):
    """A malformed JSONL row; the message starts with `path:line:`."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def check_row(row: Any, required: Sequence[str]) -> str | None:
    """Why `row` is not a valid record (None when it is): an object whose `required` fields
    are non-empty strings."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for field in required:
        if field not in row:
            return f"missing field {field!r}"
        value = row[field]
        if not isinstance(value, str):
            return f"field {field!r} must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"field {field!r} is empty"
    task = row.get("task_type")
    if task is not None and task not in {t.value for t in TaskType}:
        return (f"field 'task_type' is {task!r}; valid: "
                f"{', '.join(t.value for t in TaskType)}")
    return None


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
    on_error = OnBadRow(on_error)
    path = os.fspath(path)
    rows, bad = Rows(), 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                reason = check_row(row, required)
            except UnicodeDecodeError as e:
                reason = f"not valid UTF-8 (byte {e.start} of the line)"
            except json.JSONDecodeError as e:
                reason = f"invalid JSON: {e.msg} at column {e.colno}"
            if reason is not None:
                if on_error is OnBadRow.RAISE:
                    raise BadRowError(path, lineno, reason)
                bad += 1
                if bad <= _NAMED:
                    log.warning("%s:%d: %s; skipping the row", path, lineno, reason)
                continue
            row["_source"] = f"{path}:{lineno}"
            rows.append(row)
    if bad:
        log.warning("%s: skipped %d bad of %d rows", path, bad, bad + len(rows))
    if not rows:
        raise BadRowError(path, 0, f"no valid rows ({bad} bad)")
    rows.bad = bad
    return rows


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
