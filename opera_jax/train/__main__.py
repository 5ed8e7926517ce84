"""`python -m opera_jax.train --config=configs/<name>.py`: runs the trainer that `config.stage`
names (today: sft, grpo)."""

from opera_jax.train.cli import run


def dispatch(config):
    if config.stage == "sft":
        from opera_jax.train.sft import train

        return train(config)
    if config.stage == "grpo":
        from opera_jax.train.grpo import train

        return train(config)
    raise ValueError(f"config.stage is {config.stage!r}; known stages: sft, grpo")


if __name__ == "__main__":
    run(dispatch)
