"""GRPO of Qwen3-0.6B on one GPU with the published OPERA settings, scaled to one device.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python -m opera_jax.train.grpo \\
        --config=configs/grpo_qwen3_0p6b_gpu.py \\
        --config.model.hf_dir=/ckpt/Qwen3-0.6B \\
        --config.data.path=/data/opera/rl_prompts.jsonl \\
        --config.validation.path=/data/opera/val_prompts.jsonl \\
        --config.workdir=/runs/opera_grpo_0p6b

Start point: `model.hf_dir` (an HF Qwen3 directory: the SFT model exported with
`python -m opera_jax.export`, or the base checkpoint), or an SFT run's Orbax checkpoints with
`--config.init.checkpoint=/runs/opera_sft_0p6b` (the architecture still comes from
`model.hf_dir`). The KL reference is that same start point unless `reference.*` names another.
Prompt rows (JSONL or ArrayRecord): `prompt`, `reference`, optional `task_type` (writing |
math). Rerunning the command resumes; SIGTERM checkpoints after the current step.

Published (OPERA_METHOD.md §3; Qwen3-8B on 32 GPUs): 64 prompts × G 16 per RL step, responses
up to 10,240 tokens, 8 optimizer updates per RL step, 1 PPO epoch, lr 1e-6 with 40 % warm-up
then constant, AdamW (0.9, 0.999), wd 0.01, clip 1.0, KL 0.001 (k3, as a loss), clip 0.2, dual
clip 3. Kept here: G 16, 8 updates per step, every loss and optimizer setting. Scaled to one
GPU: 16 prompts per step (256 responses; 2 prompts × 16 per update, as published per GPU
group), responses up to 4,096 tokens and prompts up to 1,024, sampled 4 prompts (64 rows) per
sampler call so the bf16 KV cache stays ~37 GB, 8 micro-batches of 4 rows per update, remat on.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "grpo"
    c.workdir = "/tmp/opera_grpo_0p6b"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = "/ckpt/Qwen3-0.6B"  # architecture, tokenizer and (without init) weights
    c.model.preset = "qwen3-0.6b"  # only when hf_dir is "": random weights (benchmarks)
    c.model.init_seed = 0
    c.model.dtype = "bfloat16"   # compute; old log-probs are then recomputed (see grpo.py)
    c.model.param_dtype = "float32"  # master weights and AdamW moments
    c.model.remat = True
    c.model.attention_impl = ""  # platform default: cuDNN for the causal training passes

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""       # an SFT run's workdir (Orbax): params only
    c.init.step = -1

    c.reference = ml_collections.ConfigDict()
    c.reference.checkpoint = ""  # both "" = the start point
    c.reference.hf_dir = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.num_devices = 1

    c.data = ml_collections.ConfigDict()
    c.data.path = "/data/opera/rl_prompts.jsonl"
    c.data.write_toy_rows = 0
    c.data.on_bad_row = "skip"
    c.data.seed = 0
    c.data.max_prompt_len = 1024
    c.data.enable_thinking = True
    c.data.num_threads = 4

    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_prompts = 16
    c.rollout.n = 16             # published G
    c.rollout.max_new_tokens = 4096
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.prompts_per_call = 4  # 64 rows x 5,120 slots of bf16 KV cache per call
    c.rollout.old_logprobs = "auto"

    c.reward = ml_collections.ConfigDict()
    c.reward.rank_weight = 0.3
    c.reward.reflection_weight = 0.7
    c.reward.keywords = ("But", "Wait", "Hmm", "However", "Wait a minute")
    c.reward.keyword_match = "word"
    c.reward.max_segments = 0
    c.reward.scorer = "policy"
    c.reward.lp_impl = "kernel"
    c.reward.batch_size = 8
    c.reward.min_bucket = 256

    c.loss = ml_collections.ConfigDict()
    c.loss.clip_low = 0.2
    c.loss.clip_high = 0.2
    c.loss.dual_clip = 3.0
    c.loss.kl_coef = 0.001
    c.loss.aggregation = "token_mean"

    c.grpo = ml_collections.ConfigDict()
    c.grpo.steps = 200
    c.grpo.num_minibatches = 8   # published: 8 updates per RL step, 1 PPO epoch
    c.grpo.grad_accum = 8        # 32 rows per update in micro-batches of 4
    c.grpo.chunk_size = 1024
    c.grpo.log_every = 1
    c.grpo.peak_flops = 989e12   # H100 / H200 dense bf16, for MFU

    c.validation = ml_collections.ConfigDict()
    c.validation.every = 10
    c.validation.path = "/data/opera/val_prompts.jsonl"
    c.validation.num_prompts = 64
    c.validation.n = 4
    c.validation.temperature = 1.0

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_frac = 0.4
    c.optim.final_lr_frac = 1.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 10
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    return c
