"""Resumable Orbax checkpoints: train state, data position and config, saved asynchronously.

One checkpoint step holds three items:
  state   the TrainState (params, optimizer state, step, rng) — every host writes its shards
  data    each host's Grain iterator position (`process_<i>-of-<n>.json`)
  config  the run's config as JSON (what produced these weights)

`save` returns once the arrays are copied off the device; the files are written in the
background. A save that failed in the background is reported by the next `save` or by `close`,
in one line naming the step directory and the OS error (`CheckpointWriteError`). Older steps
beyond `keep` are deleted. `restore` puts every array straight into the sharding of the
abstract target — no host ever holds a full unsharded copy; `restore_params` reads only the
parameters (one trainer starting from another's checkpoint, e.g. GRPO from SFT).

Damaged checkpoints: `restore_or_init` tries the newest step first; one that cannot be read
(a file cut short by a full disk, a deleted shard) is logged in one line, moved aside to
`<step>.unreadable` (kept for inspection, out of the way of the run's next save of that
step) and the next older one is tried.

Preemption: multi-host runs get SIGTERM through JAX's preemption service; a single-process run
opts in with `with catch_sigterm():`, which turns SIGTERM into `reached_preemption() == True`
(save, then stop) instead of killing the process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Callable

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

UNREADABLE_SUFFIX = ".unreadable"


class CheckpointWriteError(OSError):
    """A checkpoint save failed (often in the background): the message names the step
    directory and the OS error."""


def checkpoint_dir(path: str) -> str:
    """The checkpoints/ folder of a run dir (or `path` itself when it is one)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


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


_SIGTERM = threading.Event()
_DEPTH = [0]  # nesting of catch_sigterm blocks (the outermost one clears the flag)

# Exit status of a command whose stage stopped on SIGTERM / preemption after saving its state
# (EX_TEMPFAIL: rerun the same command to resume).
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """A stage stopped early on SIGTERM or a preemption notice, after saving what it had; the
    same command resumes it. Later stages must not run."""


@contextlib.contextmanager
def catch_sigterm():
    """Within this block, SIGTERM sets a flag (`sigterm_received`, and
    `Checkpointer.reached_preemption`) instead of killing the process: loops save and stop.

    Only in a single-process run and on the main thread (where Python delivers signals);
    elsewhere it does nothing, and multi-host runs rely on JAX's preemption service. Blocks
    nest (a stage inside the command line's block); the outermost clears the flag on entry,
    and the previous handler is put back on exit.
    """
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    if _DEPTH[0] == 0:
        _SIGTERM.clear()
    _DEPTH[0] += 1
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _DEPTH[0] -= 1


def sigterm_received() -> bool:
    """Whether SIGTERM arrived inside the current (or last) `catch_sigterm()` block."""
    return _SIGTERM.is_set()


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
        self._saving: int | None = None  # the step of the newest save started

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster signalled preemption (or SIGTERM arrived inside
        `catch_sigterm()`): save now and stop."""
        return _SIGTERM.is_set() or self._mngr.reached_preemption(step)

    def _raise_failed_save(self) -> None:
        """Reports a save that failed in the background, in one line naming its directory."""
        step = self._saving
        try:
            self._mngr.check_for_errors()
        except Exception as e:  # orbax wraps the OS error; find it
            cause = e
            while cause.__cause__ is not None and not isinstance(cause, OSError):
                cause = cause.__cause__
            where = os.path.join(self.directory, str(step)) if step is not None else \
                self.directory
            raise CheckpointWriteError(f"checkpoint save to {where} failed: "
                                       f"{type(cause).__name__}: {cause}") from None

    def save(self, step: int, state, *, config: dict,
             data_iter: grain.DatasetIterator | None = None) -> None:
        """Starts saving `state` (and the iterator position, the config) as `step`.

        The iterator's position is read now, so call this after the step's batch was taken
        and before the next one is. A previous save that failed raises here.

        Args:
          config: the run's config as a JSON-safe dict.
        """
        self._raise_failed_save()
        items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        try:
            self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        except OSError as e:
            raise CheckpointWriteError(f"checkpoint save to "
                                       f"{os.path.join(self.directory, str(step))} failed: "
                                       f"{type(e).__name__}: {e}") from None
        self._saving = step

    def restore(self, step: int, abstract_state, *,
                data_iter: grain.DatasetIterator | None = None, config: dict | None = None):
        """Restores checkpoint `step` onto the shardings of `abstract_state`.

        Args:
          step: the checkpoint step (e.g. `latest_step()`).
          abstract_state: the TrainState as ShapeDtypeStructs with `.sharding` set.
          data_iter: repositioned in place to where the saved run stood (None: not restored).
          config: the current config (JSON-safe dict); keys that differ are logged.
        Returns:
          (state, saved_config_dict).
        """
        items = dict(state=ocp.args.StandardRestore(abstract_state),
                     config=ocp.args.JsonRestore())
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        if config is not None:
            diff = config_diff(out.config, config)
            if diff:
                log.warning("resuming step %d with a config that differs from the saved one:"
                            "\n  %s", step, "\n  ".join(diff))
        return out.state, out.config

    def restore_or_init(self, abstract_state, init: Callable[[], object], *,
                        data_iter: grain.DatasetIterator | None = None,
                        config: dict | None = None):
        """(state, step): the newest readable checkpoint restored (see `restore`), or `init()`
        at step 0 when there is none. Rerunning a command therefore resumes it.

        An unreadable checkpoint is logged in one line, moved aside (`<step>.unreadable`)
        and the next older one is tried.
        """
        for step in reversed(self.all_steps()):
            try:
                state, _ = self.restore(step, abstract_state, data_iter=data_iter,
                                        config=config)
            except Exception as e:  # noqa: BLE001 — any failure to read means "damaged"
                self._set_aside(step, e)
                continue
            log.info("resumed from step %d", step)
            return state, step
        return init(), 0

    def _set_aside(self, step: int, error: Exception) -> None:
        path = os.path.join(self.directory, str(step))
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        log.warning("checkpoint %s is unreadable (%s: %s); moved to %s%s, trying an older one",
                    path, type(error).__name__, first[:200], path, UNREADABLE_SUFFIX)
        if jax.process_index() == 0:
            aside = path + UNREADABLE_SUFFIX
            n = 1
            while os.path.exists(aside):
                aside, n = f"{path}{UNREADABLE_SUFFIX}.{n}", n + 1
            os.replace(path, aside)
        self._mngr.reload()

    def restore_params(self, step: int, abstract_params):
        """Only `state.params` of checkpoint `step`, each array read straight into the sharding
        and dtype of `abstract_params` (a tree of ShapeDtypeStructs); nothing else is read."""
        args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype),
                            abstract_params)
        item = ocp.args.PyTreeRestore(item={"params": abstract_params},
                                      restore_args={"params": args}, partial_restore=True)
        return self._mngr.restore(step, args=ocp.args.Composite(state=item)).state["params"]

    def saved_config(self, step: int) -> dict:
        """The config checkpoint `step` was saved with (a nested dict)."""
        return self._mngr.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        """Blocks until every started save is on disk; raises if one failed."""
        self._mngr.wait_until_finished()
        self._raise_failed_save()

    def close(self) -> None:
        """Waits for the last save and closes; a failed save raises (after closing)."""
        try:
            self._mngr.wait_until_finished()
            self._raise_failed_save()
        finally:
            self._mngr.close()
