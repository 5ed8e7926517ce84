"""GRPO of Qwen3-8B on a TPU v5p / v6e host with the published OPERA settings.

    launch/tpu_vm.sh opera-v6e us-east5-b v6e-8 configs/grpo_qwen3_8b_tpu.py \\
        --config.model.hf_dir=/mnt/ckpt/Qwen3-8B-sft --config.data.path=/mnt/data/rl.jsonl \\
        --config.validation.path=/mnt/data/val.jsonl --config.workdir=/mnt/runs/opera_8b

One host's chips (v5p-8: 4 chips × 95 GB; v6e-8: 8 chips × 32 GB) as one fsdp mesh; Pallas
splash attention for the causal training passes. Larger slices (v5p-32, v6e-32, …) run the same
config on every worker (launch/tpu_vm.sh): the mesh spans all hosts, every process runs the same
rollout and reward bookkeeping on the global batch.
Published settings as in configs/grpo_qwen3_8b_gpu8.py; on v6e-8 (256 GB HBM in all) the
rollout is split into 2 prompts × 16 rows per sampler call.

Planned ahead of time for a v5p-8 (the table is in README.md):

    python -m opera_jax.plan --config=configs/grpo_qwen3_8b_tpu.py --topology=v5p-8
"""

from opera_jax.config.setups import grpo_published


def get_config():
    c = grpo_published("/mnt/ckpt/Qwen3-8B-sft")
    c.workdir = "/mnt/runs/opera_grpo_8b"
    c.model.preset = "qwen3-8b"
    c.model.attention_impl = "splash"
    c.rollout.max_prompt_len = 6144
    c.rollout.num_prompts = 64
    c.rollout.max_new_tokens = 10240
    c.rollout.prompts_per_call = 2
    # The fixed-batch sampler in calls of prompts_per_call, the path the planner compiles;
    # the paged engine (rollout.engine=True) is not planned yet.
    c.rollout.engine = False
    c.grpo.grad_accum = 16
    c.grpo.peak_flops = 918e12   # v6e per chip, dense bf16 (v5p: 459e12)
    # The reward's prefill in one pass over prompt + response (16,384 tokens): right-padded
    # rows from slot 0 go through splash, where 1,024-token chunks at a traced cache offset
    # would fall back to xla's dense [chunk, 17k-slot] scores (planned: see the docstring).
    c.reward.prefill_chunk = 16384
    return c
