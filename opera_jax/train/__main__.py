"""`python -m opera_jax.train [--config=configs/<name>.py] [--config.<key>=<value> ...]`.

Without `--config`, the embedded default (opera_jax/train/default_config.py): every OPERA stage
on the toy domain, on the CPU, in minutes. Otherwise runs what `config.stage` names:
`pipeline` (warm-up → synthesis → SFT → GRPO → evaluation), `sft` or `grpo`.
"""

import os

from opera_jax.train.cli import run

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_config.py")


def dispatch(config):
    if config.stage == "pipeline":
        from opera_jax.train.pipeline import run as run_pipeline

        return run_pipeline(config)
    if config.stage == "sft":
        from opera_jax.train.sft import train

        return train(config)
    if config.stage == "grpo":
        from opera_jax.train.grpo import train

        return train(config)
    raise ValueError(f"config.stage is {config.stage!r}; known stages: pipeline, sft, grpo")


if __name__ == "__main__":
    run(dispatch, default_config=DEFAULT_CONFIG)
