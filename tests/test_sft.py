"""End-to-end SFT "pulse" runs: the loss falls; an interrupted run resumed from its step-3
checkpoint reproduces the uninterrupted run's step-4 (and step-5) metrics exactly.

Both runs start from the random HF checkpoint of conftest (the real load_pretrained path) on
one device in float32, with the toy SFT set written by the test.
"""

import math
import os
import shutil

import pytest

from opera_jax.cli import check_overrides, load_config_file
from opera_jax.config.runs import parse
from opera_jax.data.jsonl import write_jsonl
from opera_jax.data.toy_domain import examples
from opera_jax.train.metrics import read_metrics
from opera_jax.train.sft import train

STEPS = 8
CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "sft_tiny.py")


def pulse_config(workdir, data, hf_dir):
    c = load_config_file(CONFIG)
    c.workdir = str(workdir)
    c.model.hf_dir = hf_dir
    c.model.dtype = "float32"
    c.mesh.num_devices = 1
    c.data.path = data
    c.sft.seq_len = 256
    c.data.num_threads = 0
    c.sft.steps = STEPS
    c.sft.batch_size = 4
    c.checkpoint.every = 100  # only the last step (or the interruption) is saved
    return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_tiny):
    tmp = tmp_path_factory.mktemp("sft_pulse")
    data = write_jsonl(tmp / "toy.jsonl", examples(64, seed=0))
    train(parse(pulse_config(tmp / "whole", data, hf_tiny[0])))
    parts = pulse_config(tmp / "parts", data, hf_tiny[0])
    parts.checkpoint.every = 3
    parts = parse(parts)
    # Runs steps 1-4 and "crashes" before step 4's checkpoint is kept: the step-3 save is
    # asynchronous and step 4 donates the saved buffers, so this also checks the save is safe.
    train(parts, stop_after=4)
    shutil.rmtree(tmp / "parts" / "checkpoints" / "4")
    first = read_metrics(str(tmp / "parts"))
    train(parts, stop_after=5)  # the same command again: resumes from step 3
    return tmp, read_metrics(str(tmp / "whole")), first, read_metrics(str(tmp / "parts"))


def test_loss_falls_from_uniform(runs):
    _, whole, _, _ = runs
    losses = [r["loss"] for r in whole]
    assert [r["step"] for r in whole] == list(range(1, STEPS + 1))
    assert losses[0] == pytest.approx(math.log(1024), abs=0.05)  # random init ≈ uniform
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5
    assert all(r["tokens_per_s"] > 0 and r["loss_tokens"] > 0 for r in whole)


def test_resume_from_step_3_gives_the_uninterrupted_steps_4_and_5(runs):
    tmp, whole, first, parts = runs
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    # the resumed run dropped the rows after its checkpoint (step 4) and wrote them again
    assert [r["step"] for r in parts] == [1, 2, 3, 4, 5]
    for resumed, want in ((parts[3], whole[3]), (parts[4], whole[4])):
        for key in ("loss", "grad_norm", "lr", "loss_tokens"):
            assert resumed[key] == pytest.approx(want[key], rel=1e-6), key
    # consecutive steps differ, so the equality is not an accident of the data
    assert all(abs(parts[3]["loss"] - r["loss"]) > 1e-3 for r in first[:3])
    assert sorted(os.listdir(tmp / "parts" / "checkpoints")) == ["3", "5"]
    assert sorted(os.listdir(tmp / "whole" / "checkpoints")) == [str(STEPS)]


def test_unknown_override_lists_the_valid_keys():
    config = load_config_file(CONFIG)
    assert check_overrides(config, ["--config=x.py", "--config.sft.steps=3"]) is None
    assert check_overrides(config, ["--config.sft.stepz=3"]) == (
        "unknown config key 'sft.stepz'; valid keys under 'sft': "
        "batch_size, chunk_size, grad_accum, log_every, optim, overlong, packing, seq_len, steps")
    assert check_overrides(config, ["--config.nope=1"]).startswith(
        "unknown config key 'nope'; valid keys under 'the config': checkpoint, data, log, lora, "
        "mesh, model")
