"""Frozen Qwen3 model config: the fields of Hugging Face's Qwen3 `config.json`, and presets.

`Qwen3Config.from_hf_dir(path)` reads a checkpoint's config.json; `Qwen3Config.preset(name)`
gives the published sizes ("qwen3-0.6b" … "qwen3-32b") and "tiny" (tests, embedded default).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# Fields we read from config.json, with the HF name on the left.
_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "max_position_embeddings",
)


class ConfigError(ValueError):
    """A config.json that we cannot load, with the file and field in the message."""


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture of a Qwen3 decoder (HF `Qwen3Config` field names).

    `head_dim` is its own field: Qwen3 uses 128 for every size, which is not hidden/heads
    (e.g. 0.6B: hidden 1024, 16 heads, head_dim 128).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40_960
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"Qwen3Config.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    # ---- derived ----
    @property
    def num_query_groups(self) -> int:
        """Query heads per KV head (G in the attention einsums)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        attn = d * n * h + 2 * d * k * h + n * h * d + 2 * h
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 × matmul params (embedding lookup excluded) + attention.

        Attention counts QK^T and PV over the causal half of a `seq_len` context.
        """
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        matmul = self.num_hidden_layers * (d * n * h * 2 + 2 * d * k * h + 3 * d * f)
        matmul += self.vocab_size * d  # LM head
        attn = self.num_hidden_layers * 2 * n * h * seq_len  # 2 matmuls × causal half × 2 flops
        return 2.0 * matmul + attn

    # ---- I/O ----
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "Qwen3Config":
        """Builds a config from a parsed HF config dict; rejects what this model cannot run."""
        archs = raw.get("architectures") or []
        if archs and "Qwen3ForCausalLM" not in archs:
            raise ConfigError(
                f"{source}: architectures={archs} — opera_jax loads Qwen3ForCausalLM only")
        if raw.get("model_type", "qwen3") != "qwen3":
            raise ConfigError(f"{source}: model_type={raw.get('model_type')!r}, expected 'qwen3'")
        if raw.get("attention_bias"):
            raise ConfigError(f"{source}: attention_bias=true is not supported (Qwen3 has none)")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r}, only 'silu' is supported")
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        scaling = raw.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
            raise ConfigError(f"{source}: rope_scaling={scaling} is not supported")
        kwargs: dict[str, Any] = {}
        for name in _HF_FIELDS:
            if name in raw and raw[name] is not None:
                kwargs[name] = raw[name]
        # transformers 5 may nest rope_theta under rope_parameters.
        rope = raw.get("rope_parameters") or {}
        if "rope_theta" not in kwargs and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        missing = [n for n in _HF_FIELDS[:6] if n not in kwargs]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing}")
        if "head_dim" not in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        kwargs["rope_theta"] = float(kwargs.get("rope_theta", 1_000_000.0))
        kwargs["rms_norm_eps"] = float(kwargs.get("rms_norm_eps", 1e-6))
        eos = raw.get("eos_token_id")
        kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
        kwargs["bos_token_id"] = raw.get("bos_token_id")
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from e

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Qwen3Config":
        """Reads `<path>/config.json`."""
        file = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json in {os.fspath(path)!r}")
        try:
            with open(file) as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: line {e.lineno}: invalid JSON ({e.msg})") from e
        return cls.from_hf_dict(raw, source=file)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that `transformers` reads back as an equal `Qwen3Config`."""
        out: dict[str, Any] = {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "use_sliding_window": False,
            "sliding_window": None,
            "rope_scaling": None,
        }
        for name in _HF_FIELDS:
            out[name] = getattr(self, name)
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            eos = self.eos_token_id
            out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return out

    @classmethod
    def preset(cls, name: str) -> "Qwen3Config":
        """A named preset: one of `PRESETS`."""
        try:
            return PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}") from None

    def replace(self, **changes) -> "Qwen3Config":
        return dataclasses.replace(self, **changes)


def _qwen3(hidden, inter, layers, heads, tie) -> Qwen3Config:
    return Qwen3Config(vocab_size=151_936, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=tie, bos_token_id=151_643,
                       eos_token_id=151_645)


# Published Qwen3 dense sizes (Hugging Face config.json of Qwen/Qwen3-*).
PRESETS: dict[str, Qwen3Config] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, False),
    # Tests and the embedded default. vocab matches the embedded tokenizer (opera_jax/assets);
    # head_dim 32 ≠ hidden/heads = 16, as in the real models.
    "tiny": Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=192,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, rope_theta=10_000.0, tie_word_embeddings=True,
                        max_position_embeddings=4096),
    # The embedded default run's model (python -m opera_jax.train): big enough to learn the
    # toy domain's copy-from-the-thinking answers in a few CPU minutes.
    "toy": Qwen3Config(vocab_size=1024, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, rope_theta=10_000.0, tie_word_embeddings=True,
                       max_position_embeddings=4096),
}
