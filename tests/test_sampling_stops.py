"""Stop-string matching over token bytes, against a plain-Python reference on the text."""

from __future__ import annotations

import random

import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.sampling import stops
from opera_jax.tokenizer import load_tokenizer

# A fake vocabulary: the same words split in different ways, and "é" split over two tokens.
PIECES = [b"a", b"b", b" Wait", b"W", b"ait", b",", b"\n", b" But", b"Wa", b"it",
          b"\xc3", b"\xa9", b"</", b"think", b">", b"</think>", b". ", b" x"]
ID = {p: i for i, p in enumerate(PIECES)}


def run_matcher(token_rows, stop_list):
    """Feeds tokens one step at a time, as the decode loop does; returns per row
    (step of the token completing a stop, stop index, start byte, end byte) or None."""
    table = stops.TokenTable.build(PIECES)
    rev, lengths = stops.encode_stops(stop_list)
    b, w = len(token_rows), rev.shape[1]
    tail = jnp.full((b, w - 1), -1, jnp.int32)
    nbytes = np.zeros(b, np.int64)
    found = [None] * b
    for t in range(max(len(r) for r in token_rows)):
        tok = np.array([r[t] if t < len(r) else 0 for r in token_rows])
        live = np.array([t < len(r) and found[i] is None for i, r in enumerate(token_rows)])
        nlen = np.where(live, table.lengths[tok], 0)
        hit, which, end, tail = stops.match_stops(tail, jnp.asarray(table.bytes[tok]),
                                                  jnp.asarray(nlen), jnp.asarray(rev),
                                                  jnp.asarray(lengths))
        hit, which, end = np.asarray(hit), np.asarray(which), np.asarray(end)
        for i in np.flatnonzero(hit & live):
            stop_end = nbytes[i] + end[i] + 1
            found[i] = (t, int(which[i]), int(stop_end - lengths[which[i]]), int(stop_end))
        nbytes += nlen
    return found


def reference(tokens, stop_list):
    """First token whose text makes the generated text contain a stop; earliest end wins,
    then the longest stop, then the first listed."""
    text = b""
    for t, tok in enumerate(tokens):
        prev, text = len(text), text + PIECES[tok]
        best = None
        for s_idx, s in enumerate(stop_list):
            s = s.encode()
            pos = text.find(s, max(0, prev - len(s) + 1))
            while pos != -1 and pos + len(s) <= prev:  # must end inside the new token
                pos = text.find(s, pos + 1)
            if pos != -1 and (best is None or (pos + len(s), pos) < (best[3], best[2])):
                best = (t, s_idx, pos, pos + len(s))
        if best is not None:
            return best
    return None


def ids(*pieces):
    return [ID[p] for p in pieces]


STOP_LIST = ["Wait", "\nWait", "But", "</think>", "é", ". W"]


@pytest.mark.parametrize("tokens,expected_stop,expected_step", [
    (ids(b"a", b" Wait", b","), "Wait", 1),  # one token, preceded by a space
    (ids(b"a", b"W", b"ait", b"b"), "Wait", 2),  # split across two tokens
    (ids(b"a", b"Wa", b"it"), "Wait", 2),  # split differently
    (ids(b"\n", b"W", b"ait"), "\nWait", 2),  # "Wait" and "\nWait" end together: longest
    (ids(b"b", b" But", b" Wait"), "But", 1),
    (ids(b"a", b"</", b"think", b">"), "</think>", 3),  # three tokens
    (ids(b"a", b"</think>"), "</think>", 1),  # the added token
    (ids(b"a", b"\xc3", b"\xa9"), "é", 2),  # a character split over two tokens
    (ids(b"a", b". ", b"Wa", b"it"), ". W", 2),  # ends inside the token "Wa"
    (ids(b"a", b"b", b" x"), None, None),
])
def test_matcher_examples(tokens, expected_stop, expected_step):
    got = run_matcher([tokens], STOP_LIST)[0]
    ref = reference(tokens, STOP_LIST)
    assert got == ref
    if expected_stop is None:
        assert got is None
    else:
        assert (STOP_LIST[got[1]], got[0]) == (expected_stop, expected_step)


def test_matcher_random_sequences_rows_independent():
    rng = random.Random(0)
    rows = [[rng.randrange(len(PIECES)) for _ in range(rng.randrange(1, 25))] for _ in range(64)]
    stop_list = ["Wait", "aa", "But", "\nWa", "é,", "ab a", "a", "ait"]
    got = run_matcher(rows, stop_list)
    assert got == [reference(r, stop_list) for r in rows]
    assert len({g[0] for g in got if g}) > 3  # rows really stop at different steps


def test_encode_stops_buckets_and_rejects_empty():
    rev, lengths = stops.encode_stops(["ab", "Wait, but"])
    assert rev.shape == (4, 16) and lengths.tolist() == [2, 9, 0, 0]
    assert rev[0, :3].tolist() == [ord("b"), ord("a"), -1]
    with pytest.raises(ValueError):
        stops.encode_stops([""])


def test_token_bytes_decode_like_the_tokenizer():
    tok = load_tokenizer()
    pieces = stops.token_bytes(tok, vocab_size=1030)
    assert len(pieces) == 1030 and pieces[1029] == b"" and pieces[1023] == b"</think>"
    table = stops.TokenTable.build(pieces)
    rng = np.random.default_rng(0)
    for _ in range(20):
        seq = rng.integers(0, 1024, size=30).tolist()
        assert table.detokenize(seq).decode("utf-8", "replace") == tok.decode(seq)
    text = "Hmm. Wait, ça marche?\nBut </think> déjà"
    assert table.detokenize(tok(text, add_special_tokens=False)["input_ids"]) == text.encode()
