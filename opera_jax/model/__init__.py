"""The Qwen3 model: config, decoder, attention backends, log-probs, HF checkpoint I/O."""

from opera_jax.model.config import PRESETS, ConfigError, Qwen3Config
from opera_jax.model.qwen3 import KVCache, Qwen3, positions_from_segment_ids

__all__ = ["PRESETS", "ConfigError", "KVCache", "Qwen3", "Qwen3Config",
           "positions_from_segment_ids"]
