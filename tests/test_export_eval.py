"""Checkpoint → any mesh → HF export, and the evaluation files.

A 2-step SFT run on 8 fake devices (fsdp=8) writes the Orbax checkpoint; it must restore on one
device and on 8 with the same logits, export to a directory that transformers loads with the
same logits, and feed `opera_jax.eval`.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from opera_jax import make_mesh
from opera_jax.config.build import load_run
from opera_jax.config.parse import from_config, to_config
from opera_jax.config.runs import parse
from opera_jax.config.sections import Eval
from opera_jax.config.setups import sft_tiny
from opera_jax.data.jsonl import write_jsonl
from opera_jax.data.toy_domain import examples
from opera_jax.evaluation import compare, load_prompts
from opera_jax.model.hf_io import export_hf
from opera_jax.train.sft import train

IDS = np.random.RandomState(0).randint(0, 1024, (2, 12)).astype(np.int32)


def _sft_run(tmp, hf_dir, *, num_devices):
    c = sft_tiny()
    c.workdir = str(tmp / f"run{num_devices}")
    c.mesh.num_devices = num_devices
    c.model.hf_dir = hf_dir
    c.model.dtype = "float32"
    c.data.path = write_jsonl(tmp / "toy.jsonl", examples(32, seed=0))
    c.data.num_threads = 0
    c.sft.steps = 2
    return train(parse(c)), c.workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, hf_tiny):
    assert jax.device_count() == 8  # written from an 8-way fsdp mesh
    state, workdir = _sft_run(tmp_path_factory.mktemp("export"), hf_tiny[0], num_devices=None)
    assert state.params["embed_tokens"].sharding.spec[1] == "fsdp"
    return workdir


def _logits(model):
    return np.asarray(model(jnp.asarray(IDS)))


def test_restore_on_one_device_and_on_eight(run_dir, hf_tiny):
    one, tok, model, step = load_run(run_dir, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    eight, _, _, _ = load_run(run_dir, mesh=make_mesh(2, 2, 2))
    assert step == 2 and model.hf_dir == hf_tiny[0]
    assert len(one.embed_tokens[...].sharding.device_set) == 1
    assert len(eight.embed_tokens[...].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(one.embed_tokens[...]), np.asarray(eight.embed_tokens[...]))
    np.testing.assert_allclose(_logits(one), _logits(eight), atol=1e-5)
    # two SFT steps moved the weights away from the starting checkpoint
    with torch.no_grad():
        start = hf_tiny[1](torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    assert np.abs(_logits(one) - start).max() > 1e-3


def test_one_device_checkpoint_restores_on_eight(tmp_path, hf_tiny, run_dir):
    state, workdir = _sft_run(tmp_path, hf_tiny[0], num_devices=1)
    assert len(state.params["embed_tokens"].sharding.device_set) == 1
    eight, _, _, _ = load_run(workdir, mesh=make_mesh(2, 2, 2))
    assert len(eight.embed_tokens[...].sharding.device_set) == 8
    one, _, _, _ = load_run(workdir, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    np.testing.assert_allclose(_logits(eight), _logits(one), atol=1e-5)
    # the same data and seed on 8 devices and on 1 give the same trained model
    same, _, _, _ = load_run(run_dir)
    np.testing.assert_allclose(_logits(same), _logits(one), atol=1e-4)


def test_export_round_trip_through_transformers(run_dir, tmp_path):
    model, tokenizer, _, _ = load_run(run_dir)
    out = export_hf(model, str(tmp_path / "hf"), tokenizer=tokenizer)
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    model, _, _, _ = load_run(run_dir)
    with torch.no_grad():
        got = ref(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    assert np.abs(got - _logits(model)).max() <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_run(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_run(str(tmp_path / "empty"))


def test_eval_writes_documented_files(run_dir, hf_tiny, tmp_path):
    c = Eval(num_prompts=3, n=2, max_new_tokens=16)
    out = str(tmp_path / "eval")
    results = compare({"start": hf_tiny[0], "sft": run_dir}, c, out)
    assert sorted(os.listdir(out)) == ["metrics.json", "plots.png", "report.md",
                                         "responses_sft.jsonl", "responses_start.jsonl"]
    rows = [json.loads(line) for line in open(os.path.join(out, "responses_sft.jsonl"))]
    assert len(rows) == 3 * 2
    for row in rows:
        for key in ("id", "sample", "prompt", "response", "thinking", "answer", "finish_reason",
                    "think_len", "answer_len", "guiding_words"):
            assert key in row
        assert row["think_len"] + row["answer_len"] <= 16
        if row["task_type"] == "writing":
            assert row["reference_ppl"] > 1.0 and 0.0 <= row["reward"] <= 1.0
    assert set(results) == {"start", "sft"}
    assert json.load(open(os.path.join(out, "metrics.json")))["sft"]["responses"] == 6
    report = open(os.path.join(out, "report.md")).read()
    assert "| metric | start | sft |" in report and "| reference_ppl |" in report


def test_benchmark_shaped_prompt_files(tmp_path):
    path = tmp_path / "bench.jsonl"
    path.write_text('{"query": "Write a poem.", "input": "About rain."}\n'
                    '{"instruction": "Write a letter.", "answer": "Dear friend"}\n'
                    '{"prompt": "Essay on owls", "id": "x7"}\n')
    c = from_config(Eval, to_config(Eval(prompts=str(path))))
    rows = load_prompts(c)
    assert [r["prompt"] for r in rows] == ["Write a poem.\n\nAbout rain.", "Write a letter.",
                                           "Essay on owls"]
    assert [r["reference"] for r in rows] == ["", "Dear friend", ""]
    assert rows[2]["id"] == "x7"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    with pytest.raises(ValueError, match=r"bench.jsonl:2: no prompt field"):
        load_prompts(c)


def test_verdict_judges_changes_against_their_sampling_noise():
    from opera_jax.evaluation import verdict
    sft = {"answer_acc": 0.6, "truth_responses": 100.0, "math_acc": 0.5, "math_responses": 20.0,
           "truncated_frac": 0.0, "responses": 120.0}
    # 2 s.e. of 0.60 vs 0.45 over 100 responses each: 2·sqrt(.24/100 + .2475/100) = 0.1396.
    worse, lines = verdict(sft, {**sft, "answer_acc": 0.45})
    assert worse and lines[0] == ("held-out answer accuracy: 0.600 -> 0.450  "
                                  "(-0.150; noise ±0.140 at 2 s.e., n=100/100: WORSE)")
    # 0.60 -> 0.55: 2·sqrt(.24/100 + .2475/100) = 0.1397 > 0.05: not worse.
    worse, lines = verdict(sft, {**sft, "answer_acc": 0.55})
    assert not worse and lines[0].endswith("within noise)")
    # Math over 20 responses: 0.5 -> 0.3 is 0.2 < 2·sqrt(.25/20 + .21/20) = 0.303.
    worse, lines = verdict(sft, {**sft, "math_acc": 0.3})
    assert not worse and "noise ±0.303" in lines[1]
    # Truncation 0 -> 0.2 of 120: beyond 2·sqrt(.16/120) = 0.073 and past 10 %: worse;
    # 0 -> 0.05 is beyond the noise (0.040) but under 10 %: not worse.
    assert verdict(sft, {**sft, "truncated_frac": 0.2})[0]
    assert not verdict(sft, {**sft, "truncated_frac": 0.05})[0]
    assert verdict(sft, {**sft, "answer_acc": 0.9})[1][0].endswith("better)")
    # Without response counts every fall counts.
    assert verdict({"answer_acc": 0.6}, {"answer_acc": 0.59}) == (
        True, ["held-out answer accuracy: 0.600 -> 0.590  (WORSE)"])
