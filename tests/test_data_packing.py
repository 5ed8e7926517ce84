"""SFT tokenisation (the loss mask) and packing into [B, T] rows, on hand-made examples."""

import grain
import numpy as np
import pytest

from opera_jax.data.packing import TokenizeSFT, batch_examples
from opera_jax.tokenizer import response_text
from opera_jax.tokenizer import load_tokenizer

EOS, PAD, THINK, UNTHINK = 1021, 1019, 1022, 1023  # the tiny tokenizer's special ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_loss_mask_covers_exactly_the_response(tok):
    row = {"prompt": "Hi there", "thinking": "abc", "output": "out"}
    ex = TokenizeSFT(tok, eos_id=EOS, seq_len=64)(row)
    # "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n": 12 tokens, then
    # "<think>\nabc\n</think>\n\nout" + <|im_end|>: 9 tokens (ids from the tiny tokenizer).
    prompt = [1020, 458, 198, 39, 72, 260, 264, 1021, 198, 1020, 513, 198]
    response = [THINK, 198, 859, 66, 198, UNTHINK, 271, 313, EOS]
    np.testing.assert_array_equal(ex["tokens"], prompt + response)
    np.testing.assert_array_equal(ex["loss_mask"], [0] * 12 + [1] * 9)
    assert response_text("abc", "out") == "<think>\nabc\n</think>\n\nout"


def test_overlong_examples_are_dropped_or_truncated(tok):
    row = {"prompt": "Hi there", "thinking": "abc", "output": "out", "_source": "f.jsonl:7"}
    assert TokenizeSFT(tok, eos_id=EOS, seq_len=20)(row) is None  # 21 tokens (counted later)
    ex = TokenizeSFT(tok, eos_id=EOS, seq_len=20, overlong="truncate")(row)
    np.testing.assert_array_equal(ex["loss_mask"], [0] * 12 + [1] * 8)
    assert ex["tokens"][-1] == 313  # "out", the eos was cut
    # A prompt that fills the row leaves nothing to learn: dropped even when truncating.
    assert TokenizeSFT(tok, eos_id=EOS, seq_len=12, overlong="truncate")(row) is None


def examples(*specs):
    """(first token, length, prompt length) → {"tokens", "loss_mask"}."""
    return [{"tokens": np.arange(t, t + n, dtype=np.int32),
             "loss_mask": np.array([0] * p + [1] * (n - p), np.int32)} for t, n, p in specs]


def test_first_fit_packing_layout():
    exs = examples((1, 3, 1), (10, 2, 1), (20, 4, 2), (30, 2, 1), (40, 5, 2), (50, 6, 3))
    ds = grain.MapDataset.source(exs).to_iter_dataset()
    batches = list(batch_examples(ds, seq_len=6, batch_size=2, pad_id=PAD, packing=True))
    # First fit over 2 bins: [3+2 | 4], then 2 fits bin 2 (4+2); 5 fits nowhere → emit.
    # Then [5 | 6], emitted at the end.
    assert len(batches) == 2
    b = batches[0]
    np.testing.assert_array_equal(b["tokens"], [[1, 2, 3, 10, 11, PAD], [20, 21, 22, 23, 30, 31]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 1]])
    np.testing.assert_array_equal(batches[1]["segment_ids"], [[1, 1, 1, 1, 1, 0], [1] * 6])
    assert all(v.dtype == np.int32 for v in b.values())


def test_unpacked_layout_one_example_per_row():
    exs = examples((1, 3, 1), (10, 2, 1), (20, 4, 2))
    ds = grain.MapDataset.source(exs).to_iter_dataset()
    (b,) = list(batch_examples(ds, seq_len=5, batch_size=2, pad_id=PAD, packing=False))
    np.testing.assert_array_equal(b["tokens"], [[1, 2, 3, PAD, PAD], [10, 11, PAD, PAD, PAD]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 0], [0, 1, 0, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"], [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]])
