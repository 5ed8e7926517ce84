"""Shared fixtures: random-weight Hugging Face checkpoints written with save_pretrained.

That is the real loading path (config.json + safetensors through `load_pretrained`), with
PyTorch's `Qwen3ForCausalLM` (or `LlamaForCausalLM`, `Qwen2ForCausalLM`) as the independent
reference.
"""

from __future__ import annotations

import os

import pytest

# Eight fake CPU devices for the sharded tests; must be set before jax is imported.
# Single-device code runs on device 0 as usual.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
# Reference numbers in float32 on the CPU.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

TINY_HF = dict(
    vocab_size=1024, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # head_dim != hidden/heads
    rope_theta=10_000.0, rms_norm_eps=1e-6, max_position_embeddings=4096,
)


# The tiny llama3 rope scaling: from position 32 on, so a ~100-token input goes past it.
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)


def make_hf_model(path, family: str = "qwen3", *, tie: bool = True, seed: int = 0,
                  max_shard_size=None, **overrides):
    """Saves a random-weight transformers model (float32) of `family` ("qwen3", "llama",
    "qwen2") to `path`, with the tiny shapes and the embedded tokenizer; returns it."""
    import torch
    import transformers

    config_cls, model_cls = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    cfg = config_cls(**{**TINY_HF, **overrides}, tie_word_embeddings=tie,
                     attn_implementation="eager")
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; perturb them so the
        for name, p in model.named_parameters():  # test sees them
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    from opera_jax.tokenizer import load_tokenizer

    load_tokenizer(None).save_pretrained(path)
    return model


def make_hf_qwen3(path, *, tie: bool = True, seed: int = 0, max_shard_size=None, **overrides):
    """Saves a random-weight transformers Qwen3ForCausalLM (float32) to `path`; returns it."""
    return make_hf_model(path, "qwen3", tie=tie, seed=seed, max_shard_size=max_shard_size,
                         **overrides)


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """(path, torch model) of a tied-embedding tiny Qwen3 checkpoint."""
    path = tmp_path_factory.mktemp("hf_tiny")
    return str(path), make_hf_qwen3(path, tie=True)


@pytest.fixture(scope="session")
def hf_tiny_untied(tmp_path_factory):
    """(path, torch model) of an untied tiny Qwen3 checkpoint."""
    path = tmp_path_factory.mktemp("hf_tiny_untied")
    return str(path), make_hf_qwen3(path, tie=False, seed=1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: heavy variants, deselect with -m 'not slow'")
