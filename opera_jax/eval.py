"""`python -m opera_jax.eval --source=LABEL=DIR [--source=LABEL=DIR ...] --out=DIR`

Evaluates each source (an HF directory or a trainer's run directory) on the same held-out
prompts, side by side (opera_jax/evaluation): generation, the intrinsic reward metrics, what
the reward cannot see and the ground truth where the prompts have one. The settings are the
`eval` section (`--config.<key>=…`, e.g. `--config.prompts=bench.jsonl --config.n=4
--config.scorer=sft`). `--out` is written whole; a non-empty one is refused unless
`--overwrite`. The report is printed at the end.
"""

import os
import sys

from absl import app, flags

from opera_jax import cli
from opera_jax.config.parse import ConfigError, from_config, to_config
from opera_jax.config.sections import Eval
from opera_jax.evaluation import evaluate

flags.DEFINE_multi_string("source", None, "LABEL=DIR (an HF dir or a run dir); repeat to "
                          "compare", required=True)
flags.DEFINE_string("out", None, "the output directory", required=True)
flags.DEFINE_bool("overwrite", False, "replace a non-empty --out as a whole")
FLAGS = flags.FLAGS


def sources(specs: list[str]) -> dict[str, str]:
    """LABEL=DIR flags -> {label: dir}; labels must be distinct."""
    out = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise ConfigError(f"--source={spec!r}: expected LABEL=DIR")
        if label in out:
            raise ConfigError(f"--source label {label!r} is given twice")
        out[label] = path
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def run():
        config = from_config(Eval, FLAGS.config, "config")
        evaluate.compare(sources(FLAGS.source), config, FLAGS.out, overwrite=FLAGS.overwrite)
        with open(os.path.join(FLAGS.out, "report.md")) as f:
            print(f.read())

    cli.run_main(run)


if __name__ == "__main__":
    cli.define_config(lambda: to_config(Eval()), sys.argv)
    app.run(main, flags_parser=cli.parse_flags)
