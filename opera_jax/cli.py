"""The command line: absl flags with an ml_collections config, one style for every entry point.

    python -m opera_jax.train [--config=configs/<name>.py] [--config.<key>=<value> ...]
    python -m opera_jax.eval --source=sft=DIR --source=grpo=DIR --out=DIR [--config.n=4 ...]
    python -m opera_jax.export --checkpoint=RUN --out=DIR [--step=N] [--dtype=bfloat16]

`python -m opera_jax.train` runs the stage a config names (`stage`: pipeline, synth, sft,
grpo); with no `--config` it runs the embedded default, the main job. An unknown override is
reported with the valid keys at its level, a bad value with its key and the valid values:

    unknown config key 'grpo.stepz'; valid keys under 'grpo': chunk_size, grad_accum, …
    config.grpo.old_logprobs='foo' is not one of: auto, sampler, recompute

Exit status: 0 done; 2 bad input (config, data, a held workdir); `PREEMPTED_EXIT` (75) a stage
stopped on SIGTERM after saving its state (rerun the same command to resume).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from opera_jax import distributed
from opera_jax.checkpoint import PREEMPTED_EXIT, Preempted, catch_sigterm
from opera_jax.config.parse import ConfigError
from opera_jax.data.jsonl import BadRowError
from opera_jax.data.pipeline import EmptyDataError
from opera_jax.locks import WorkdirLocked

# What a command reports in one line and exits with 2 on: bad input, not a bug.
USER_ERRORS = (ConfigError, BadRowError, EmptyDataError, WorkdirLocked, FileNotFoundError,
               FileExistsError)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(arg)` for "file.py:arg") of a config file."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_opera_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str],
                    flag: str = "config") -> str | None:
    """A message naming the first `--config.<key>=` override whose key the config lacks, with
    the valid keys at that level; None when all overrides exist."""
    prefix = f"--{flag}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        dotted = arg[len(prefix):].split("=", 1)[0]
        node, parts = config, dotted.split(".")
        for i, part in enumerate(parts):
            is_dict = isinstance(node, ml_collections.ConfigDict)
            if not is_dict or part not in node:
                where = ".".join(parts[:i])
                valid = (", ".join(sorted(node.keys())) if is_dict
                         else f"none ({where} holds a {type(node).__name__} value)")
                return (f"unknown config key {dotted!r}; valid keys under "
                        f"{where or 'the config'!r}: {valid}")
            node = node[part]
    return None


def define_config(default: ml_collections.ConfigDict | Callable[[], ml_collections.ConfigDict],
                  argv: Sequence[str]) -> None:
    """Defines `--config`: a config file when the command line names one, else `default`.

    Unknown override keys are reported (exit 2) before absl sees them: defining the flag
    already applies the overrides, and would fail with a traceback.
    """
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    try:
        config = load_config_file(spec) if spec is not None else (
            default() if callable(default) else default)
    except FileNotFoundError as e:
        _fail(str(e))
    message = check_overrides(config, argv)
    if message:
        _fail(message)
    if "config" in flags.FLAGS:
        return
    if spec is not None:
        config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                        lock_config=True)
    else:
        config_flags.DEFINE_config_dict("config", config, "the embedded default config",
                                        lock_config=True)


def _fail(message: str, status: int = 2):
    print(message, file=sys.stderr)
    sys.exit(status)


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a bad value: the message names the flag
        _fail(str(e))


def run_main(main: Callable[[], object]) -> None:
    """Runs `main` as a command: multi-process start-up, SIGTERM turned into a saved stop,
    bad input reported in one line (exit 2), a preempted stage exiting with PREEMPTED_EXIT."""
    # Orbax logs every save step at INFO through absl; keep those to warnings.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("opera_jax").setLevel(logging.INFO)
    distributed.initialize()  # no-op for a single process
    try:
        with catch_sigterm():
            main()
    except Preempted as e:
        _fail(f"preempted: {e}", PREEMPTED_EXIT)
    except USER_ERRORS as e:
        _fail(f"error: {e}")
