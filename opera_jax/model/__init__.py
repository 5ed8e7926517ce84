"""The decoder (Qwen3, Llama 3.x, Qwen2.5): config, model, attention backends, log-probs,
HF checkpoint I/O."""

from opera_jax.model.config import PRESETS, ConfigError, Family, Qwen3Config, RopeScaling
from opera_jax.model.qwen3 import KVCache, Qwen3, positions_from_segment_ids

__all__ = ["PRESETS", "ConfigError", "Family", "KVCache", "Qwen3", "Qwen3Config", "RopeScaling",
           "positions_from_segment_ids"]
