"""Frozen decoder config: the fields of a Hugging Face `config.json`, and presets.

Three families share the decoder (`Family`, from config.json's `architectures`): Qwen3,
Llama 3.x and Qwen2.5. `Qwen3Config.from_hf_dir(path)` reads a checkpoint's config.json;
`Qwen3Config.preset(name)` gives published sizes ("qwen3-0.6b" … "qwen3-32b", "llama3.1-8b",
"qwen2.5-7b", …) and the test presets "tiny", "tiny-llama", "tiny-qwen2".
"""

from __future__ import annotations

import dataclasses
import enum
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


class Family(str, enum.Enum):
    """Decoder family; the value is config.json's `model_type`."""

    QWEN3 = "qwen3"  # q/k RMSNorm, no biases
    LLAMA = "llama"  # no q/k norm, no biases, llama3 rope scaling
    QWEN2 = "qwen2"  # q/k/v biases, no q/k norm (Qwen2 and Qwen2.5)

    @property
    def architecture(self) -> str:
        """The `architectures` entry of config.json (the transformers class)."""
        return _ARCHITECTURES[self]


_ARCHITECTURES = {Family.QWEN3: "Qwen3ForCausalLM", Family.LLAMA: "LlamaForCausalLM",
                  Family.QWEN2: "Qwen2ForCausalLM"}
# rope_theta when config.json has none: transformers' default, except Qwen3's earlier 1e6 kept.
_DEFAULT_THETA = {Family.QWEN3: 1_000_000.0, Family.LLAMA: 10_000.0, Family.QWEN2: 10_000.0}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 rope scaling (`rope_type: "llama3"`), applied to the inverse frequencies.

    Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept,
    those longer than original_max_position_embeddings / low_freq_factor are stretched by
    `factor`, and the band between is interpolated (qwen3.rope_frequencies).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self):
        if not self.factor > 0 or not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(f"llama3 rope scaling needs factor > 0 and high_freq_factor > "
                              f"low_freq_factor > 0, got {self}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError(f"original_max_position_embeddings must be positive, got "
                              f"{self.original_max_position_embeddings}")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture of a decoder of one `Family` (HF config field names).

    The name is historical: the class describes all three families, told apart by `family`
    (what the layers hold: `qk_norm`, `attention_bias`) and `rope_scaling`.

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
    family: Family = Family.QWEN3
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "family", Family(self.family))  # also accept "llama"
        except ValueError:
            raise ConfigError(f"Qwen3Config.family must be one of "
                              f"{[f.value for f in Family]}, got {self.family!r}") from None
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
    def qk_norm(self) -> bool:
        """Per-head RMSNorm on q and k before the rotary embedding (Qwen3 only)."""
        return self.family is Family.QWEN3

    @property
    def attention_bias(self) -> bool:
        """Biases on the q, k and v projections, none on o (Qwen2 only).

        Derived, not read: transformers' Qwen2 always has them and its config.json has no
        such field; a Qwen3 or Llama config.json asking for biases is rejected on load.
        """
        return self.family is Family.QWEN2

    @property
    def num_params(self) -> int:
        """Parameter count, counting a tied embedding once."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        attn = d * n * h + 2 * d * k * h + n * h * d
        attn += 2 * h if self.qk_norm else 0
        attn += (n + 2 * k) * h if self.attention_bias else 0
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: 2 × matmul params (embedding lookup excluded) + attention.

        Attention counts QK^T and PV over the causal half of a `seq_len` context; q/k/v
        biases one add per element.
        """
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_attention_heads, self.num_key_value_heads
        matmul = self.num_hidden_layers * (d * n * h * 2 + 2 * d * k * h + 3 * d * f)
        matmul += self.vocab_size * d  # LM head
        attn = self.num_hidden_layers * 2 * n * h * seq_len  # 2 matmuls × causal half × 2 flops
        bias = self.num_hidden_layers * (n + 2 * k) * h if self.attention_bias else 0
        return 2.0 * matmul + attn + bias

    # ---- I/O ----
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "Qwen3Config":
        """Builds a config from a parsed HF config dict; rejects what this model cannot run."""
        family = _family(raw, source)
        if raw.get("attention_bias") and family is not Family.QWEN2:
            # Qwen3 and Llama put the bias on o_proj too; no published checkpoint has one.
            raise ConfigError(f"{source}: attention_bias=true is not supported for "
                              f"{family.architecture}")
        if raw.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act={raw['hidden_act']!r}, only 'silu' is supported")
        if raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        windowed = sorted(set(raw.get("layer_types") or ()) - {"full_attention"})
        if windowed:
            raise ConfigError(f"{source}: layer_types {windowed} are not supported "
                              "(full_attention only)")
        kwargs: dict[str, Any] = {}
        for name in _HF_FIELDS:
            if name in raw and raw[name] is not None:
                kwargs[name] = raw[name]
        missing = [n for n in _HF_FIELDS[:6] if n not in kwargs]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing}")
        if "head_dim" not in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        theta, kwargs["rope_scaling"] = _rope(raw, source)
        kwargs["rope_theta"] = float(kwargs.get("rope_theta", theta or _DEFAULT_THETA[family]))
        kwargs["rms_norm_eps"] = float(kwargs.get("rms_norm_eps", 1e-6))
        eos = raw.get("eos_token_id")
        kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else eos
        kwargs["bos_token_id"] = raw.get("bos_token_id")
        kwargs["family"] = family
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
        """The config.json that `transformers` reads back as this family's equal config."""
        out: dict[str, Any] = {
            "architectures": [self.family.architecture],
            "model_type": self.family.value,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            # The pre-transformers-5 layout, as published checkpoints have it; 5.x reads it too.
            "rope_scaling": None if self.rope_scaling is None else {
                "rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)},
        }
        if self.family is Family.LLAMA:
            out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        else:  # Qwen2 has its q/k/v biases without a field for them
            out.update(use_sliding_window=False, sliding_window=None)
            if self.family is Family.QWEN3:
                out["attention_bias"] = False
        for name in _HF_FIELDS:
            out[name] = getattr(self, name)
        # Written even when None: LlamaConfig would otherwise fill in its own ids (1 and 2).
        out["bos_token_id"] = self.bos_token_id
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


def _family(raw: dict[str, Any], source: str) -> Family:
    """The family named by `architectures` (or, without it, `model_type`; default Qwen3)."""
    supported = [f.architecture for f in Family]
    archs = raw.get("architectures") or []
    known = [f for f in Family if f.architecture in archs]
    if archs and not known:
        raise ConfigError(f"{source}: architectures={archs} is not supported; opera_jax loads "
                          f"{', '.join(supported)}")
    model_type = raw.get("model_type")
    if known:
        family = known[0]
        if model_type is not None and model_type != family.value:
            raise ConfigError(f"{source}: model_type={model_type!r} does not match "
                              f"architectures={archs} (expected {family.value!r})")
        return family
    if model_type is None:
        return Family.QWEN3
    try:
        return Family(model_type)
    except ValueError:
        raise ConfigError(f"{source}: model_type={model_type!r} is not supported; opera_jax "
                          f"loads {', '.join(supported)}") from None


def _rope(raw: dict[str, Any], source: str) -> tuple[float | None, RopeScaling | None]:
    """(rope_theta if given with the rope parameters, llama3 scaling or None) from config.json.

    transformers < 5 writes `rope_scaling` (and `rope_theta` beside it); transformers 5 writes
    `rope_parameters` with rope_theta inside. Either is read; `rope_parameters` wins a clash.
    """
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{source}: per-layer rope parameters are not supported")
    theta = params.get("rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"{source}: rope_scaling={params} is not supported (rope_type "
                          "'llama3' or 'default' only)")
    # As transformers: a top-level original_max_position_embeddings wins, then the nested
    # one, then max_position_embeddings.
    original = (raw.get("original_max_position_embeddings")
                or params.get("original_max_position_embeddings")
                or raw.get("max_position_embeddings"))
    missing = [n for n in ("factor", "low_freq_factor", "high_freq_factor") if n not in params]
    if missing or original is None:
        raise ConfigError(f"{source}: llama3 rope scaling {params} lacks "
                          f"{missing or ['original_max_position_embeddings']}")
    try:
        return theta, RopeScaling(factor=float(params["factor"]),
                                  low_freq_factor=float(params["low_freq_factor"]),
                                  high_freq_factor=float(params["high_freq_factor"]),
                                  original_max_position_embeddings=int(original))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def _qwen3(hidden, inter, layers, heads, tie) -> Qwen3Config:
    return Qwen3Config(vocab_size=151_936, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=tie, bos_token_id=151_643,
                       eos_token_id=151_645)


def _llama(hidden, inter, layers, heads, head_dim, tie, rope_factor) -> Qwen3Config:
    return Qwen3Config(vocab_size=128_256, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=8,
                       head_dim=head_dim, rope_theta=500_000.0, rms_norm_eps=1e-5,
                       tie_word_embeddings=tie, max_position_embeddings=131_072,
                       bos_token_id=128_000, eos_token_id=(128_001, 128_008, 128_009),
                       family=Family.LLAMA,
                       rope_scaling=RopeScaling(factor=rope_factor, low_freq_factor=1.0,
                                                high_freq_factor=4.0,
                                                original_max_position_embeddings=8192))


def _qwen2(vocab, hidden, inter, layers, heads, kv_heads, tie) -> Qwen3Config:
    return Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       tie_word_embeddings=tie, max_position_embeddings=32_768,
                       bos_token_id=151_643, eos_token_id=151_645, family=Family.QWEN2)


_TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10_000.0,
             tie_word_embeddings=True, max_position_embeddings=4096)

# Published sizes: Hugging Face config.json of Qwen/Qwen3-*, meta-llama/Llama-3.*-Instruct and
# Qwen/Qwen2.5-*-Instruct (base models: same shapes, other eos ids).
PRESETS: dict[str, Qwen3Config] = {
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, False),
    "llama3.2-1b": _llama(2048, 8192, 16, 32, 64, True, 32.0),
    "llama3.2-3b": _llama(3072, 8192, 28, 24, 128, True, 32.0),
    "llama3.1-8b": _llama(4096, 14336, 32, 32, 128, False, 8.0),
    "qwen2.5-0.5b": _qwen2(151_936, 896, 4864, 24, 14, 2, True),
    "qwen2.5-7b": _qwen2(152_064, 3584, 18944, 28, 28, 4, False),
    # Tests and the embedded default. vocab matches the embedded tokenizer (opera_jax/assets);
    # head_dim 32 ≠ hidden/heads = 16, as in the real models.
    "tiny": Qwen3Config(**_TINY),
    # The same shapes per family. tiny-llama's rope scaling has an original context of 32
    # (8192 in the real models): its three bands (kept, interpolated, stretched) all hold
    # frequencies, and tests of a few dozen tokens go past it.
    "tiny-llama": Qwen3Config(**_TINY, rms_norm_eps=1e-5, family=Family.LLAMA,
                              rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                                                       high_freq_factor=4.0,
                                                       original_max_position_embeddings=32)),
    "tiny-qwen2": Qwen3Config(**_TINY, family=Family.QWEN2),
    # The embedded default run's model (python -m opera_jax.train): big enough to learn the
    # toy domain's copy-from-the-thinking answers in a few CPU minutes.
    "toy": Qwen3Config(vocab_size=1024, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, rope_theta=10_000.0, tie_word_embeddings=True,
                       max_position_embeddings=4096),
}
