"""The scoring contexts of one response, as token cuts of prompt + response.

Every context of docs/METHOD.md §2.1 is a prefix of the token sequence prompt + response,
with one exception: a response without "<think>" has c_0 = x + "<think>", a prefix plus one
extra token. `Context(prefix_len, extra_token)` covers both; the kernel and the naive path
take lists of them, in the order `[c_full, c_0, c_1, …, c_K]`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from opera_jax.reward.segments import ThinkBlock, tokens_before

# Index of each named context in a response's context list; segments follow.
FULL, INITIAL, FIRST_SEGMENT = 0, 1, 2


class Context(NamedTuple):
    """Context tokens = sequence[:prefix_len] (+ [extra_token] when not None)."""

    prefix_len: int
    extra_token: int | None = None

    def length(self) -> int:
        return self.prefix_len + (self.extra_token is not None)


def plan_contexts(block: ThinkBlock, offsets: Sequence[tuple[int, int]], *, prompt_len: int,
                  think_open_id: int) -> list[Context]:
    """The K + 2 contexts of a response, as cuts of prompt + response tokens.

    Args:
      block: the response's think block (character cuts).
      offsets: character span of each response token (see segments.tokens_before).
      prompt_len: number of prompt tokens before the response.
      think_open_id: id of "<think>", appended to the prompt for c_0 when the response has
        no "<think>".
    Returns:
      [c_full, c_0, c_1, …, c_K].
    """
    full = Context(prompt_len + len(offsets))
    if block.initial_cut is None:
        initial = Context(prompt_len, think_open_id)
    else:
        initial = Context(prompt_len + tokens_before(offsets, block.initial_cut))
    segments = [Context(prompt_len + tokens_before(offsets, s.cut)) for s in block.segments]
    return [full, initial, *segments]


def check_contexts(sequence_len: int, contexts: Sequence[Context], *, sample: int) -> None:
    """Raises ValueError unless every context is a non-empty prefix of the sequence."""
    for j, c in enumerate(contexts):
        if not 0 <= c.prefix_len <= sequence_len or c.length() < 1:
            raise ValueError(f"sample {sample}: context {j} {c} is not a non-empty prefix of a "
                             f"sequence of {sequence_len} tokens")
