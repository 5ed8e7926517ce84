"""The setups embedded in the package (the main job must run from any install); the files in
configs/ start from these and carry the launch commands.

    python -m opera_jax.train                                   # default(): the main job
    python -m opera_jax.train --config=configs/grpo_tiny.py     # grpo_tiny()
"""

from __future__ import annotations

import dataclasses

import ml_collections

from opera_jax.config import sections as S
from opera_jax.config.runs import GRPORun, PipelineRun, SFTRun, SynthRun, config_of
from opera_jax.reward.config import RewardConfig

replace = dataclasses.replace


def sft_tiny() -> ml_collections.ConfigDict:
    """SFT of the tiny preset on the toy domain's traces (configs/sft_tiny.py)."""
    return config_of(SFTRun(workdir="/tmp/opera_sft_tiny",
                            model=S.Model(dtype=S.Dtype.BFLOAT16)))


def grpo_tiny() -> ml_collections.ConfigDict:
    """GRPO of the tiny preset on the toy domain's prompts (configs/grpo_tiny.py)."""
    return config_of(GRPORun(workdir="/tmp/opera_grpo_tiny"))


def synth_tiny() -> ml_collections.ConfigDict:
    """Cold-start synthesis with a tiny random teacher (configs/synth_tiny.py)."""
    return config_of(SynthRun(workdir="/tmp/opera_synth_tiny"))


def default() -> ml_collections.ConfigDict:
    """The main job: every stage of the recipe on the toy domain, on the CPU, in minutes.

        python -m opera_jax.train
        python -m opera_jax.train --config.stages=grpo,eval --config.grpo.steps=40

    The `toy` model (4 layers, 128 wide, 0.9M parameters) in float32 throughout. Why the GRPO
    settings differ from the published ones (lr, KL weight): docs/METHOD.md §6.
    """
    toy = S.Model(preset="toy")
    return config_of(PipelineRun(
        workdir="runs/opera_default",
        model=toy,
        checkpoint=S.Checkpoint(every=20),
        warmup=S.Warmup(steps=200, seq_len=512, log_every=20, optim=S.Optim(
            lr=3e-3, schedule=S.Schedule.COSINE, b2=0.95)),
        # 64 toy prompts are compile-bound: compaction's extra batch widths cost more
        # compiling than they save.
        synth=S.Synth(compact=False),
        sft=S.SFT(steps=40, seq_len=512, log_every=10, optim=S.Optim(
            lr=1e-3, schedule=S.Schedule.COSINE, b2=0.95)),
        data=S.Data(path="toy:prompts:256"),
        rollout=S.Rollout(num_prompts=8, n=8, max_prompt_len=96, max_new_tokens=192),
        reward=RewardConfig(batch_size=16, buckets_per_octave=2),
        grpo=S.GRPO(steps=20, optim=S.Optim(lr=1e-4, warmup_frac=0.4)),
        loss=S.Loss(kl_coef=0.05),
        validation=S.Validation(every=10, path="toy:heldout:16:1", num_prompts=16),
        eval=S.Eval(prompts="toy:heldout:96:12345", scorer="sft"),  # the study's prompts
    ))


def grpo_published(hf_dir: str | None = None) -> ml_collections.ConfigDict:
    """GRPO with the published OPERA hyperparameters (docs/METHOD.md §3) on a real checkpoint.

    Kept exactly: G = 16, temperature 1, top-p 1, 8 optimizer updates per RL step (1 PPO epoch),
    AdamW lr 1e-6 (0.9, 0.999) wd 0.01, clip 1.0, 40 % linear warm-up then constant, PPO clip
    0.2 / dual clip 3, k3 KL 0.001 as a loss, token-mean. The setup files (configs/grpo_qwen3_*)
    size the batch, lengths and mesh for their hardware.
    """
    return config_of(GRPORun(
        workdir="/tmp/opera_grpo",
        model=S.Model(hf_dir=hf_dir, preset=None, dtype=S.Dtype.BFLOAT16, remat=True),
        data=S.Data(path="/data/opera/rl_prompts.jsonl", num_threads=4),
        checkpoint=S.Checkpoint(every=10, keep=3),
        rollout=S.Rollout(n=16),
        reward=RewardConfig(min_bucket=256, buckets_per_octave=4),
        grpo=S.GRPO(steps=200, num_minibatches=8, chunk_size=1024,
                    optim=S.Optim(lr=1e-6, warmup_frac=0.4)),
        validation=S.Validation(every=10, path="/data/opera/val_prompts.jsonl",
                                num_prompts=64, n=4),
    ))
