"""Resumable Orbax checkpoints: train state, data position and config, saved asynchronously.

One checkpoint step holds three items:
  state   the TrainState (params, optimizer state, step, rng) — every host writes its shards
  data    each host's Grain iterator position (`process_<i>-of-<n>.json`)
  config  the run's config as JSON (what produced these weights)

`save` returns once the arrays are copied off the device; the files are written in the
background (`wait()` blocks until they are complete). Older steps beyond `keep` are deleted.
`restore` puts every array straight into the sharding of the abstract target — no host ever
holds a full unsharded copy; `restore_params` reads only the parameters (one trainer starting
from another's checkpoint, e.g. GRPO from SFT).

Preemption: multi-host runs get SIGTERM through JAX's preemption service; a single-process run
opts in with `with catch_sigterm():`, which turns SIGTERM into `reached_preemption() == True`
(save, then stop) instead of killing the process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from typing import Callable

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (for a resume warning)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe nested dict of the config (tuples become lists)."""
    return json.loads(config.to_json_best_effort())


_SIGTERM = threading.Event()


@contextlib.contextmanager
def catch_sigterm():
    """Within this block, SIGTERM sets a flag that `Checkpointer.reached_preemption` reports.

    Only in a single-process run and on the main thread (where Python delivers signals);
    elsewhere it does nothing, and multi-host runs rely on JAX's preemption service. The
    previous handler is put back on exit.
    """
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    _SIGTERM.clear()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _SIGTERM.clear()


class Checkpointer:
    """Orbax CheckpointManager for train state + data iterator + config.

    Args:
      directory: where the numbered step directories go (created on first save).
      keep: how many of the newest checkpoints to keep (None: all).
      async_save: write files in a background thread.
    """

    def __init__(self, directory: str, *, keep: int | None = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster signalled preemption (or SIGTERM arrived inside
        `catch_sigterm()`): save now and stop."""
        return _SIGTERM.is_set() or self._mngr.reached_preemption(step)

    def save(self, step: int, state, *, config: ml_collections.ConfigDict,
             data_iter: grain.DatasetIterator | None = None) -> None:
        """Starts saving `state` (and the iterator position, the config) as `step`.

        The iterator's position is read now, so call this after the step's batch was taken
        and before the next one is.
        """
        items = dict(state=ocp.args.StandardSave(state),
                     config=ocp.args.JsonSave(config_to_dict(config)))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._mngr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state, *,
                data_iter: grain.DatasetIterator | None = None,
                config: ml_collections.ConfigDict | None = None):
        """Restores checkpoint `step` onto the shardings of `abstract_state`.

        Args:
          step: the checkpoint step (e.g. `latest_step()`).
          abstract_state: the TrainState as ShapeDtypeStructs with `.sharding` set.
          data_iter: repositioned in place to where the saved run stood (None: not restored).
          config: the current config; keys that differ from the saved one are logged.
        Returns:
          (state, saved_config_dict).
        """
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     config=ocp.args.JsonRestore())
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        if config is not None:
            diff = config_diff(out.config, config_to_dict(config))
            if diff:
                log.warning("resuming step %d with a config that differs from the saved one:"
                            "\n  %s", step, "\n  ".join(diff))
        return out.state, out.config

    def restore_or_init(self, abstract_state, init: Callable[[], object], *,
                        data_iter: grain.DatasetIterator | None = None,
                        config: ml_collections.ConfigDict | None = None):
        """(state, step): the newest checkpoint restored (see `restore`), or `init()` at step 0
        when there is none yet. Rerunning a command therefore resumes it."""
        start = self.latest_step() or 0
        if not start:
            return init(), 0
        state, _ = self.restore(start, abstract_state, data_iter=data_iter, config=config)
        log.info("resumed from step %d", start)
        return state, start

    def restore_params(self, step: int, abstract_params):
        """Only `state.params` of checkpoint `step`, each array read straight into the sharding
        and dtype of `abstract_params` (a tree of ShapeDtypeStructs); nothing else is read."""
        args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype),
                            abstract_params)
        item = ocp.args.PyTreeRestore(item={"params": abstract_params},
                                      restore_args={"params": args}, partial_restore=True)
        return self._mngr.restore(step, args=ocp.args.Composite(state=item)).state["params"]

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def end_step(step: int, state, *, ckpt: Checkpointer, writer, metrics: Callable[[], dict],
             log_due: Callable[[int], bool], ckpt_due: Callable[[int], bool],
             config: ml_collections.ConfigDict, data_iter=None) -> bool:
    """The end of a host-loop step: log and checkpoint when due; on preemption, save and stop.

    Args:
      metrics: gives the step's metrics; called only when they are written (it may sync with
        the device). `writer.write` raises on NaN/Inf, before any checkpoint is saved.
      log_due / ckpt_due: `Every` helpers.
    Returns:
      True when the loop must stop (preemption signalled; the state is saved).
    """
    writer.advance()
    preempted = ckpt.reached_preemption(step)
    if log_due(step) or ckpt_due(step) or preempted:
        writer.write(step, metrics())
    if ckpt_due(step) or preempted:
        ckpt.save(step, state, config=config, data_iter=data_iter)
    if preempted:
        log.warning("preemption signalled: saved step %d, stopping", step)
    return preempted
