"""What the responses look like, beyond the reward: the signs of a policy gaming it.

A reward that never reads the answer can rise while the text falls apart (docs/METHOD.md §6).
These host-side measures make that visible while it happens and at evaluation:

  think_closed       the think block was closed (else K = 0 and the answer is missing)
  repeat_ngram       share of the response's token 4-grams that already occurred in it
  repeat_paragraph   share of think paragraphs that near-repeat an earlier one (the same words
                     once the reflection keywords are set aside, see `near_repeat`)
  truth/*            on prompts with a checkable ground truth (the embedded toy domain,
                     `toy_domain.check_answer`): answer well-formed, color, place, correct
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from opera_jax.data import toy_domain
from opera_jax.reward.segments import ThinkBlock, content_words, near_repeat, parse_think_block

NGRAM = 4


def repeated_ngram_share(ids: Sequence[int], n: int = NGRAM) -> float:
    """Share of the token n-grams of `ids` that occurred earlier in `ids` (0 when it has none)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def repeated_paragraph_share(block: ThinkBlock, keywords: Sequence[str], *,
                             threshold: float = 0.8) -> float:
    """Share of the think block's paragraphs that near-repeat an earlier one (0 for none)."""
    seen: list[frozenset[str]] = []
    repeats = 0
    for segment in block.segments:
        words = content_words(segment.text, keywords)
        repeats += near_repeat(words, seen, threshold=threshold)
        seen.append(words)
    return repeats / len(block.segments) if block.segments else 0.0


def response_quality(prompt: str, text: str, ids: Sequence[int], *,
                     keywords: Sequence[str]) -> dict[str, float]:
    """The measures of one response (text decoded without special tokens)."""
    block = parse_think_block(text)
    out = {"think_closed": float(block.closed),
           "repeat_ngram": repeated_ngram_share(list(ids)),
           "repeat_paragraph": repeated_paragraph_share(block, keywords)}
    truth = toy_domain.check_answer(prompt, block.answer) if block.closed else (
        None if toy_domain.scene_of(prompt) is None else dict.fromkeys(
            ("well_formed", "color", "place", "correct"), False))
    if truth is not None:
        out.update({f"truth/{k}": float(v) for k, v in truth.items()})
    return out


def mean_quality(rows: Sequence[dict[str, float]], prefix: str) -> dict[str, float]:
    """Means of `response_quality` rows, each key over the rows that have it."""
    keys = dict.fromkeys(k for r in rows for k in r)
    return {prefix + k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
