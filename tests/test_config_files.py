"""Every config file loads, names only keys its trainer knows, and fits its intended mesh."""

import glob
import os

import pytest

from opera_jax import make_mesh
from opera_jax.reward import RewardConfig
from opera_jax.train import grpo
from opera_jax.train.cli import load_config_file
from opera_jax.train.configs import default, grpo_tiny

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "*.py")))


def _keys(c, prefix=""):
    out = set()
    for k, v in c.items():
        out |= _keys(v, f"{prefix}{k}.") if hasattr(v, "items") else {prefix + k}
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_loads(path):
    c = load_config_file(path)
    assert c.stage in ("sft", "grpo", "synth")
    assert "python -m opera_jax" in open(path).read() or "launch/" in open(path).read()
    if c.stage == "grpo":
        # same keys as the trainer's reference config: nothing misspelt, nothing missing
        assert _keys(c) == _keys(grpo_tiny())
        devices = 8 if c.mesh.num_devices < 0 else c.mesh.num_devices
        grpo.check_config(c, make_mesh(1, -1, 1, devices=__import__("jax").devices()[:devices]))
        grpo.reward_config(c, c.rollout.n)  # a valid RewardConfig


def test_published_settings_in_real_grpo_configs():
    for path in CONFIGS:
        c = load_config_file(path)
        if c.stage != "grpo" or "qwen3" not in os.path.basename(path):
            continue
        assert (c.rollout.n, c.rollout.temperature, c.rollout.top_p) == (16, 1.0, 1.0)
        assert (c.grpo.num_minibatches, c.optim.lr, c.optim.warmup_frac) == (8, 1e-6, 0.4)
        assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.clip_norm) == (0.9, 0.999, 0.01, 1.0)
        assert (c.loss.clip_low, c.loss.clip_high, c.loss.dual_clip, c.loss.kl_coef) == (0.2, 0.2, 3.0, 0.001)
        assert c.loss.aggregation == "token_mean" and c.optim.schedule == "constant"


def test_default_pipeline_config_stages_are_complete():
    c = default()
    assert c.stages.split(",") == ["warmup", "synth", "sft", "grpo", "eval"]
    assert c.grpo.reward.buckets_per_octave == 2
    RewardConfig(**{k: v for k, v in c.grpo.reward.to_dict().items() if k != "max_segments"})
