"""Stop strings, matched on device over the bytes of the generated text.

A stop string may be produced by one token or by several, and how it is split depends on the
text before it ("Wait" after a space is often one token " Wait"; after "\\n" it may be "W"+"ait").
Matching token ids would need every tokenisation; matching text does not. So each vocabulary
token gets its UTF-8 byte string (`token_bytes`), and every row keeps the last W-1 bytes of its
generated text (W = longest stop, in bytes). After each new token the sampler asks: does any
stop string end at one of the new token's bytes? UTF-8 is self-synchronising, so a byte match
of a valid UTF-8 stop is exactly a character match in the decoded text.

Semantics (shared with the host side, `Sample` in generate.py):
  * only generated text is searched (not the prompt);
  * the row stops at the FIRST point where the text contains a stop string: the token that
    completes it is kept (its log-prob too), later tokens are not generated;
  * among stops ending at the same byte the longest wins ("\nWait" over "Wait"), so the
    reported stop and its start say which variant occurred, whatever the list order;
  * the match's byte range in the generated text is reported, so the text can be cut right
    after the stop string (a token such as " Wait," carries bytes past the stop).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from opera_jax.buckets import round_up

_NO_BYTE = -1  # stop padding / "before the generated text": never equal to a byte 0..255


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / Qwen byte-level alphabet: byte -> printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def token_bytes(tokenizer, vocab_size: int | None = None) -> list[bytes]:
    """The UTF-8 bytes each token id stands for, as `tokenizer.decode` would write them.

    Byte-level BPE tokens (Qwen, GPT-2) map exactly, including tokens that hold part of a
    multi-byte character; added tokens (`<|im_end|>`, `</think>`) give their content. Ids past
    the tokenizer's vocabulary (a model's padded embedding) give b"". Other tokenizers fall back
    to decoding each id alone, which is exact for most but not all of them.
    """
    n = vocab_size if vocab_size is not None else len(tokenizer)
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel"
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(n, len(tokenizer)))))
    out = []
    for i in range(n):
        if i in added:
            out.append(added[i].encode("utf-8"))
        elif i >= len(pieces) or pieces[i] is None:
            out.append(b"")
        elif byte_level:
            out.append(bytes(inverse[c] for c in pieces[i]))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """Every token's bytes as an array: `bytes` uint8 [V, M] (0 padded, never read past a
    token's length), `lengths` int32 [V]. uint8 keeps Qwen3's table at V·M ≈ 20 MB."""

    bytes: np.ndarray
    lengths: np.ndarray
    pieces: tuple[bytes, ...]  # the same, for host-side detokenisation

    @classmethod
    def build(cls, pieces: Sequence[bytes | str]) -> "TokenTable":
        pieces = tuple(p.encode("utf-8") if isinstance(p, str) else bytes(p) for p in pieces)
        m = max(8, round_up(max(len(p) for p in pieces), 8))
        table = np.zeros((len(pieces), m), np.uint8)
        for i, p in enumerate(pieces):
            table[i, :len(p)] = np.frombuffer(p, np.uint8)
        return cls(table, np.array([len(p) for p in pieces], np.int32), pieces)

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.pieces[i] for i in ids)


def encode_stops(stops: Sequence[str], *, min_count: int = 4, min_width: int = 8):
    """Stop strings as arrays, padded to buckets so a new list rarely recompiles.

    Returns:
      (reversed_bytes int32 [S, W]: byte j counts from the stop's END, -1 padded;
       lengths int32 [S]: 0 for padding rows, which never match).
    """
    raw = [s.encode("utf-8") for s in stops]
    if any(len(r) == 0 for r in raw):
        raise ValueError("stop strings must be non-empty")
    s = max(min_count, round_up(len(raw), min_count))
    w = max(min_width, round_up(max((len(r) for r in raw), default=1), min_width))
    rev = np.full((s, w), _NO_BYTE, np.int32)
    lengths = np.zeros((s,), np.int32)
    for i, r in enumerate(raw):
        rev[i, :len(r)] = np.frombuffer(r[::-1], np.uint8)
        lengths[i] = len(r)
    return rev, lengths


def match_stops(tail, new_bytes, new_len, stop_rev, stop_len):
    """Finds the first stop string ending inside each row's new token.

    Args:
      tail: int32 [B, W-1] the row's last W-1 generated bytes (-1 where there are none).
      new_bytes: int [B, M] the new token's bytes (padding is never read); new_len: int32 [B].
      stop_rev: int32 [S, W] stop bytes counted from the end; stop_len: int32 [S].
    Returns:
      matched bool [B]; stop index int32 [B] (earliest end, then longest); end int32 [B]
      (index in the new token of the stop's last byte); new tail int32 [B, W-1].
    """
    b, m = new_bytes.shape
    w = stop_rev.shape[1]
    ctx = jnp.concatenate([tail, new_bytes.astype(jnp.int32)], axis=1)  # [B, W-1+M]
    # hit[b, s, e]: stop s ends at byte e of the new token. Byte j from the stop's end sits at
    # ctx[w-1+e-j]; bytes past a stop's length always agree.
    hit = jnp.ones((b, stop_rev.shape[0], m), bool)
    for j in range(w):
        seg = ctx[:, w - 1 - j:w - 1 - j + m]  # [B, M]
        ok = (seg[:, None, :] == stop_rev[None, :, j, None]) | (j >= stop_len)[None, :, None]
        hit = hit & ok
    in_token = jnp.arange(m, dtype=jnp.int32)[None, :] < new_len[:, None]  # [B, M]
    hit = hit & in_token[:, None, :] & (stop_len > 0)[None, :, None]
    any_at = jnp.any(hit, axis=1)  # [B, M]
    matched = jnp.any(any_at, axis=1)
    end = jnp.argmax(any_at, axis=1).astype(jnp.int32)  # first end byte with a hit
    at_end = jnp.take_along_axis(hit, end[:, None, None], axis=2)[:, :, 0]  # [B, S]
    # The longest stop ending there (the first listed among equal lengths).
    which = jnp.argmax(jnp.where(at_end, stop_len[None, :], -1), axis=1).astype(jnp.int32)
    keep = new_len[:, None] + jnp.arange(w - 1, dtype=jnp.int32)[None, :]
    new_tail = jnp.take_along_axis(ctx, keep, axis=1)
    return matched, which, end, new_tail
