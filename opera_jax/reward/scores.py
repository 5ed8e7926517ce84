"""The pure parts of the reward: group rank, reflection count, the math path (numpy / str).

docs/METHOD.md §2.2–2.4 and the `math` task. Everything here is float32 / int on the host and
has no model in it, so each rule is tested by hand-computed cases.
"""

from __future__ import annotations

import re
from typing import Callable, Hashable, Sequence

import numpy as np

from opera_jax.reward.config import MathMatch
from opera_jax.reward.segments import parse_think_block

_BOXED = "\\boxed{"


def rank_scores(lp_full: Sequence[float], group_ids: Sequence[Hashable]) -> np.ndarray:
    """Group rank term: (#responses of the group with strictly lower LP(c_full)) / (G − 1).

    Ties take the lower rank (a group of equal LPs scores 0 everywhere); a group of one
    scores 1.0.

    Args:
      lp_full: LP(c_full) per response, finite.
      group_ids: group (prompt) of each response; any hashable values.
    Returns:
      float32 [B] in [0, 1].
    """
    lp = np.asarray(lp_full, np.float64)
    groups: dict[Hashable, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    out = np.ones((len(lp),), np.float32)
    for members in groups.values():
        if len(members) == 1:
            continue
        values = lp[members]
        lower = (values[None, :] < values[:, None]).sum(axis=1)
        out[members] = lower / (len(members) - 1)
    return out


def reflection_count(lp_initial: float, lp_segments: Sequence[float],
                     keyword_flags: Sequence[bool]) -> int:
    """Segments that contain a keyword AND raise LP above the previous context's.

    Walks k = 1..K with prev = LP(c_0); segment k counts when `keyword_flags[k]` and
    LP(c_k) > prev (strictly: an equal LP does not count); prev then moves to LP(c_k) whether
    or not k counted.
    """
    if len(lp_segments) != len(keyword_flags):
        raise ValueError(f"{len(lp_segments)} segment LPs for {len(keyword_flags)} segments")
    count, prev = 0, lp_initial
    for lp, flagged in zip(lp_segments, keyword_flags):
        if flagged and lp > prev:
            count += 1
        prev = lp
    return count


def reflection_score(count: int | np.ndarray) -> np.ndarray:
    """tanh(count / 2), float32."""
    return np.tanh(np.asarray(count, np.float32) / np.float32(2.0)).astype(np.float32)


def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{…}` in `text` (nested braces allowed), or None."""
    start = text.rfind(_BOXED)
    while start >= 0:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOXED):i - 1]
        start = text.rfind(_BOXED, 0, start)  # unclosed: try the one before it
    return None


_PUBLISHED_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_PUBLISHED_BOXED = re.compile(r"\\boxed\{(.*?)\}")


def published_math_reward(response: str, reference: str) -> float:
    r"""The published check, exactly: every `<think>…</think>` block removed (an unclosed one
    stays, as answer text); the content of the last `\\boxed{…}` match of the non-greedy regex
    `\\boxed\{(.*?)\}` (it stops at the first "}" and does not cross a newline), or the whole
    remaining text when nothing matches; 1.0 when it equals the reference, both stripped."""
    answer = _PUBLISHED_THINK.sub("", response)
    found = _PUBLISHED_BOXED.findall(answer)
    return float((found[-1] if found else answer).strip() == reference.strip())


def math_reward(response: str, reference: str) -> float:
    """1.0 when the last `\\boxed{}` outside the think block equals the reference, else 0.0.

    Both sides are compared after `str.strip()`. The answer part is the response outside the
    think block (see `ThinkBlock.answer`): a box only inside the thinking, or a response cut off
    inside an unclosed think block, scores 0; so does a missing box.
    """
    boxed = last_boxed(parse_think_block(response).answer)
    return float(boxed is not None and boxed.strip() == reference.strip())


def math_verify_reward(response: str, reference: str) -> float:
    """1.0 when math-verify (`pip install math-verify`) finds the answer part — the response
    outside the think block, as `math_reward` — equal to the reference: both are parsed as
    LaTeX / expressions (\\boxed{} first), so 0.5, 1/2 and \\frac{1}{2} match."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise ImportError("reward.math_match=math_verify needs the math-verify package: "
                          "pip install -e \".[math]\"") from None
    answer = parse_think_block(response).answer
    if not answer.strip():
        return 0.0
    return float(verify(parse(reference), parse(answer)))


def math_check(match: MathMatch) -> Callable[[str, str], float]:
    """The (response, reference) -> 0/1 check of `reward.math_match`."""
    return {MathMatch.EXACT: math_reward, MathMatch.PUBLISHED: published_math_reward,
            MathMatch.MATH_VERIFY: math_verify_reward}[match]
