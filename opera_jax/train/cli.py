"""Command-line entry for the training loops: `--config=<file.py>` plus dotted overrides.

    python -m opera_jax.train.sft --config=configs/sft_tiny.py --config.sft.steps=20

ml_collections' config_flags parses the overrides; an unknown key is caught first and reported
with the valid keys at that level, e.g.

    unknown config key 'sft.stepz'; valid keys under 'sft': batch_size, chunk_size, …
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any, Callable, Sequence

import ml_collections


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config()` (or `get_config(arg)` for "file.py:arg") of a config file."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_opera_config", path)
    if module_spec is None:
        raise FileNotFoundError(f"cannot load config file {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def check_overrides(config: ml_collections.ConfigDict, argv: Sequence[str]) -> str | None:
    """A message naming the first `--config.<key>=` override whose key the config lacks, with
    the valid keys at that level; None when all overrides exist."""
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        dotted = arg[len("--config."):].split("=", 1)[0]
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


def run(train_fn: Callable[[ml_collections.ConfigDict], Any],
        argv: Sequence[str] | None = None, *, default_config: str | None = None) -> None:
    """absl app: parse `--config` (+ overrides), then `train_fn(config)`.

    `default_config`: a config file used when no `--config=` is given (the embedded default).
    """
    from absl import app, flags
    from ml_collections import config_flags

    # Unknown keys are reported before absl sees them: with a default config file, defining
    # the flag already applies the command line's overrides (and fails with a traceback).
    args = list(sys.argv if argv is None else argv)
    spec = next((a.split("=", 1)[1] for a in args if a.startswith("--config=")), default_config)
    if spec is not None:
        message = check_overrides(load_config_file(spec), args)
        if message:
            print(message, file=sys.stderr)
            sys.exit(2)
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", default_config, "ml_collections config file",
                                        lock_config=True)

    def parse(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # a bad value: the message names the flag
            print(e, file=sys.stderr)
            sys.exit(2)

    def main(args):
        # Orbax logs every save step at INFO through absl; keep those to warnings.
        logging.getLogger("absl").setLevel(logging.WARNING)
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        if flags.FLAGS.config is None:
            raise app.UsageError("--config=<file.py> is required")
        from opera_jax import distributed

        distributed.initialize()  # no-op for a single process
        train_fn(flags.FLAGS.config)

    app.run(main, argv=argv, flags_parser=parse)
