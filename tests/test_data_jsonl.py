"""JSONL reading: malformed rows are named by file and line; skip vs raise."""

import json
import logging

import pytest

from opera_jax.data.jsonl import (SFT_FIELDS, BadRowError, expand_paths, read_jsonl,
                                  read_jsonl_files)

GOOD = {"prompt": "p", "thinking": "t", "output": "o", "id": "x", "reference": "r"}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


@pytest.fixture
def messy(tmp_path):
    """Lines: 1 good, 2 bad JSON, 3 blank, 4 missing 'thinking', 5 good, 6 list,
    7 output is an int, 8 empty prompt, 9 good."""
    lines = [json.dumps(GOOD), '{"prompt": "p", ', "", json.dumps({"prompt": "p", "output": "o"}),
             json.dumps({**GOOD, "id": "five"}), "[1, 2]", json.dumps({**GOOD, "output": 3}),
             json.dumps({**GOOD, "prompt": "  "}), json.dumps({**GOOD, "id": "nine"})]
    return write_lines(tmp_path / "messy.jsonl", lines)


def test_raise_names_file_and_first_bad_line(messy):
    with pytest.raises(BadRowError) as e:
        read_jsonl(messy, required=SFT_FIELDS, on_error="raise")
    assert str(e.value).startswith(f"{messy}:2: invalid JSON")
    assert e.value.line == 2 and e.value.path == messy


def test_skip_names_the_first_bad_lines_counts_the_rest_and_keeps_the_good_rows(messy, caplog):
    with caplog.at_level(logging.WARNING, logger="opera_jax.data.jsonl"):
        rows = read_jsonl(messy, required=SFT_FIELDS, on_error="skip")
    assert [r["id"] for r in rows] == ["x", "five", "nine"] and rows.bad == 5
    assert [r["_source"] for r in rows] == [f"{messy}:1", f"{messy}:5", f"{messy}:9"]
    text = caplog.text
    assert f"{messy}:2: invalid JSON" in text
    assert f"{messy}:4: missing field 'thinking'" in text
    assert f"{messy}:6: expected a JSON object, got list" in text
    assert f"{messy}:7:" not in text and f"{messy}:8:" not in text  # counted, not named
    assert f"{messy}:3:" not in text  # blank lines are not errors
    assert "skipped 5 bad of 8 rows" in text
    with pytest.raises(BadRowError, match=f"{messy}:2: invalid JSON"):
        read_jsonl(messy, required=SFT_FIELDS)  # raise: the first bad row stops



def test_non_utf8_bytes_and_bad_task_types_are_bad_rows(tmp_path):
    path = tmp_path / "raw.jsonl"
    good = json.dumps({**GOOD, "id": "ok"}).encode()
    path.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9"}\n'
                     + json.dumps({**GOOD, "task_type": "poetry"}).encode() + b"\n")
    with pytest.raises(BadRowError, match=rf"{path}:2: not valid UTF-8 \(byte 15 of the line\)"):
        read_jsonl(path)
    rows = read_jsonl(path, on_error="skip")
    assert [r["id"] for r in rows] == ["ok"] and rows.bad == 2
    path.write_bytes(good + b"\n" + json.dumps({**GOOD, "task_type": "poetry"}).encode())
    with pytest.raises(BadRowError, match=rf"{path}:2: field 'task_type' is 'poetry'; valid: "
                       "writing, math"):
        read_jsonl(path)


def test_no_valid_rows_is_an_error_even_when_skipping(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["nope", "[]"])
    with pytest.raises(BadRowError, match="no valid rows"):
        read_jsonl(path, required=SFT_FIELDS, on_error="skip")


def test_files_spec_expands_globs_and_commas_in_order(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps({**GOOD, "id": "a"})])
    b = write_lines(tmp_path / "b.jsonl", [json.dumps({**GOOD, "id": "b"})])
    c = write_lines(tmp_path / "c.txt", [json.dumps({**GOOD, "id": "c"})])
    assert expand_paths(f"{tmp_path}/*.jsonl,{c}") == [a, b, c]
    rows = read_jsonl_files(f"{c},{tmp_path}/*.jsonl", required=SFT_FIELDS)
    assert [r["id"] for r in rows] == ["c", "a", "b"]
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        expand_paths(f"{tmp_path}/nothing.jsonl")
