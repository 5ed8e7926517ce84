"""What each stage runs on: one frozen dataclass per stage, made of the sections.

`config.stage` names the stage; `parse(config)` gives its run, which is all a stage reads:

    run = parse(load_config_file("configs/grpo_tiny.py"))   # a GRPORun
    grpo.train(run)

Every run has a `workdir` (everything it writes goes there) and a `seed`. The pipeline holds
the sections of all its stages once, under the same keys as the single-stage configs, so
`--config.grpo.steps=40` means the same thing to `configs/grpo_tiny.py` and to the main job.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import ml_collections

from opera_jax.config import sections as S
from opera_jax.config.parse import ConfigError, from_config, to_config
from opera_jax.reward.config import RewardConfig


@dataclasses.dataclass(frozen=True)
class SFTRun:
    """Supervised fine-tuning (train/sft.py). data.path: rows with prompt, thinking, output."""

    STAGE: ClassVar[S.Stage] = S.Stage.SFT
    workdir: str = "/tmp/opera_sft"
    seed: int = 0                     # the train state's RNG
    model: S.Model = S.Model()
    mesh: S.Mesh = S.Mesh()
    data: S.Data = S.Data(path="toy:sft:256")
    checkpoint: S.Checkpoint = S.Checkpoint()
    sft: S.SFT = S.SFT()
    lora: S.Lora = S.Lora()
    log: S.Log = S.Log()


@dataclasses.dataclass(frozen=True)
class GRPORun:
    """GRPO with the OPERA reward (train/grpo.py). data.path: prompt rows with prompt,
    reference and optional task_type (writing | math)."""

    STAGE: ClassVar[S.Stage] = S.Stage.GRPO
    workdir: str = "/tmp/opera_grpo"
    seed: int = 0                     # the train state's RNG; every step's sampling seed
    model: S.Model = S.Model()        # the start point (and, by default, the KL reference)
    mesh: S.Mesh = S.Mesh()
    data: S.Data = S.Data()
    checkpoint: S.Checkpoint = S.Checkpoint(every=5)
    grpo: S.GRPO = S.GRPO()
    rollout: S.Rollout = S.Rollout()
    reward: RewardConfig = RewardConfig(buckets_per_octave=2)
    loss: S.Loss = S.Loss()
    validation: S.Validation = S.Validation()
    reference: S.Reference = S.Reference()
    lora: S.Lora = S.Lora()
    log: S.Log = S.Log()


@dataclasses.dataclass(frozen=True)
class SynthRun:
    """Cold-start synthesis (synth/). `model` is the teacher; data.path: prompt rows with id,
    prompt, reference; the records go to workdir/records.jsonl."""

    STAGE: ClassVar[S.Stage] = S.Stage.SYNTH
    workdir: str = "/tmp/opera_synth"
    seed: int = 0
    model: S.Model = S.Model()
    mesh: S.Mesh = S.Mesh()
    data: S.Data = S.Data(path="toy:prompts:32")
    synth: S.Synth = S.Synth()


@dataclasses.dataclass(frozen=True)
class PipelineRun:
    """The whole recipe (pipeline.py): warm-up → synth → sft → grpo → eval, each stage in
    workdir/<stage>, each wired to the one before.

    `model` is the start point of the recipe: with `hf_dir` None, the warm-up trains `preset`
    from scratch on the toy domain and stands in for a pretrained instruct model; with an HF
    directory, that model is the teacher and the student, and the warm-up is skipped.
    `data` holds the GRPO prompts; `synth_prompts` the synthesis prompts (data.path syntax).
    """

    STAGE: ClassVar[S.Stage] = S.Stage.PIPELINE
    workdir: str = "runs/opera"
    seed: int = 0
    stages: str = "warmup,synth,sft,grpo,eval"  # a subset runs those, in this order
    model: S.Model = S.Model()
    mesh: S.Mesh = S.Mesh()
    data: S.Data = S.Data()
    checkpoint: S.Checkpoint = S.Checkpoint()
    warmup: S.Warmup = S.Warmup()
    synth: S.Synth = S.Synth()
    synth_prompts: str = "toy:prompts:64:1"
    sft: S.SFT = S.SFT()
    grpo: S.GRPO = S.GRPO()
    rollout: S.Rollout = S.Rollout()
    reward: RewardConfig = RewardConfig(buckets_per_octave=2)
    loss: S.Loss = S.Loss()
    validation: S.Validation = S.Validation()
    eval: S.Eval = S.Eval(scorer="sft")
    log: S.Log = S.Log()               # the SFT and GRPO stages


RUNS = {cls.STAGE: cls for cls in (PipelineRun, SynthRun, SFTRun, GRPORun)}
Run = PipelineRun | SynthRun | SFTRun | GRPORun


def config_of(run: Run) -> ml_collections.ConfigDict:
    """The ConfigDict of a run: `stage` plus every field (what config files return)."""
    config = to_config(run)
    config.stage = run.STAGE.value
    return config


def to_json(run: Run) -> dict:
    """The run's config as a JSON-safe nested dict (saved with every checkpoint)."""
    return json.loads(config_of(run).to_json_best_effort())


def parse(config: ml_collections.ConfigDict, *, expect: S.Stage | None = None) -> Run:
    """The typed run of a config, by its `stage` key.

    Args:
      config: from a config file and the command line.
      expect: the stage the caller runs; another stage is an error that says which.
    Raises:
      ConfigError: a missing or unknown stage, an unknown key, a bad value (naming the key).
    """
    if "stage" not in config:
        raise ConfigError(f"config has no 'stage' key; stages: "
                          f"{', '.join(s.value for s in S.Stage)}")
    try:
        stage = S.Stage(config.stage)
    except ValueError:
        raise ConfigError(f"config.stage={config.stage!r} is not one of: "
                          f"{', '.join(s.value for s in S.Stage)}") from None
    if expect is not None and stage is not expect:
        raise ConfigError(f"this config is for stage {stage.value!r}, not {expect.value!r}: run "
                          f"it with `python -m opera_jax.train --config=…`, which runs the "
                          f"stage a config names")
    body = {k: v for k, v in config.items() if k != "stage"}
    return from_config(RUNS[stage], body, "config")
