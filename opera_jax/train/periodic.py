"""The one "every n steps" helper for the host loops (log, checkpoint, eval)."""

from __future__ import annotations


class Every:
    """True on steps that are multiples of `n`, and on `last_step` when given.

    Args:
      n: the period in steps; n <= 0 means never (except `last_step`).
      last_step: a step that always fires (the end of training), or None.

    Example: `Every(10, last_step=25)` fires on 10, 20 and 25.
    """

    def __init__(self, n: int, *, last_step: int | None = None):
        self.n, self.last_step = int(n), last_step

    def __call__(self, step: int) -> bool:
        return (self.n > 0 and step % self.n == 0) or step == self.last_step
