"""The tiny setups' configs, embedded in the package (the default run must work from any
install); the files in configs/ wrap them and carry the launch commands.

Each function returns a fresh ml_collections.ConfigDict; every key is documented inline.
"""

import ml_collections


def _model(dtype: str) -> ml_collections.ConfigDict:
    """The `model` section: where the weights come from and the dtype policy."""
    m = ml_collections.ConfigDict()
    m.hf_dir = ""                # a local HF Qwen3 directory; "" = random `preset` weights
    m.preset = "tiny"
    m.init_seed = 0
    m.dtype = dtype              # compute
    m.param_dtype = "float32"    # master weights and optimizer moments
    m.remat = False
    m.attention_impl = ""        # "" = platform default; xla | cudnn | splash
    return m


def _mesh() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.data = 1
    m.fsdp = -1                  # -1 = all remaining devices
    m.tensor = 1
    m.num_devices = -1           # use the first n devices; -1 = all
    return m


def _data_source(path: str) -> ml_collections.ConfigDict:
    """The keys every JSONL-reading trainer shares (rows, bad-row policy, shuffling)."""
    d = ml_collections.ConfigDict()
    d.path = path                # JSONL or *.array_record files; globs, comma-separated
    d.write_toy_rows = 256       # write toy rows to `path` when missing (0: never)
    d.on_bad_row = "skip"        # skip (warn with file:line) | raise
    d.seed = 0                   # shuffle seed; every epoch reshuffles
    d.enable_thinking = True
    d.num_threads = 2            # tokenising threads ahead of the loop
    return d


def _checkpoint(every: int) -> ml_collections.ConfigDict:
    k = ml_collections.ConfigDict()
    k.every = every              # and always at the last step and on SIGTERM
    k.keep = 2
    k.async_save = True
    return k


def sft_tiny() -> ml_collections.ConfigDict:
    """SFT of the tiny preset on the toy domain (configs/sft_tiny.py)."""
    c = ml_collections.ConfigDict()
    c.stage = "sft"
    c.workdir = "/tmp/opera_sft_tiny"
    c.seed = 0  # the train state's RNG

    c.model = _model("bfloat16")

    c.mesh = _mesh()

    c.data = _data_source("/tmp/opera_sft_tiny/toy.jsonl")
    c.data.seq_len = 256         # T
    c.data.packing = True
    c.data.overlong = "drop"     # drop | truncate examples longer than seq_len

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 20
    c.sft.batch_size = 8         # global rows of seq_len tokens per step
    c.sft.grad_accum = 1         # micro-batches per step (batch_size / grad_accum rows each)
    c.sft.chunk_size = 512       # log-prob chunk (positions)
    c.sft.log_every = 1

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.schedule = "cosine"  # cosine | constant (both after linear warm-up)
    c.optim.warmup_steps = 2
    c.optim.final_lr_frac = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0      # global-norm clipping; <= 0 disables

    c.checkpoint = _checkpoint(10)
    return c


def grpo_tiny() -> ml_collections.ConfigDict:
    """GRPO of the tiny preset on the toy domain (configs/grpo_tiny.py)."""
    c = ml_collections.ConfigDict()
    c.stage = "grpo"
    c.workdir = "/tmp/opera_grpo_tiny"
    c.seed = 0  # the train state's RNG: every step's sampling seed derives from it

    c.model = _model("float32")  # float32: the sampler's log-probs serve as old ones

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""       # Orbax dir (a run's workdir or its checkpoints/): params only
    c.init.step = -1             # its step; -1 = newest

    c.reference = ml_collections.ConfigDict()  # the frozen model of the KL term
    c.reference.checkpoint = ""  # both "" = the policy's initial weights (init / model source)
    c.reference.hf_dir = ""

    c.mesh = _mesh()

    # prompt rows: prompt, reference, task_type (writing | math)
    c.data = _data_source("/tmp/opera_grpo_tiny/prompts.jsonl")
    c.data.max_prompt_len = 64   # tokens after the chat template; longer prompts are skipped

    c.rollout = ml_collections.ConfigDict()
    c.rollout.num_prompts = 8    # prompts per RL step
    c.rollout.n = 4              # G responses per prompt
    c.rollout.max_new_tokens = 64
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0          # 0 = off
    c.rollout.prompts_per_call = 0  # sampler call size in prompts (bounds the KV cache); 0 = all
    c.rollout.old_logprobs = "auto"  # auto | sampler | recompute (see opera_jax/train/grpo.py)

    c.reward = ml_collections.ConfigDict()  # opera_jax.reward.RewardConfig fields
    c.reward.rank_weight = 0.3
    c.reward.reflection_weight = 0.7
    c.reward.keywords = ("But", "Wait", "Hmm", "However", "Wait a minute")
    c.reward.keyword_match = "word"  # word | substring (published)
    c.reward.max_segments = 0    # 0 = no cap
    c.reward.scorer = "policy"   # policy (published) | reference
    c.reward.lp_impl = "kernel"  # kernel | naive
    c.reward.batch_size = 8      # responses per scoring call
    c.reward.min_bucket = 64
    c.reward.buckets_per_octave = 2  # coarse: RL lengths change every step (fewer compiles)

    c.loss = ml_collections.ConfigDict()  # opera_jax.train.grpo_loss.GRPOLossConfig fields
    c.loss.clip_low = 0.2
    c.loss.clip_high = 0.2
    c.loss.dual_clip = 3.0
    c.loss.kl_coef = 0.001       # 0 = no KL term and no reference model
    c.loss.aggregation = "token_mean"  # token_mean | seq_mean

    c.grpo = ml_collections.ConfigDict()
    c.grpo.steps = 10            # RL steps
    c.grpo.num_minibatches = 2   # optimizer updates per RL step (1 PPO epoch)
    c.grpo.grad_accum = 1        # micro-batches per update
    c.grpo.chunk_size = 512      # log-prob chunk (positions)
    c.grpo.log_every = 1
    c.grpo.peak_flops = 0.0      # peak FLOP/s of one device for MFU; 0 = unknown (no MFU)

    c.validation = ml_collections.ConfigDict()
    c.validation.every = 5       # RL steps; also before the first and after the last; 0 = off
    c.validation.path = ""       # held-out prompt rows; "" = the toy domain's held-out prompts
    c.validation.num_prompts = 8
    c.validation.n = 2           # responses per prompt (rank needs >= 2)
    c.validation.temperature = 1.0  # 0 = greedy (then use n = 1)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.schedule = "constant"  # constant | cosine, after the linear warm-up
    c.optim.warmup_frac = 0.4    # of the RL steps (published 40 %)
    c.optim.final_lr_frac = 1.0  # cosine only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0      # global-norm clipping; <= 0 disables

    c.checkpoint = _checkpoint(5)
    return c


def default() -> ml_collections.ConfigDict:
    """The embedded default: the whole recipe on the toy domain, CPU, ~10 minutes on 2 cores.

        python -m opera_jax.train
        python -m opera_jax.train --config.stages=grpo,eval --config.grpo.grpo.steps=40

    Stage sub-configs are the tiny trainers' configs with the toy model; the pipeline fills in
    the paths between stages (opera_jax/train/pipeline.py).
    """
    from opera_jax import evaluate
    from opera_jax.synth.config import synth_tiny

    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.workdir = "runs/opera_default"
    c.warmup_cache = "~/.cache/opera_jax/warmup"  # keyed by the warm-up config's hash
    c.stages = "warmup,synth,sft,grpo,eval"
    c.seed = 0
    c.warmup_examples = 3000     # toy traces the warm-up trains on
    c.synth_prompts = 64         # toy prompts the teacher writes trajectories for

    c.warmup = sft_tiny()
    c.warmup.model.preset = "toy"
    c.warmup.model.dtype = "float32"
    c.warmup.data.seq_len = 512
    c.warmup.sft.steps = 200
    c.warmup.sft.log_every = 20
    c.warmup.optim.lr = 3e-3
    c.warmup.optim.warmup_steps = 20
    c.warmup.checkpoint.every = 100

    c.synth = synth_tiny()
    c.synth.teacher.preset = "toy"  # architecture only: the warm-up's weights are loaded
    c.synth.progress = True
    # 64 toy prompts are compile-bound: compaction's extra batch widths cost 13 s of compiling
    # (64 s vs 51 s for the stage, same records) and save less than that.
    c.synth.compact = False

    c.sft = sft_tiny()
    c.sft.model.preset = "toy"
    c.sft.model.dtype = "float32"
    c.sft.data.seq_len = 512
    c.sft.sft.steps = 40
    c.sft.sft.log_every = 10
    c.sft.optim.lr = 1e-3
    c.sft.optim.warmup_steps = 4
    c.sft.checkpoint.every = 20

    c.grpo = grpo_tiny()
    c.grpo.model.preset = "toy"
    c.grpo.data.write_toy_rows = 256
    c.grpo.data.max_prompt_len = 96
    c.grpo.rollout.num_prompts = 8
    c.grpo.rollout.n = 8
    c.grpo.rollout.max_new_tokens = 192
    c.grpo.reward.batch_size = 16
    c.grpo.grpo.steps = 20
    c.grpo.validation.every = 10
    c.grpo.validation.num_prompts = 16
    c.grpo.optim.lr = 3e-4
    c.grpo.checkpoint.every = 5

    c.eval = evaluate.default_config()
    c.eval.num_prompts = 32
    c.eval.scorer = "sft"        # one yardstick for both models: the SFT model scores LP
    return c


def grpo_published(hf_dir: str = "") -> ml_collections.ConfigDict:
    """GRPO with the published OPERA hyperparameters (OPERA_METHOD.md §3) on a real checkpoint.

    Kept exactly: G = 16, temperature 1, top-p 1, 8 optimizer updates per RL step (1 PPO epoch),
    AdamW lr 1e-6 (0.9, 0.999) wd 0.01, clip 1.0, 40 % linear warm-up then constant, PPO clip
    0.2 / dual clip 3, k3 KL 0.001 as a loss, token-mean. The setup files (configs/grpo_qwen3_*)
    size the batch, lengths and mesh for their hardware.
    """
    c = grpo_tiny()
    c.workdir = "/tmp/opera_grpo"
    c.model.hf_dir = hf_dir      # architecture, tokenizer and (without init) weights
    c.model.preset = ""          # only when hf_dir is "": random weights (benchmarks)
    c.model.dtype = "bfloat16"   # compute; old log-probs are then recomputed (see grpo.py)
    c.model.remat = True
    c.data.path = "/data/opera/rl_prompts.jsonl"
    c.data.write_toy_rows = 0
    c.data.num_threads = 4
    c.rollout.n = 16             # published G
    c.reward.min_bucket = 256
    c.reward.buckets_per_octave = 4  # ≤ 25 % padding, few compiles as lengths drift
    c.grpo.num_minibatches = 8   # published: 8 updates per RL step, 1 PPO epoch
    c.grpo.chunk_size = 1024
    c.grpo.steps = 200
    c.validation.every = 10
    c.validation.path = "/data/opera/val_prompts.jsonl"
    c.validation.num_prompts = 64
    c.validation.n = 4
    c.optim.lr = 1e-6
    c.optim.schedule = "constant"
    c.optim.warmup_frac = 0.4
    c.checkpoint.every = 10
    c.checkpoint.keep = 3
    return c
