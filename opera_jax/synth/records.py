"""The synthesis output file: crash-safe appends, resume without duplicates, a config hash.

    writer = RecordWriter("/data/synth.jsonl")   # reads the records already there
    writer.done_ids                               # ids to skip on a rerun
    writer.write({"id": "p7", …})                 # one line, flushed and fsynced

A kill at any moment loses at most the prompts still in flight: every finished record is one
`write` of one line followed by flush + fsync. A kill in the middle of a write leaves a last
line without its newline; on open that partial line is cut off (it is not a record), and a
complete last line that only lacks its newline gets one.

`config_hash` fingerprints the settings that shape a record (teacher, synthesis knobs, the
wrapper text), not batching or file paths, so a rerun with other batch sizes resumes the same
file while a rerun with another teacher or temperature is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

from opera_jax.config.sections import SYNTH_BATCHING_FIELDS, Model, Synth
from opera_jax.synth.wrapper import WRAPPER

log = logging.getLogger(__name__)

# Teacher fields that do not change what it computes.
_TEACHER_IGNORED = ("attention_impl", "remat")


def config_hash(teacher: Model, synth: Synth) -> str:
    """12 hex digits of sha256 over the teacher's model section (without the fields that
    change only speed), the `synth` section without its batching fields, and the wrapper."""
    model = {k: v for k, v in dataclasses.asdict(teacher).items() if k not in _TEACHER_IGNORED}
    knobs = {k: v for k, v in dataclasses.asdict(synth).items()
             if k not in SYNTH_BATCHING_FIELDS}
    blob = json.dumps({"teacher": model, "synth": knobs, "wrapper": WRAPPER}, sort_keys=True,
                      default=lambda x: getattr(x, "value", list(x) if isinstance(x, tuple)
                                                else str(x)))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def read_records(path: str | os.PathLike) -> list[dict]:
    """The complete records of an output file (a partial last line is ignored).

    Raises:
      ValueError: a line other than the last is not a JSON object (naming path:line).
    """
    records, _ = _scan(os.fspath(path))
    return records


def _scan(path: str) -> tuple[list[dict], int]:
    """(records, byte length of the file's valid part)."""
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    records, good, lineno = [], 0, 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        end = good + len(line)
        last = end >= len(data)
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "id" not in row:
                    raise ValueError("not a record")
            except ValueError:
                if last:  # a write cut short by a kill
                    log.warning("%s:%d: incomplete last line dropped (%d bytes)", path, lineno,
                                len(line))
                    return records, good
                raise ValueError(f"{path}:{lineno}: not a JSON record; the output file is "
                                 "damaged") from None
            records.append(row)
        good = end + (0 if last else 1)
    return records, good


class RecordWriter:
    """Appends records to a JSONL file, one fsynced line each, resuming what is there."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        records, good = _scan(self.path)
        self.existing = records
        self.done_ids = {str(r["id"]) for r in records}
        if len(self.done_ids) != len(records):
            raise ValueError(f"{self.path}: duplicate ids in the existing records")
        self._file = open(self.path, "ab")
        self._file.truncate(good)  # drop a partial last line
        if good and self._last_byte() != b"\n":
            self._file.write(b"\n")  # a complete record whose newline was lost
        self._sync()

    def _last_byte(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1)

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, record: dict) -> None:
        """Appends one record (its `id` must be new) and makes it durable."""
        rid = str(record["id"])
        if rid in self.done_ids:
            raise ValueError(f"record {rid!r} is already in {self.path}")
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._sync()
        self.done_ids.add(rid)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
