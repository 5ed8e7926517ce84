"""`python -m opera_jax.train [--config=configs/<name>.py] [--config.<key>=<value> ...]`.

Runs the stage a config names (`stage`: pipeline, synth, sft, grpo); without `--config`, the
embedded default (`opera_jax.config.setups.default`): the main job, every OPERA stage on the
toy domain, on the CPU, in minutes. See opera_jax/cli.py for the exit statuses.
"""

import sys

from absl import app, flags

from opera_jax import cli, pipeline
from opera_jax.config.runs import GRPORun, PipelineRun, SFTRun, SynthRun, parse
from opera_jax.config.setups import default
from opera_jax.synth import synthesize
from opera_jax.train import grpo, sft

STAGES = {PipelineRun: pipeline.run, SynthRun: synthesize, SFTRun: sft.train,
          GRPORun: grpo.train}


def dispatch(run) -> object:
    """Runs a parsed config's stage; returns what the stage returns."""
    return STAGES[type(run)](run)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run_main(lambda: dispatch(parse(flags.FLAGS.config)))


if __name__ == "__main__":
    cli.define_config(default, sys.argv)
    app.run(main, flags_parser=cli.parse_flags)
