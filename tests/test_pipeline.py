"""The main job end to end on minimal settings: every stage runs, writes its outputs, hands
them to the next, and records that it finished; a rerun skips finished stages; bad stage lists
and unknown keys fail clearly."""

import json
import os
import subprocess
import sys

import pytest

from opera_jax import pipeline
from opera_jax.config.runs import parse
from opera_jax.config.setups import default


def tiny_pipeline(workdir, cache, **overrides):
    """The default recipe, shrunk to seconds (tiny model, a few steps and tokens)."""
    c = default()
    c.workdir, c.warmup.cache = str(workdir), str(cache)
    c.model.preset = "tiny"
    c.mesh.num_devices = 1
    c.warmup.examples, c.warmup.steps, c.warmup.seq_len = 64, 3, 256
    c.synth_prompts = "toy:prompts:4:1"
    s = c.synth
    s.max_thinking_tokens, s.max_phase_tokens, s.max_candidate_tokens = 48, 16, 16
    s.max_answer_tokens, s.progress = 16, False
    c.sft.steps, c.sft.seq_len = 2, 256
    c.data.num_threads = 0
    c.rollout.num_prompts, c.rollout.n, c.rollout.max_new_tokens = 2, 2, 16
    c.grpo.steps = 2
    c.validation.every = None
    c.eval.num_prompts, c.eval.n, c.eval.max_new_tokens = 2, 2, 16
    for key, value in overrides.items():
        section, name = key.rsplit(".", 1)
        c[section][name] = value
    return c


def test_pipeline_runs_every_stage_and_resumes(tmp_path):
    run = parse(tiny_pipeline(tmp_path / "run", tmp_path / "cache"))
    summary = pipeline.run(run)
    paths = pipeline.paths_of(run)
    assert set(summary["seconds"]) == set(pipeline.STAGES)
    assert os.path.exists(os.path.join(paths.warmup_hf, "model.safetensors"))
    records = [json.loads(x) for x in open(os.path.join(paths.synth, "records.jsonl"))]
    assert len(records) == 4 and all({"thinking", "output", "chosen_ppl"} <= set(r)
                                     for r in records)
    assert os.path.exists(os.path.join(paths.sft_hf, "config.json"))
    metrics = [json.loads(x) for x in open(os.path.join(paths.grpo, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if "reward/mean" in m] == [1, 2]
    assert os.path.exists(os.path.join(paths.grpo, "reward_curves.png"))
    report = open(os.path.join(paths.eval, "report.md")).read()
    assert "| metric | sft | grpo |" in report and "| answer_acc |" in report
    written = json.load(open(os.path.join(paths.workdir, "summary.json")))
    assert written["seconds"] == summary["seconds"]
    # the ground truth sits next to the reward in the summary
    assert set(written["accuracy"]) == {"sft", "grpo"} and "rl_made_worse" in written
    for folder in (paths.warmup, paths.synth, paths.sft, paths.grpo):
        assert os.path.exists(os.path.join(folder, pipeline.DONE)), folder

    # the same command again: every training stage is found done and does nothing
    again = pipeline.run(run)
    assert "synth" not in again  # no synthesis summary: it did not run
    done = [os.path.getmtime(os.path.join(f, pipeline.DONE))
            for f in (paths.synth, paths.sft, paths.grpo)]
    pipeline.run(run)
    assert done == [os.path.getmtime(os.path.join(f, pipeline.DONE))
                    for f in (paths.synth, paths.sft, paths.grpo)]

    # more GRPO steps: the finished stages stay done, GRPO resumes from step 2 to step 3
    more = parse(tiny_pipeline(tmp_path / "run", tmp_path / "cache", **{"grpo.steps": 3}))
    pipeline.run(more)
    metrics = [json.loads(x) for x in open(os.path.join(paths.grpo, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if "reward/mean" in m] == [1, 2, 3]


def test_stage_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['rl'\].*stages: warmup, synth"):
        pipeline.parse_stages("warmup,rl")
    c = tiny_pipeline(tmp_path / "run", tmp_path / "cache")
    c.stages = "sft"
    with pytest.raises(FileNotFoundError, match=r"stage 'sft' needs .*records.jsonl"):
        pipeline.run(parse(c))


def test_main_command_rejects_unknown_keys_of_the_embedded_default():
    out = subprocess.run([sys.executable, "-m", "opera_jax.train", "--config.grpo.stepz=3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().endswith(
        "unknown config key 'grpo.stepz'; valid keys under 'grpo': chunk_size, dynamic_sampling, "
        "grad_accum, log_every, max_sampling_rounds, num_minibatches, old_logprobs, optim, "
        "peak_flops, random_rewards, steps")
