"""The main job end to end on minimal settings: every stage runs, writes its outputs, hands
them to the next; a rerun skips finished stages; bad stage lists fail clearly."""

import json
import os
import time

import pytest

from opera_jax.train import pipeline
from opera_jax.train.configs import default


def tiny_pipeline(workdir, cache):
    c = default()
    c.workdir, c.warmup_cache = str(workdir), str(cache)
    c.warmup_examples, c.synth_prompts = 64, 4
    for stage in (c.warmup, c.sft):
        stage.model.preset = "tiny"
        stage.data.seq_len = 256
        stage.data.num_threads = 0
        stage.mesh.num_devices = 1
    c.warmup.sft.steps = 3
    c.sft.sft.steps = 2
    c.synth.teacher.preset = "tiny"
    c.synth.synth.max_thinking_tokens = 48
    c.synth.synth.max_phase_tokens = 16
    c.synth.synth.max_candidate_tokens = 16
    c.synth.synth.max_answer_tokens = 16
    c.synth.progress = False
    c.grpo.model.preset = "tiny"
    c.grpo.mesh.num_devices = 1
    c.grpo.rollout.num_prompts, c.grpo.rollout.n, c.grpo.rollout.max_new_tokens = 2, 2, 16
    c.grpo.grpo.steps = 2
    c.grpo.data.num_threads = 0
    c.grpo.validation.every = 0
    c.eval.num_prompts, c.eval.n, c.eval.max_new_tokens = 2, 2, 16
    return c


def test_pipeline_runs_every_stage_and_resumes(tmp_path):
    c = tiny_pipeline(tmp_path / "run", tmp_path / "cache")
    summary = pipeline.run(c)
    paths = pipeline.paths_of(c)
    assert set(summary["seconds"]) == set(pipeline.STAGES)
    assert os.path.exists(os.path.join(paths.warmup_hf, "model.safetensors"))
    records = [json.loads(x) for x in open(paths.synth_records)]
    assert len(records) == 4 and all({"thinking", "output", "chosen_ppl"} <= set(r) for r in records)
    assert os.path.exists(os.path.join(paths.sft_hf, "config.json"))
    metrics = [json.loads(x) for x in open(os.path.join(paths.grpo, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if "reward/mean" in m] == [1, 2]
    assert os.path.exists(os.path.join(paths.grpo, "reward_curves.png"))
    report = open(os.path.join(paths.eval, "report.md")).read()
    assert "| metric | sft | grpo |" in report
    assert json.load(open(os.path.join(paths.workdir, "summary.json")))["seconds"] == summary["seconds"]

    # the same command again: warm-up, synthesis and SFT are found done, GRPO is at its last step
    t0 = time.perf_counter()
    again = pipeline.run(c)
    assert again["synth"]["already_done"] == 4 and again["synth"]["written"] == 0
    assert again["seconds"]["warmup"] < 1.0 and again["seconds"]["sft"] < 1.0
    assert time.perf_counter() - t0 < summary["seconds"]["grpo"] + summary["seconds"]["eval"] + 30


def test_stage_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['rl'\].*stages: warmup, synth"):
        pipeline.parse_stages("warmup,rl")
    c = tiny_pipeline(tmp_path / "run", tmp_path / "cache")
    c.stages = "sft"
    with pytest.raises(FileNotFoundError, match=r"stage 'sft' needs .*records.jsonl"):
        pipeline.run(c)


def test_main_command_rejects_unknown_keys_of_the_embedded_default():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "opera_jax.train", "--config.grpo.grpo.stepz=3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().endswith(
        "unknown config key 'grpo.grpo.stepz'; valid keys under 'grpo.grpo': chunk_size, "
        "grad_accum, log_every, num_minibatches, peak_flops, steps")
