"""Every config file parses into its stage's typed run and fits its intended mesh; the parser
names the key of every bad value; the published settings are where they should be."""

import glob
import os

import ml_collections
import pytest

from opera_jax.cli import load_config_file
from opera_jax.config import build
from opera_jax.config.parse import ConfigError, from_config, to_config
from opera_jax.config.runs import GRPORun, PipelineRun, parse
from opera_jax.config.sections import Dtype, Model, Rollout, Stage
from opera_jax.config.setups import default, grpo_tiny
from opera_jax.train import grpo

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                        "*.py")))
PUBLISHED = [p for p in CONFIGS if os.path.basename(p).startswith("grpo_qwen3")]


def test_there_are_config_files_and_published_ones():
    assert len(CONFIGS) >= 6 and len(PUBLISHED) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_file_parses_and_says_how_to_run_it(path):
    run = parse(load_config_file(path))
    assert run.STAGE in (Stage.SFT, Stage.GRPO, Stage.SYNTH)
    text = open(path).read()
    assert f"configs/{os.path.basename(path)}" in text
    assert "python -m opera_jax.train" in text or "launch/" in text
    if isinstance(run, GRPORun):  # on the 8 fake devices, or the config's own count
        grpo.check_config(run, build.make_mesh(run.mesh))


@pytest.mark.parametrize("path", PUBLISHED, ids=os.path.basename)
def test_published_settings_in_real_grpo_configs(path):
    run = parse(load_config_file(path))
    assert (run.rollout.n, run.rollout.temperature, run.rollout.top_p) == (16, 1.0, 1.0)
    o = run.grpo.optim
    assert (run.grpo.num_minibatches, o.lr, o.warmup_frac, o.schedule.value) == (
        8, 1e-6, 0.4, "constant")
    assert (o.b1, o.b2, o.weight_decay, o.clip_norm) == (0.9, 0.999, 0.01, 1.0)
    loss = run.loss
    assert (loss.clip_low, loss.clip_high, loss.dual_clip, loss.kl_coef) == (0.2, 0.2, 3.0, 0.001)
    assert loss.aggregation.value == "token_mean"
    assert (run.reward.rank_weight, run.reward.reflection_weight) == (0.3, 0.7)


def test_default_is_the_pipeline_with_every_stage():
    run = parse(default())
    assert isinstance(run, PipelineRun)
    assert run.stages.split(",") == ["warmup", "synth", "sft", "grpo", "eval"]
    assert run.reward.buckets_per_octave == 2 and run.model.preset == "toy"


def test_round_trip_and_none_placeholders():
    c = to_config(Rollout())
    assert c.top_k is None and c.prompts_per_call is None
    c.top_k = 20  # a placeholder takes a value of its type
    assert from_config(Rollout, c) == Rollout(top_k=20)
    assert from_config(Rollout, to_config(Rollout(top_k=5))).top_k == 5
    assert parse(grpo_tiny()) == GRPORun(workdir="/tmp/opera_grpo_tiny")


def test_bad_values_name_their_key():
    c = grpo_tiny()
    c.model.dtype = "float64"
    with pytest.raises(ConfigError, match=r"config.model.dtype='float64' is not one of: "
                       r"float32, bfloat16, float16"):
        parse(c)
    with pytest.raises(ConfigError, match=r"unknown config key 'config.rollout.G'; valid keys "
                       r"under 'config.rollout': engine, max_new_tokens, max_prompt_len, n, "):
        from_config(GRPORun, {"rollout": {"G": 8}})
    with pytest.raises(ConfigError, match=r"config.sft.steps must be an integer, got '3'"):
        parse(ml_collections.ConfigDict({"stage": "sft", "sft": {"steps": "3"}}))
    with pytest.raises(ConfigError, match=r"config.model.dtype must be set"):
        from_config(type(parse(grpo_tiny())), {"model": {"dtype": None}})
    with pytest.raises(ConfigError, match=r"this config is for stage 'grpo', not 'sft'"):
        parse(grpo_tiny(), expect=Stage.SFT)
    assert from_config(Model, {"dtype": "bfloat16"}).dtype is Dtype.BFLOAT16
