"""The embedded default config of `python -m opera_jax.train` (opera_jax.train.configs.default)."""

from opera_jax.train.configs import default as get_config  # noqa: F401
