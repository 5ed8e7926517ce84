"""GRPO of Qwen3-8B with the published OPERA settings on one 8-GPU H200 node (141 GB each,
~139 GiB usable).

    launch/gpu_node.sh configs/grpo_qwen3_8b_gpu8.py \\
        --config.model.hf_dir=/ckpt/Qwen3-8B-sft --config.data.path=/data/opera/rl_prompts.jsonl \\
        --config.validation.path=/data/opera/val_prompts.jsonl --config.workdir=/runs/opera_8b

(or `python -m opera_jax.train --config=configs/grpo_qwen3_8b_gpu8.py …` in an installed
`.[cuda]` environment). Published (docs/METHOD.md §3, 32 GPUs): 64 prompts × 16 responses per
RL step, prompts up to 6,144 and responses up to 10,240 tokens, 8 updates per step. Here all of
that on 8 GPUs: one process, parameters and AdamW state (float32, ~98 GB) sharded fsdp-8
(~12 GB per GPU), bf16 compute with remat, 4 prompts × 16 rows per sampler call (bf16 KV cache
~16k slots × 144 KiB × 64 rows ≈ 150 GB over 8 GPUs), 16 micro-batches of 8 rows per update
(one 16,384-token row per GPU).
The start point is the SFT model (`model.hf_dir`, or `model.checkpoint` = the SFT run); it is
also the KL reference.

Planned ahead of time (an estimate: compiled for 8 CPU devices standing in for the GPUs):

    python -m opera_jax.plan --config=configs/grpo_qwen3_8b_gpu8.py --gpus=8 --hbm_gb=139

On 80 GB GPUs (H100) the same estimate does not fit: the update of one 16,384-token row per
GPU and the reward of 8 responses come to 85–89 GB per device against 72 (benchmarks/RESULTS.md),
and the micro-batch cannot shrink below one row per GPU; there, cut the row length
(rollout.max_new_tokens) or use 16 GPUs.
"""

from opera_jax.config.setups import grpo_published


def get_config():
    c = grpo_published("/ckpt/Qwen3-8B-sft")
    c.workdir = "/runs/opera_grpo_8b"
    c.model.preset = "qwen3-8b"
    c.mesh.fsdp = None           # all 8 GPUs
    c.rollout.max_prompt_len = 6144
    c.rollout.num_prompts = 64   # published: 64 prompts x 16 = 1,024 responses per RL step
    c.rollout.max_new_tokens = 10240
    c.rollout.prompts_per_call = 4
    # The fixed-batch sampler in calls of prompts_per_call, the path the planner compiles;
    # the paged engine (rollout.engine=True) is not planned yet.
    c.rollout.engine = False
    c.grpo.grad_accum = 16       # 128 rows per update in micro-batches of 8 (1 per GPU)
    c.grpo.peak_flops = 989e12   # per GPU, dense bf16 (H100/H200), for MFU
    c.reward.batch_size = 8
    return c
