"""The row schema every data source is read into, and the published forms mapped onto it.

A stage reads rows of one schema, whatever file they come from:

    prompt rows (GRPO, synthesis, evaluation)   prompt, reference[, task_type, id, system]
    SFT rows                                     prompt, thinking, output[, id, system]

`prompt` is the user message (the chat template is applied when tokenising, with `system`
first when a row has one). Other published forms are mapped onto these fields when read:

  verl (the published RL parquet files)
      prompt                  a list of chat messages {role, content}: an optional system
                              message first, then user message(s), joined by a blank line
      reward_model.ground_truth   → reference
      reward_model.task_type, else ability   → task_type
      extra_info.index            → id (when the row has none)
      data_source, extra_info     kept as they are
  raw                         prompt, output[, ability]: output → reference (prompt rows),
                              ability → task_type
  chat (SFT)                  messages: [system,] user…, assistant; the assistant turn holds
                              "<think>…</think>" then the answer → thinking, output
  think in output (SFT)       output = "<think>…</think>answer" without a thinking field

A mapped field never overrides one the row holds. Validation follows: the required fields must
be non-empty strings and a task_type one of the reward's (`TaskType`). Every problem names the
file, the row and the field, e.g.

    /data/rl.parquet row 17: field 'reward_model.ground_truth' is missing
    /data/sft.jsonl:4: field 'messages[2].content' has no <think>…</think> block
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Sequence

from opera_jax.config.sections import OnBadRow
from opera_jax.reward.config import TaskType
from opera_jax.tokenizer import THINK_CLOSE, THINK_OPEN

log = logging.getLogger(__name__)

SFT_FIELDS = ("prompt", "thinking", "output")
PROMPT_FIELDS = ("prompt", "reference")
# Bad rows named one by one before the count takes over.
_NAMED = 3


class Rows(list):
    """The valid rows of a read, with the number of bad ones that were skipped."""

    bad: int = 0


class BadRowError(ValueError):
    """A malformed row; the message starts with where it is (`location`)."""

    def __init__(self, path: str, line: int | None, reason: str, *, unit: str = "line"):
        super().__init__(f"{location(path, line, unit)}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def location(path: str, n: int | None, unit: str = "line") -> str:
    """`path:n` for line n of a text file, `path row n` for row n of a table (1-based);
    `path` alone for the whole source (n None)."""
    if n is None:
        return path
    return f"{path}:{n}" if unit == "line" else f"{path} row {n}"


class RowError(ValueError):
    """Why one row cannot be used (the message names the field); the reader adds where."""


def _has(row: dict, key: str) -> bool:
    """Whether `row` holds `key` (a null value, as table rows give, counts as absent)."""
    return row.get(key) is not None


def _messages(value: Any, field: str) -> list[dict]:
    """A list of {role, content} string messages, or RowError naming the bad entry."""
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(f"field {field!r} must be a non-empty list of chat messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RowError(f"field '{field}[{i}]' must be a message {{role, content}}")
        if not isinstance(m.get("content"), str):
            raise RowError(f"field '{field}[{i}].content' must be a string, got "
                           f"{type(m.get('content')).__name__}")
        out.append(m)
    return out


def _prompt_turns(messages: list[dict], field: str, first: int = 0) -> dict:
    """{prompt[, system]} from an optional system message then user messages."""
    out, users = {}, []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i == 0:
            out["system"] = m["content"]
        elif role == "user":
            users.append(m["content"])
        else:
            raise RowError(f"field '{field}[{first + i}].role' is {role!r}; a prompt holds a "
                           f"system message first, then user messages")
    if not users:
        raise RowError(f"field {field!r} has no user message")
    out["prompt"] = "\n\n".join(users)
    return out


def split_think(text: str, field: str) -> tuple[str, str]:
    """(thinking, answer) of "<think>thinking</think>answer" (whitespace around either part
    stripped, as `tokenizer.response_text` writes it back)."""
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE, start + 1)
    if start < 0 or end < 0 or text[:start].strip():
        raise RowError(f"field {field!r} has no {THINK_OPEN}…{THINK_CLOSE} block at its start")
    return text[start + len(THINK_OPEN):end].strip(), text[end + len(THINK_CLOSE):].strip()


def _task_type(value: Any, field: str) -> str:
    if value not in {t.value for t in TaskType}:
        raise RowError(f"field {field!r} is {value!r}; valid: "
                       f"{', '.join(t.value for t in TaskType)}")
    return value


def _ground_truth(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(f"field {field!r} must be a string or a number, got "
                       f"{type(value).__name__}")
    return str(value)


def normalize(raw: Any, required: Sequence[str] = ()) -> dict:
    """The row in the schema of the module docstring (a new dict; `raw` is not changed).

    Args:
      raw: one row as read (a JSON object, a table row).
      required: the fields the reading stage needs; output → reference and a think block in
        output → thinking are mapped only when the stage needs them.
    Raises:
      RowError: naming the field that cannot be mapped.
    """
    if not isinstance(raw, dict):
        raise RowError(f"expected a JSON object, got {type(raw).__name__}")
    row = dict(raw)
    if isinstance(row.get("prompt"), (list, tuple)):  # verl: chat messages
        row.update(_prompt_turns(_messages(row["prompt"], "prompt"), "prompt"))
    elif _has(row, "messages") and not _has(row, "prompt"):  # chat SFT rows
        messages = _messages(row["messages"], "messages")
        last = len(messages) - 1
        if messages[last]["role"] != "assistant" or last == 0:
            raise RowError(f"field 'messages[{last}]' must be the assistant's answer after "
                           f"the prompt's messages")
        row.update(_prompt_turns(messages[:last], "messages"))
        row["thinking"], row["output"] = split_think(messages[last]["content"],
                                                     f"messages[{last}].content")
    reward_model = row.get("reward_model")
    if reward_model is not None:
        if not isinstance(reward_model, dict):
            raise RowError(f"field 'reward_model' must be an object, got "
                           f"{type(reward_model).__name__}")
        if not _has(row, "reference"):
            if not _has(reward_model, "ground_truth"):
                raise RowError("field 'reward_model.ground_truth' is missing")
            row["reference"] = _ground_truth(reward_model["ground_truth"],
                                             "reward_model.ground_truth")
        if not _has(row, "task_type") and _has(reward_model, "task_type"):
            row["task_type"] = _task_type(reward_model["task_type"], "reward_model.task_type")
    extra = row.get("extra_info")
    if not _has(row, "id") and isinstance(extra, dict) and _has(extra, "index"):
        row["id"] = str(extra["index"])
    if not _has(row, "task_type") and _has(row, "ability"):
        row["task_type"] = _task_type(row["ability"], "ability")
    if ("thinking" in required and not _has(row, "thinking")
            and isinstance(row.get("output"), str) and THINK_OPEN in row["output"]):
        row["thinking"], row["output"] = split_think(row["output"], "output")
    if "reference" in required and not _has(row, "reference") and _has(row, "output"):
        row["reference"] = row["output"]
    return row


def check_row(row: Any, required: Sequence[str]) -> str | None:
    """Why `row` (normalised) is not a valid record, or None: an object whose `required`
    fields are non-empty strings, with a valid task_type and string system message if any."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for field in required:
        if not _has(row, field):  # a null column of a table row is missing too
            return f"missing field {field!r}"
        value = row[field]
        if not isinstance(value, str):
            return f"field {field!r} must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"field {field!r} is empty"
    if row.get("task_type") is not None:
        try:
            _task_type(row["task_type"], "task_type")
        except RowError as e:
            return str(e)
    if _has(row, "system") and not isinstance(row["system"], str):
        return f"field 'system' must be a string, got {type(row['system']).__name__}"
    return None


def validate_rows(source: str, items: Iterable[tuple[str, int, Any, str | None]], *,
                  unit: str = "line", required: Sequence[str] = (),
                  on_error: OnBadRow | str = OnBadRow.RAISE) -> Rows:
    """Normalises and validates the rows one reader produced.

    Args:
      source: the file or spec, for the summary messages.
      items: (path, n, raw row, None) per row, or (path, n, None, reason) for a row that could
        not be read (not JSON, not UTF-8); n counts lines or rows (`unit`, see `location`).
      required: fields each row must hold as non-empty strings (e.g. `SFT_FIELDS`).
      on_error: `OnBadRow.RAISE` stops at the first bad row; `SKIP` names the first few,
        drops them all and logs a count.
    Returns:
      The valid rows in order, each with `"_source": location(path, n, unit)` added (`.bad`:
      how many bad rows were skipped).
    Raises:
      BadRowError: a bad row with RAISE, or no valid row at all (either way).
    """
    on_error = OnBadRow(on_error)
    rows, bad = Rows(), 0
    for path, n, raw, reason in items:
        row = None
        if reason is None:
            try:
                row = normalize(raw, required)
                reason = check_row(row, required)
            except RowError as e:
                reason = str(e)
        if reason is not None:
            if on_error is OnBadRow.RAISE:
                raise BadRowError(path, n, reason, unit=unit)
            bad += 1
            if bad <= _NAMED:
                log.warning("%s: %s; skipping the row", location(path, n, unit), reason)
            continue
        row["_source"] = location(path, n, unit)
        rows.append(row)
    if bad:
        log.warning("%s: skipped %d bad of %d rows", source, bad, bad + len(rows))
    if not rows:
        raise BadRowError(source, None, f"no valid rows ({bad} bad)")
    rows.bad = bad
    return rows
