"""Host side of the reward: think block, paragraphs, keywords, character → token cuts."""

from __future__ import annotations

import pytest
import transformers
from hypothesis import given, settings, strategies as st
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from opera_jax import tokenizer as tk
from opera_jax.reward import (Context, KeywordMatch, decode_with_offsets, has_keyword,
                              parse_think_block, plan_contexts, tokens_before)
from opera_jax.buckets import bucket_size

KEYWORDS = ("But", "Wait", "Hmm", "However", "Wait a minute")


@pytest.fixture(scope="module")
def tok():
    return tk.load_tokenizer()


# ---- think block and paragraphs -------------------------------------------------------------

def test_paragraphs_and_cuts():
    y = ("<think>\nA one.\n\nHmm, B.\n\n\n  Wait C.\n \n\nD\n\n</think>\n\nAnswer")
    block = parse_think_block(y)
    assert block.initial_cut == len("<think>") and block.closed
    assert [s.text for s in block.segments] == ["A one.", "Hmm, B.", "Wait C.", "D"]
    cuts = [s.cut for s in block.segments]
    # Just after the last newline of each blank-line run; the last paragraph at "</think>".
    assert y[:cuts[0]].endswith("A one.\n\n") and y[:cuts[1]].endswith("B.\n\n\n")
    assert y[:cuts[2]].endswith("C.\n \n\n")
    assert cuts[3] == y.index("</think>")
    assert block.answer == "\n\nAnswer"


def test_paragraph_set_is_the_published_split():
    body = "\n\nfirst\nline two\n\n\n\nsecond  \n\n \n\nthird\n \nstill third\n\n"
    published = [p.strip() for p in body.split("\n\n") if p.strip()]
    block = parse_think_block(f"<think>{body}</think>")
    assert [s.text for s in block.segments] == published


@pytest.mark.parametrize("y,initial,closed,answer", [
    ("plain answer, no think", None, False, "plain answer, no think"),
    ("<think>\nHmm, a long thought cut off\n\nBut", 7, False, ""),  # truncated response
    ("<think></think>Answer", 7, True, "Answer"),  # empty think block
    ("<think>\n\n \n</think>Answer", 7, True, "Answer"),  # whitespace only: no paragraphs
    ("pre</think><think>x</think>post", 18, True, "pre</think>post"),  # close before open
])
def test_blocks_without_segments(y, initial, closed, answer):
    block = parse_think_block(y)
    assert block.initial_cut == initial and block.closed == closed and block.answer == answer
    assert len(block.segments) == (1 if y.startswith("pre") else 0)


def test_segment_cap_merges_the_tail():
    y = "<think>\nA\n\nB\n\nC but\n\nD\n</think>ok"
    full = parse_think_block(y)
    capped = parse_think_block(y, max_segments=2)
    assert [s.text for s in capped.segments] == ["A", "B\n\nC but\n\nD"]
    assert capped.segments[0] == full.segments[0]
    assert capped.segments[-1].cut == full.segments[-1].cut == y.index("</think>")
    assert parse_think_block(y, max_segments=4) == full


# ---- keywords ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text,word,substring", [
    ("This attribute matters.", False, True),  # "but" inside "attribute"
    ("Press the button.", False, True),
    ("BUT no.", True, True),  # case-insensitive
    ("hmm...", True, True),
    ("Wait a   minute, no.", True, True),
    ("Nowhere to go.", False, False),
    ("however-ish", True, True),  # "-" is not a word character
    ("Waiter!", False, True),
])
def test_keyword_modes(text, word, substring):
    assert has_keyword(text, KEYWORDS, KeywordMatch.WORD) == word
    assert has_keyword(text, KEYWORDS, "substring") == substring


def test_multiword_keyword_alone():
    assert has_keyword("wait\na minute", ["Wait a minute"], KeywordMatch.WORD)
    assert not has_keyword("wait\na minute", ["Wait a minute"], KeywordMatch.SUBSTRING)
    assert not has_keyword("Wait a minutes", ["Wait a minute"], KeywordMatch.WORD)


# ---- character → token cuts -------------------------------------------------------------------

def test_tokens_before_rounds_down_on_a_straddling_token():
    offsets = [(0, 3), (3, 8), (8, 10)]
    assert [tokens_before(offsets, c) for c in (0, 2, 3, 5, 8, 9, 10, 99)] == [
        0, 0, 1, 1, 2, 2, 3, 3]
    assert tokens_before([], 4) == 0


def test_plan_contexts_on_qwen_style_tokenizer(tok):
    x = tk.encode(tok, tk.apply_chat_template(tok, "Write."))
    y = "<think>\nOkay.\n\nWait, no.\n\n</think>\n\nDone."
    ids, offsets = tk.encode_with_offsets(tok, y)
    ctx = plan_contexts(parse_think_block(y), offsets, prompt_len=len(x), think_open_id=1022)
    texts = [tok.decode(ids[:c.prefix_len - len(x)]) for c in ctx]
    assert texts == [y, "<think>", "<think>\nOkay.\n\n", "<think>\nOkay.\n\nWait, no.\n\n"]
    done, done_offsets = tk.encode_with_offsets(tok, "Done.")
    no_think = plan_contexts(parse_think_block("Done."), done_offsets, prompt_len=len(x),
                             think_open_id=1022)
    assert no_think == [Context(len(x) + len(done)), Context(len(x), 1022)]


_WORDS = st.sampled_from(["Okay", "the", "user", "wants", "But", "wait", "Hmm,", "maybe", "rain.",
                          "日本", "é", "—", "42", "x_1", "(", ")", "attribute", "'s"])
_SPACES = st.sampled_from([" ", "  ", "\n", "\n\n", "\n\n\n", "\n \n\n", " \n\n ", "\t", ".\n\n"])


@settings(max_examples=40, derandomize=True, deadline=None)
@given(st.lists(st.tuples(_WORDS, _SPACES), min_size=0, max_size=30))
def test_qwen_cuts_fall_between_tokens(tok, pieces):
    """With Qwen3's pre-tokenizer every b_k is a token boundary (no straddling)."""
    body = "".join(w + s for w, s in pieces)
    y = f"<think>{body}</think>\n\nAnswer."
    ids, offsets = tk.encode_with_offsets(tok, y)
    block = parse_think_block(y)
    assert [s.text for s in block.segments] == [p.strip() for p in body.split("\n\n")
                                                if p.strip()]
    for cut in [block.initial_cut] + [s.cut for s in block.segments]:
        p = tokens_before(offsets, cut)
        assert offsets[p - 1][1] == cut, (y, cut)


def test_straddling_tokenizer_rounds_down():
    """A tokenizer that merges the blank line with the next word: "\\n\\nWait" is one token."""
    vocab = {"[UNK]": 0, "\nA.": 1, "\n\nWait": 2, " B.": 3}
    model = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s*\S+"), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=model)
    fast.add_tokens(["<think>", "</think>"])
    y = "<think>\nA.\n\nWait B.</think>"
    ids, offsets = tk.encode_with_offsets(fast, y)
    assert [y[a:b] for a, b in offsets] == ["<think>", "\nA.", "\n\nWait", " B.", "</think>"]
    block = parse_think_block(y)
    assert [s.text for s in block.segments] == ["A.", "Wait B."]
    ctx = plan_contexts(block, offsets, prompt_len=3, think_open_id=9)
    # b_1 = 12 (after "\n\n") lies inside "\n\nWait": c_1 stops before it, at "<think>\nA.".
    assert ctx[2] == Context(3 + 2)
    assert ctx[3] == Context(3 + 4)  # b_2 = offset of "</think>"


def test_decode_with_offsets_matches_encoding(tok):
    text = "<think>\n日本 é, wait.\n\n</think>ok<|im_end|>"
    ids, offsets = tk.encode_with_offsets(tok, text)
    decoded, dec_offsets = decode_with_offsets(tok, ids)
    assert decoded == text and dec_offsets == offsets
    # A response cut inside a character's bytes: the incomplete tail gets empty spans.
    partial = ids[:ids.index(tk.encode(tok, "日")[0]) + 1]
    decoded, dec_offsets = decode_with_offsets(tok, partial)
    assert decoded == "<think>\n" and dec_offsets[-1] == (len(decoded), len(decoded))


def test_bucket_size():
    assert [bucket_size(n, 64) for n in (1, 64, 65, 100, 129, 4352)] == [
        64, 64, 68, 100, 136, 4352]
    assert all(bucket_size(n) >= n and bucket_size(n) <= n * 1.0625 for n in range(1, 5000))
