"""The periodic work of the host loops: the "every n steps" helper and the end of a step."""

from __future__ import annotations

import logging
from typing import Callable

from opera_jax.checkpoint import Checkpointer

log = logging.getLogger(__name__)


class Every:
    """True on steps that are multiples of `n`, and on `last_step` when given.

    Args:
      n: the period in steps; None (or <= 0) means never (except `last_step`).
      last_step: a step that always fires (the end of training), or None.

    Example: `Every(10, last_step=25)` fires on 10, 20 and 25.
    """

    def __init__(self, n: int | None, *, last_step: int | None = None):
        self.n, self.last_step = int(n or 0), last_step

    def __call__(self, step: int) -> bool:
        return (self.n > 0 and step % self.n == 0) or step == self.last_step


def end_step(step: int, state, *, ckpt: Checkpointer, writer, metrics: Callable[[], dict],
             log_due: Every, ckpt_due: Every, config: dict, data_iter=None) -> bool:
    """The end of a host-loop step: log and checkpoint when due; on preemption, save.

    Args:
      metrics: gives the step's metrics; called only when they are written (it may sync with
        the device). `writer.write` raises on NaN/Inf, before any checkpoint is saved.
      config: the run's config as a JSON-safe dict (saved with the checkpoint).
    Returns:
      True when the loop must stop (SIGTERM or a preemption notice; the state is saved).
    """
    writer.advance()
    preempted = ckpt.reached_preemption(step)
    if log_due(step) or ckpt_due(step) or preempted:
        writer.write(step, metrics())
    if ckpt_due(step) or preempted:
        ckpt.save(step, state, config=config, data_iter=data_iter)
    if preempted:
        log.warning("preemption signalled: saving step %d and stopping", step)
    return preempted
