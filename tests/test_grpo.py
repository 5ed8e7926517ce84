"""End-to-end GRPO "pulse" runs on the tiny model: the whole loop (rollout, OPERA reward,
update, validation, checkpoints) for a few steps; an interrupted run resumed from its step-2
checkpoint reproduces the uninterrupted run's step 3; SIGTERM saves and the rerun resumes.

Runs start from the random HF checkpoint of conftest (the real load_pretrained path) on one
device in float32, with toy prompt rows written by the test.
"""

import math
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from opera_jax import make_mesh
from opera_jax.checkpoint import Preempted
from opera_jax.cli import check_overrides, load_config_file
from opera_jax.config.build import abstract_params, checkpoint_params, load_params
from opera_jax.config.parse import ConfigError
from opera_jax.config.runs import parse
from opera_jax.data.jsonl import write_jsonl
from opera_jax.data.toy_domain import prompt_rows
from opera_jax.train import grpo
from opera_jax.train.metrics import read_metrics

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "grpo_tiny.py")
TIMING = ("time/", "throughput/", "tokens_per_s", "mfu/")


def pulse_config(workdir, data, hf_dir, steps=3, **overrides):
    """The tiny GRPO run; `overrides` are dotted keys ("validation.every") -> values."""
    c = load_config_file(CONFIG)
    c.workdir = str(workdir)
    c.model.hf_dir = hf_dir
    c.mesh.num_devices = 1
    c.data.path = data
    c.data.num_threads = 0
    c.rollout.num_prompts = 4
    c.rollout.n = 4
    c.rollout.max_new_tokens = 32
    c.grpo.steps = steps
    c.validation.every = 2
    c.validation.num_prompts = 4
    c.checkpoint.every = 100  # only the last step (or the interruption) is saved
    for key, value in overrides.items():
        section, name = key.rsplit(".", 1)
        c[section][name] = value
    return parse(c)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_tiny):
    tmp = tmp_path_factory.mktemp("grpo_pulse")
    data = write_jsonl(tmp / "prompts.jsonl", prompt_rows(64, seed=0))
    whole = pulse_config(tmp / "whole", data, hf_tiny[0])
    before = dict(grpo.TRACE_COUNT)
    final = grpo.train(whole)
    whole_traces = {k: v - before.get(k, 0) for k, v in grpo.TRACE_COUNT.items()
                    if v != before.get(k, 0)}
    parts = pulse_config(tmp / "parts", data, hf_tiny[0])
    grpo.train(parts, stop_after=2)
    first = read_metrics(str(tmp / "parts"))
    traces = dict(grpo.TRACE_COUNT)
    grpo.train(parts)  # the same command again: resumes from step 2
    return dict(tmp=tmp, data=data, hf_dir=hf_tiny[0], config=whole, final=final,
                whole=read_metrics(str(tmp / "whole")), first=first,
                parts=read_metrics(str(tmp / "parts")), whole_traces=whole_traces,
                traces=(traces, dict(grpo.TRACE_COUNT)))


def test_pulse_logs_finite_metrics_and_changes_the_parameters(runs):
    whole, config = runs["whole"], runs["config"]
    train_rows = [r for r in whole if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in whole:
        assert all(math.isfinite(v) for v in r.values()), r
    for r in train_rows:
        assert r["loss_tokens"] > 0 and r["reward/std"] > 0 and r["entropy"] > 0
        assert 0 <= r["reward/rank"] <= 1 and r["response/len"] > 0
        assert r["time/rollout_s"] > 0 and r["time/reward_s"] > 0 and r["time/update_s"] > 0
        assert r["throughput/rollout_tokens_per_s"] > 0
    # the published warm-up starts at lr 0 (the first update does not move the policy)
    assert train_rows[0]["lr"] == 0.0
    assert train_rows[-1]["lr"] == pytest.approx(config.grpo.optim.lr)
    # step 1 runs at the reference (lr 0, then lr / 2 after the step's last update)
    assert train_rows[0]["kl"] < 1e-8 < train_rows[-1]["kl"]
    # validation before the first step, at step 2 and at the last step
    assert [r["step"] for r in whole if "val_reward/mean" in r] == [0, 2, 3]
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    initial = load_params(config.model, mesh)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         initial, runs["final"].params)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter was updated
    assert int(runs["final"].step) == 3 * config.grpo.num_minibatches
    assert os.path.getsize(runs["tmp"] / "whole" / "reward_curves.png") > 0
    # three steps of different rollouts: one trace of the update and of the reference's
    # log-prob pass (float32: the old log-probs come from the sampler, no policy pass)
    assert runs["whole_traces"] == {"update": 1, "logprobs": 1}


def test_resume_after_step_2_gives_the_uninterrupted_step_3(runs):
    whole, first, parts = runs["whole"], runs["first"], runs["parts"]
    assert [r["step"] for r in first] == [0, 1, 2]
    assert [r["step"] for r in parts] == [0, 1, 2, 3]
    want, got = whole[-1], parts[-1]
    keys = {k for k in want if not k.startswith(TIMING)}
    assert keys == {k for k in got if not k.startswith(TIMING)}
    for key in sorted(keys):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert abs(whole[2]["loss"] - want["loss"]) > 1e-6  # steps differ: the match means something
    assert sorted(os.listdir(runs["tmp"] / "parts" / "checkpoints")) == ["2", "3"]
    before, after = runs["traces"]
    assert after["update"] == before["update"]  # the resumed run reused the compiled update


def test_init_from_an_orbax_checkpoint_reads_its_params(runs):
    config = runs["config"]
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, abstract = abstract_params(config.model, mesh)
    params = checkpoint_params(str(runs["tmp"] / "whole"), abstract)
    jax.tree.map(np.testing.assert_array_equal, params, runs["final"].params)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_params(str(runs["tmp"] / "none"), abstract)


def test_sigterm_saves_a_checkpoint_that_resumes(runs):
    c = pulse_config(runs["tmp"] / "sigterm", runs["data"], runs["hf_dir"], steps=6,
                     **{"validation.every": None})
    metrics = os.path.join(c.workdir, "metrics.jsonl")

    def send_sigterm_after_step_1():
        deadline = time.time() + 300
        while time.time() < deadline:
            if os.path.exists(metrics) and '"step": 1,' in open(metrics).read():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    # A stray late signal must not kill pytest: ignore SIGTERM outside the trainer's handler.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        sender = threading.Thread(target=send_sigterm_after_step_1)
        sender.start()
        with pytest.raises(Preempted, match="rerun to resume"):
            grpo.train(c)
        sender.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    steps = [r["step"] for r in read_metrics(c.workdir)]
    saved = os.listdir(os.path.join(c.workdir, "checkpoints"))
    assert 2 <= steps[-1] < 6 and saved == [str(steps[-1])]
    grpo.train(c)  # the same command resumes after the saved step and finishes
    resumed = [r["step"] for r in read_metrics(c.workdir)]
    assert resumed == steps + list(range(steps[-1] + 1, 7))
    assert "6" in os.listdir(os.path.join(c.workdir, "checkpoints"))


def test_unknown_keys_and_stages_are_named():
    config = load_config_file(CONFIG)
    assert check_overrides(config, ["--config.rollout.n=8", "--config.loss.kl_coef=0"]) is None
    assert check_overrides(config, ["--config.rollout.G=8"]).startswith(
        "unknown config key 'rollout.G'; valid keys under 'rollout': engine, max_new_tokens, "
        "max_prompt_len, n,")
    config.stage = "dpo"
    with pytest.raises(ConfigError, match="config.stage='dpo' is not one of: pipeline, synth"):
        parse(config)


@pytest.mark.slow
def test_sharded_bf16_remat_accumulated_run(runs):
    """8 fake devices (fsdp), bf16 compute (old log-probs recomputed), remat, 2 micro-batches,
    the reference as scorer: the first update is on-policy and starts at the reference."""
    c = pulse_config(runs["tmp"] / "sharded", runs["data"], runs["hf_dir"], steps=2,
                     **{"mesh.num_devices": None, "model.dtype": "bfloat16", "model.remat": True,
                        "grpo.num_minibatches": 1, "grpo.grad_accum": 2,
                        "reward.scorer": "reference", "validation.every": None})
    grpo.train(c)
    rows = read_metrics(c.workdir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert rows[0]["approx_kl_old"] < 1e-6 and rows[0]["clip_frac"] == 0
    assert rows[0]["kl"] < 1e-6 < rows[1]["kl"]
