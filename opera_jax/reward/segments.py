"""Host side: the think block, its paragraphs, keyword matching, and character → token cuts.

docs/METHOD.md §2.1 defines every context as the prompt plus the response text cut at a
character offset b. This module finds those offsets in the response text and maps each to a
token count through the response's offset mapping.

Paragraph split. The think block's text (between "<think>" and the first "</think>" after
it) is split at blank-line runs: a maximal run of whitespace that contains "\\n\\n". The cut
after a paragraph falls just after the LAST newline of the run that follows it (indentation of
the next line stays with the next paragraph); the last paragraph ends at the offset of
"</think>". Whitespace-only pieces (before the first or after the last run) are dropped. The
paragraph set is the published `text.split("\\n\\n")` after stripping and dropping empty
pieces; a line holding only spaces ("a\\n \\nb") is not a split, as in the published code.

Cuts on tokens. A context cut at character b holds the response tokens whose span ends at or
before b. With Qwen3's tokenizer every cut used here is a token boundary: the pre-tokenizer
ends a whitespace run at its last newline (`\\s*[\\r\\n]+`) and the think tags are tokens of
their own. For a tokenizer where a token straddles b (e.g. one that merges "\\n\\nWait"), the
cut rounds DOWN to the boundary before that token: the context never holds text past b, at the
price of losing the straddling token's part before b.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np
from tokenizers.decoders import DecodeStream

from opera_jax.reward.config import KeywordMatch
from opera_jax.tokenizer import THINK_CLOSE, THINK_OPEN

_WHITESPACE_RUN = re.compile(r"\s+")
_WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class Segment:
    """One reflection segment: a paragraph of the think block (or the merged tail past a cap).

    Attributes:
      text: the paragraph's text, stripped (merged paragraphs joined by "\\n\\n").
      cut: b_k, the character offset in the response where the context c_k ends.
    """

    text: str
    cut: int


@dataclasses.dataclass(frozen=True)
class ThinkBlock:
    """Where the contexts of one response are cut (character offsets into the response).

    Attributes:
      initial_cut: b_0, just after the first "<think>"; None when the response has no
        "<think>" (then c_0 = x + "<think>").
      closed: a "</think>" follows that "<think>".
      segments: the K segments in order; empty when the block is not closed (a truncated
        response), empty, or whitespace only.
      answer: the response text outside the think block (all of it without "<think>"; the text
        before "<think>" when the block is not closed).
    """

    initial_cut: int | None
    closed: bool
    segments: tuple[Segment, ...]
    answer: str


def parse_think_block(response: str, *, max_segments: int | None = None) -> ThinkBlock:
    """Finds b_0 and the paragraphs b_1..b_K of a response (docs/METHOD.md §2.1).

    Args:
      response: the response text y.
      max_segments: cap on K; paragraphs past it merge into the last segment (see
        `RewardConfig.max_segments`).
    Returns:
      The `ThinkBlock`.
    """
    open_at = response.find(THINK_OPEN)
    if open_at < 0:
        return ThinkBlock(initial_cut=None, closed=False, segments=(), answer=response)
    body_start = open_at + len(THINK_OPEN)
    close_at = response.find(THINK_CLOSE, body_start)
    if close_at < 0:
        return ThinkBlock(initial_cut=body_start, closed=False, segments=(),
                          answer=response[:open_at])
    answer = response[:open_at] + response[close_at + len(THINK_CLOSE):]
    segments = _paragraphs(response, body_start, close_at)
    if max_segments is not None and len(segments) > max_segments:
        tail = segments[max_segments - 1:]
        merged = Segment(text="\n\n".join(s.text for s in tail), cut=tail[-1].cut)
        segments = segments[:max_segments - 1] + [merged]
    return ThinkBlock(initial_cut=body_start, closed=True, segments=tuple(segments),
                      answer=answer)


def _paragraphs(text: str, start: int, end: int) -> list[Segment]:
    """Paragraphs of text[start:end]; the last one ends at `end`."""
    pieces = []  # (piece start, piece end, cut after the blank-line run that follows)
    pos = start
    for run in _WHITESPACE_RUN.finditer(text, start, end):
        if "\n\n" in run.group():
            cut = run.start() + run.group().rfind("\n") + 1
            pieces.append((pos, run.start(), cut))
            pos = cut
    pieces.append((pos, end, end))
    kept = [(a, b, cut) for a, b, cut in pieces if text[a:b].strip()]
    out = [Segment(text=text[a:b].strip(), cut=cut) for a, b, cut in kept]
    if out:
        out[-1] = dataclasses.replace(out[-1], cut=end)
    return out


@functools.lru_cache(maxsize=64)
def keyword_regex(keywords: tuple[str, ...]) -> re.Pattern:
    """Whole-word, case-insensitive alternation of `keywords` (no letter, digit or "_" on
    either side; any whitespace run between a keyword's words), longest first, so that
    "Wait a minute" is found once rather than also as "Wait"."""
    words = sorted(keywords, key=len, reverse=True)
    alternatives = (r"\s+".join(map(re.escape, k.split())) for k in words)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def has_keyword(text: str, keywords: Sequence[str], mode: KeywordMatch = KeywordMatch.WORD
                ) -> bool:
    """Whether `text` contains any of `keywords`, case-insensitively.

    Args:
      text: a segment's text.
      keywords: reflection keywords.
      mode: WORD — whole words (no letter, digit or "_" on either side); SUBSTRING — the
        published plain substring test ("but" fires inside "attribute").
    """
    mode = KeywordMatch(mode)
    if mode is KeywordMatch.SUBSTRING:
        lowered = text.lower()
        return any(k.lower() in lowered for k in keywords)
    return keyword_regex(tuple(keywords)).search(text) is not None


def content_words(text: str, keywords: Sequence[str] = ()) -> frozenset[str]:
    """The lower-cased words of `text`, without the words of `keywords`."""
    skip = {w.lower() for k in keywords for w in _WORD.findall(k)}
    return frozenset(w for w in (m.lower() for m in _WORD.findall(text)) if w not in skip)


def near_repeat(words: frozenset[str], earlier: Sequence[frozenset[str]], *,
                threshold: float) -> bool:
    """Whether a paragraph's content words overlap an earlier paragraph's by at least
    `threshold` (Jaccard: |a ∩ b| / |a ∪ b|); an empty paragraph repeats nothing."""
    if not words:
        return False
    return any(len(words & e) / len(words | e) >= threshold for e in earlier if e)


def tokens_before(offsets: Sequence[tuple[int, int]], cut: int) -> int:
    """How many tokens a context cut at character `cut` keeps: those ending at or before it.

    Args:
      offsets: (start, end) character span of each token, in order (spans tile the text, as
        `encode_with_offsets` and `decode_with_offsets` give them).
      cut: character offset b.
    Returns:
      The token count p, so the context holds tokens [0, p). A token straddling the cut
      (start < cut < end) and everything after it is left out (the cut rounds down).
    """
    if not len(offsets):
        return 0
    ends = np.maximum.accumulate(np.asarray(offsets, np.int64).reshape(-1, 2)[:, 1])
    return int(np.searchsorted(ends, cut, side="right"))


def decode_with_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """Text of token ids with each token's character span, for ids the policy sampled.

    Re-encoding decoded text may not give back the sampled ids, so the spans come from
    decoding the ids themselves, token by token (the tokenizer's streaming decoder). Tokens
    that hold part of a character's UTF-8 bytes all get that character's span, as in
    `encode_with_offsets`; bytes left incomplete at the end get an empty span at the end.

    Args:
      tokenizer: a fast `transformers` tokenizer.
      ids: token ids.
    Returns:
      (text, offsets) with `offsets[i]` the span of `ids[i]` in `text`.
    """
    backend = tokenizer.backend_tokenizer
    stream = DecodeStream(skip_special_tokens=False)
    chunks, offsets, pending, pos = [], [], 0, 0
    for i in ids:
        chunk = stream.step(backend, int(i))
        if chunk is None:
            pending += 1
            continue
        offsets.extend([(pos, pos + len(chunk))] * (pending + 1))
        pending = 0
        chunks.append(chunk)
        pos += len(chunk)
    offsets.extend([(pos, pos)] * pending)
    return "".join(chunks), offsets
