"""Tests for `opera_jax.tokenizer` and the embedded tiny tokenizer it loads."""

from __future__ import annotations

import json
import os
import random
import re

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from opera_jax import tokenizer as tk
from opera_jax.model.config import Qwen3Config

# Qwen3's order after the 1019 learned byte-level tokens.
EXPECTED_IDS = {"<|endoftext|>": 1019, "<|im_start|>": 1020, "<|im_end|>": 1021,
                "<think>": 1022, "</think>": 1023}


@pytest.fixture(scope="module")
def tok():
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def raw_backend():
    return Tokenizer.from_file(os.path.join(tk.TINY_TOKENIZER_DIR, "tokenizer.json"))


def test_vocab_size_matches_tiny_preset(tok):
    assert len(tok) == 1024
    assert Qwen3Config.preset("tiny").vocab_size == len(tok)
    assert max(tok.get_vocab().values()) == 1023


@pytest.mark.parametrize("token,expected_id", sorted(EXPECTED_IDS.items()))
def test_special_tokens_are_single_tokens(tok, token, expected_id):
    assert tk.encode(tok, token) == [expected_id]
    # Also inside running text, with no spaces around it.
    ids = tk.encode(tok, f"abc{token}def")
    assert ids.count(expected_id) == 1
    assert tok.decode(ids) == f"abc{token}def"


def test_special_token_ids(tok):
    assert tk.special_token_ids(tok) == {"eos": 1021, "pad": 1019, "think_open": 1022,
                                         "think_close": 1023}
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_encode_adds_no_special_tokens(tok):
    assert tk.encode(tok, "") == []
    assert tk.encode(tok, "a") == [tok.convert_tokens_to_ids("a")]


def test_think_tags_survive_skip_special_tokens(tok):
    # As in Qwen3, the think tags are added tokens but not "special" ones.
    ids = tk.encode(tok, "<|im_start|>assistant\n<think>\nHmm.\n</think>\n\nYes.<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nHmm.\n</think>\n\nYes."


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "Okay, the user wants a poem.\n\nHmm, maybe I should start with rain.\n\n\nWait — no.",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows\r\n\r\nline ends",
    "Café, naïve, façade — «quotes» and ‘curly’ ones…",
    "日本語のテキスト、中文、한국어, Ελληνικά, русский",
    "emoji 😀🎉👩‍👩‍👧 and math: ∑ x² ≤ 10³",
    "It's 12:45 in 1987; we'd waited 30 years. \\boxed{42}",
    "<|im_start|>user\nWrite a poem.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
])
def test_round_trip(tok, text, raw_backend):
    ids = tk.encode(tok, text)
    assert tok.decode(ids) == text
    # transformers rebuilds the pipeline from its Qwen2Tokenizer class; it must match the file.
    assert raw_backend.encode(text, add_special_tokens=False).ids == ids


CHAT_CASES = [
    (dict(enable_thinking=True),
     "<|im_start|>user\nWrite a poem.<|im_end|>\n<|im_start|>assistant\n"),
    (dict(enable_thinking=False),
     "<|im_start|>user\nWrite a poem.<|im_end|>\n<|im_start|>assistant\n"
     "<think>\n\n</think>\n\n"),
    (dict(system="Be brief."),
     "<|im_start|>system\nBe brief.<|im_end|>\n"
     "<|im_start|>user\nWrite a poem.<|im_end|>\n<|im_start|>assistant\n"),
    (dict(system="Be brief.", enable_thinking=False),
     "<|im_start|>system\nBe brief.<|im_end|>\n"
     "<|im_start|>user\nWrite a poem.<|im_end|>\n<|im_start|>assistant\n"
     "<think>\n\n</think>\n\n"),
]


@pytest.mark.parametrize("kwargs,expected", CHAT_CASES)
def test_apply_chat_template(tok, kwargs, expected):
    assert tk.apply_chat_template(tok, "Write a poem.", **kwargs) == expected


def test_chat_template_multi_turn_and_bad_role(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Again"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n")
    with pytest.raises(Exception, match="Unsupported chat role: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_chat_prompt_encodes_to_expected_scaffolding(tok):
    x = tk.apply_chat_template(tok, "Hi", enable_thinking=False)
    ids = tk.encode(tok, x)
    assert ids[0] == 1020 and ids[-4:-2] == [1022, tok.convert_tokens_to_ids("ĊĊ")]
    assert ids.count(1021) == 1 and ids.count(1023) == 1


def _blank_line_run_ends(text: str) -> list[int]:
    """End offsets of blank-line runs: newline, optional spaces/tabs, newline, repeated."""
    return [m.end() for m in re.finditer(r"\r?\n(?:[ \t]*\r?\n)+", text)]


def _random_paragraph_texts(n: int) -> list[str]:
    """Texts made of words, punctuation, digits, unicode and tags, joined by newline runs."""
    rng = random.Random(0)
    words = ["Wait", "But", "Hmm", "However", "Let me think", "the", "rain", "it's", "Café",
             "日本", "1987", "42", "(maybe)", "—", "...", "?", "!", "\"quote\"", "\\boxed{7}",
             "<think>", "</think>", "<|im_end|>", "'s", "x"]
    ends = ["", ".", "!", "?", ":", "...", " ", "  ", "\t", ")", "\""]
    runs = ["\n\n", "\n\n\n", "\n \n", " \n\n", "\n\n\n\n", "\r\n\r\n"]
    starts = ["", " ", "  ", "'", "'s", "(", "-", "1", "é", "<think>"]
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 5)):
            body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            parts.append(rng.choice(starts) + body + rng.choice(ends) + rng.choice(runs))
        texts.append("".join(parts) + rng.choice(words))
    return texts


def test_blank_line_runs_end_at_token_boundaries(tok):
    hand = "A poem.\n\nWait, no.\n\n\nBut then\n \n  x.\r\n\r\n1"
    assert _blank_line_run_ends(hand) == [9, 21, 32, 40]
    texts = [hand] + _random_paragraph_texts(300)
    for text in texts:
        ids, offsets = tk.encode_with_offsets(tok, text)
        token_ends = {end for _, end in offsets}
        for end in _blank_line_run_ends(text):
            assert end in token_ends, (text, end, offsets)
            # No token straddles the boundary.
            assert not any(s < end < e for s, e in offsets), (text, end)


def test_offsets_slice_back_to_token_texts(tok):
    text = ("<|im_start|>user\nWrite it's 12 words.<|im_end|>\n<|im_start|>assistant\n"
            "<think>\nHmm, café?\n\nBut wait...\n</think>\n\nDone!")
    ids, offsets = tk.encode_with_offsets(tok, text)
    assert len(ids) == len(offsets)
    assert [text[s:e] for s, e in offsets] == [tok.decode([i]) for i in ids]
    # They tile the text: no gaps, no overlaps, leading spaces included.
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
    assert ids == tk.encode(tok, text)


def test_offsets_of_a_character_split_over_tokens(tok):
    # "😀" is 4 UTF-8 bytes and no merge covers it: every byte token gets the char's span.
    ids, offsets = tk.encode_with_offsets(tok, "😀 x")
    assert len(ids) == 6
    assert offsets == [(0, 1)] * 4 + [(1, 2), (2, 3)]


def test_load_tokenizer_empty_dir_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        tk.load_tokenizer(str(tmp_path))
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        tk.load_tokenizer(str(missing))


def test_special_token_ids_without_chat_or_think_tokens(tmp_path):
    # A GPT-2-like directory: no <|im_end|>, no think tags.
    vocab = {"</s>": 0, "<pad>": 1, "a": 2, "b": 3, "ab": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>"}))
    other = tk.load_tokenizer(str(tmp_path))
    assert tk.encode(other, "ab") == [4]
    assert tk.special_token_ids(other) == {"eos": 0, "pad": 1, "think_open": None,
                                           "think_close": None}
