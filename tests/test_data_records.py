"""JSONL → ArrayRecord conversion and reading rows back by index."""

import json

import numpy as np
import pytest

from opera_jax.data.jsonl import SFT_FIELDS, BadRowError
from opera_jax.data.pipeline import sft_batches
from opera_jax.data.records import JsonRecords, jsonl_to_array_record
from opera_jax.data.sources import open_rows
from opera_jax.data.jsonl import write_jsonl
from opera_jax.data.toy_domain import examples
from opera_jax.tokenizer import load_tokenizer


def test_conversion_validates_and_keeps_sources(tmp_path, caplog):
    src = tmp_path / "in.jsonl"
    good = {"prompt": "p", "thinking": "t", "output": "o ü"}
    src.write_text("\n".join([json.dumps(good), "{oops", json.dumps({**good, "id": 2})]) + "\n")
    out = tmp_path / "out.array_record"
    with pytest.raises(BadRowError, match=f"{src}:2: invalid JSON"):
        jsonl_to_array_record(str(src), out)
    assert jsonl_to_array_record(str(src), out, on_error="skip") == 2
    assert f"{src}:2: invalid JSON" in caplog.text
    rows = open_rows(str(out))
    assert isinstance(rows, JsonRecords) and len(rows) == 2
    assert rows[0] == {**good, "_source": f"{src}:1"}
    assert rows[1] == {**good, "id": 2, "_source": f"{src}:3"}
    with pytest.raises(ValueError, match="mixes"):
        open_rows(f"{out},{src}")


def test_array_record_rows_give_the_same_batches_as_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "toy.jsonl", examples(24, seed=0))
    ar = tmp_path / "toy.array_record"
    jsonl_to_array_record(jsonl, ar)
    tok = load_tokenizer(None)
    kw = dict(eos_id=1021, pad_id=1019, seq_len=256, global_batch_size=2, seed=7, num_threads=0,
              process_index=0, process_count=1)
    a = iter(sft_batches(open_rows(jsonl, required=SFT_FIELDS), tok, **kw))
    b = iter(sft_batches(open_rows(str(ar)), tok, **kw))
    for _ in range(4):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert len(open_rows(str(ar))) == 24
