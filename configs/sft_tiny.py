"""SFT of the tiny preset on the embedded toy domain: the CPU smoke run (well under a minute).

    python -m opera_jax.train.sft --config=configs/sft_tiny.py --config.sft.steps=20

Writes `data.write_toy_rows` rows of the toy domain (opera_jax/data/toy_domain.py, in the
synthesis output format) to `data.path` first when that file does not exist. Outputs go to
`workdir`: metrics.jsonl, tb/ (TensorBoard) and checkpoints/. Rerunning the same command resumes
from the newest checkpoint; use a new `--config.workdir` for a fresh run. Real runs set `model.hf_dir` to a Qwen3 checkpoint and
`data.path` to the synthesis output (`write_toy_rows=0`).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "sft"
    c.workdir = "/tmp/opera_sft_tiny"
    c.seed = 0  # the train state's RNG

    c.model = ml_collections.ConfigDict()
    c.model.hf_dir = ""          # a local HF Qwen3 directory; "" = random `preset` weights
    c.model.preset = "tiny"
    c.model.init_seed = 0
    c.model.dtype = "bfloat16"   # compute
    c.model.param_dtype = "float32"  # master weights and optimizer moments
    c.model.remat = False
    c.model.attention_impl = ""  # "" = platform default; xla | cudnn | splash

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1             # -1 = all remaining devices
    c.mesh.tensor = 1
    c.mesh.num_devices = -1      # use the first n devices; -1 = all

    c.data = ml_collections.ConfigDict()
    # JSONL or *.array_record files (python -m opera_jax.data.records); globs, comma-separated
    c.data.path = "/tmp/opera_sft_tiny/toy.jsonl"
    c.data.write_toy_rows = 256  # write the toy set to `path` when missing (0: never)
    c.data.on_bad_row = "skip"   # skip (warn with file:line) | raise
    c.data.seed = 0              # shuffle seed; every epoch reshuffles
    c.data.seq_len = 256         # T
    c.data.packing = True
    c.data.overlong = "drop"     # drop | truncate examples longer than seq_len
    c.data.enable_thinking = True
    c.data.num_threads = 2       # tokenising threads ahead of the loop

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

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 10      # and always at the last step
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True
    return c
