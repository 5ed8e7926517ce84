"""Model config: presets with hand-known parameter counts, config.json reading, errors."""

import json

import pytest

from opera_jax.model import ConfigError, Qwen3Config


def test_presets_parameter_counts():
    # Qwen3-0.6B: 596M parameters with the tied embedding (GPU_NOTES, HF model card 0.6B)
    assert round(Qwen3Config.preset("qwen3-0.6b").num_params / 1e6) == 596
    # Qwen3-8B: 8.19B parameters (untied), per the HF model card "8.2B"
    assert round(Qwen3Config.preset("qwen3-8b").num_params / 1e9, 1) == 8.2
    tiny = Qwen3Config.preset("tiny")
    assert tiny.head_dim * tiny.num_attention_heads != tiny.hidden_size
    with pytest.raises(KeyError, match="unknown model preset 'qwen9'"):
        Qwen3Config.preset("qwen9")


def test_hf_dict_round_trip(tmp_path):
    cfg = Qwen3Config.preset("qwen3-8b")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert Qwen3Config.from_hf_dir(tmp_path) == cfg


def test_head_dim_defaults_to_hidden_over_heads():
    cfg = Qwen3Config.from_hf_dict(dict(vocab_size=10, hidden_size=64, intermediate_size=8,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2))
    assert cfg.head_dim == 16


@pytest.mark.parametrize("change,msg", [
    (dict(attention_bias=True), "attention_bias=true is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=None), r"missing field\(s\) \['hidden_size'\]"),
])
def test_rejected_configs_name_file_and_field(change, msg):
    raw = Qwen3Config.preset("tiny").to_hf_dict()
    raw.update(change)
    with pytest.raises(ConfigError, match=msg) as e:
        Qwen3Config.from_hf_dict(raw, source="/x/config.json")
    assert "/x/config.json" in str(e.value)


def test_flops_per_token_counts_matmuls():
    cfg = Qwen3Config.preset("tiny")
    d, f, h, n, k, L, v = 64, 192, 32, 4, 2, 2, 1024
    matmul = L * (2 * d * n * h + 2 * d * k * h + 3 * d * f) + v * d
    assert cfg.flops_per_token(seq_len=10) == 2 * matmul + L * 2 * n * h * 10
