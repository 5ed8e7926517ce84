"""GRPO of Qwen3-0.6B on one GPU with the published OPERA settings, scaled to one device.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python -m opera_jax.train \\
        --config=configs/grpo_qwen3_0p6b_gpu.py \\
        --config.model.hf_dir=/ckpt/Qwen3-0.6B \\
        --config.data.path=/data/opera/rl_prompts.jsonl \\
        --config.validation.path=/data/opera/val_prompts.jsonl \\
        --config.workdir=/runs/opera_grpo_0p6b

Start point: `model.hf_dir` (an HF Qwen3 directory: the SFT model exported with
`python -m opera_jax.export`, or the base checkpoint), or an SFT run's Orbax checkpoints with
`--config.model.checkpoint=/runs/opera_sft_0p6b` (the architecture still comes from
`model.hf_dir`). The KL reference is that same start point unless `reference.*` names another.
Prompt rows (JSONL or ArrayRecord): `prompt`, `reference`, optional `task_type` (writing |
math). Rerunning the command resumes; SIGTERM checkpoints after the current step.

Published (docs/METHOD.md §3; Qwen3-8B on 32 GPUs): 64 prompts × G 16 per RL step, responses
up to 10,240 tokens, 8 optimizer updates per RL step, 1 PPO epoch, lr 1e-6 with 40 % warm-up
then constant, AdamW (0.9, 0.999), wd 0.01, clip 1.0, KL 0.001 (k3, as a loss), clip 0.2, dual
clip 3. Kept here: G 16, 8 updates per step, every loss and optimizer setting. Scaled to one
GPU: 16 prompts per step (256 responses; 2 prompts × 16 per update, as published per GPU
group), responses up to 4,096 tokens and prompts up to 1,024, sampled 4 prompts (64 rows) per
sampler call so the bf16 KV cache stays ~37 GB, 8 micro-batches of 4 rows per update, remat on
(the planner puts the update at 31 GiB per device, the sampler's decode at 47 GiB).

Planned ahead of time (an estimate: compiled for a CPU device standing in for the GPU):

    python -m opera_jax.plan --config=configs/grpo_qwen3_0p6b_gpu.py --gpus=1 --hbm_gb=80
"""

from opera_jax.config.setups import grpo_published


def get_config():
    c = grpo_published("/ckpt/Qwen3-0.6B")
    c.workdir = "/tmp/opera_grpo_0p6b"
    c.model.preset = "qwen3-0.6b"
    c.mesh.num_devices = 1
    c.rollout.max_prompt_len = 1024
    c.rollout.num_prompts = 16
    c.rollout.max_new_tokens = 4096
    c.rollout.prompts_per_call = 4  # 64 rows x 5,120 slots of bf16 KV cache per call
    # The fixed-batch sampler in calls of prompts_per_call, the path the planner compiles;
    # the paged engine (rollout.engine=True) is not planned yet.
    c.rollout.engine = False
    c.grpo.grad_accum = 8        # 32 rows per update in micro-batches of 4 (planned: 31 GiB)
    c.grpo.peak_flops = 989e12   # H100 / H200 dense bf16, for MFU
    return c
