"""SFT of the tiny preset on the embedded toy domain's traces: the CPU smoke run (seconds).

    python -m opera_jax.train --config=configs/sft_tiny.py --config.sft.steps=20

Reads `data.path` = "toy:sft:256" (256 generated toy rows, in the synthesis output format;
opera_jax/data/sources.py). Outputs go to `workdir`: metrics.jsonl, tb/ (TensorBoard) and
checkpoints/. Rerunning the same command resumes from the newest checkpoint; use a new
`--config.workdir` for a fresh run. Real runs name a checkpoint and the synthesis output:

    python -m opera_jax.train --config=configs/sft_tiny.py \\
        --config.model.hf_dir=/ckpt/Qwen3-8B --config.model.preset=None \\
        --config.data.path=/runs/synth/records.jsonl --config.workdir=/runs/sft_8b

Every key is documented in opera_jax/config/sections.py.
"""

from opera_jax.config.setups import sft_tiny


def get_config():
    return sft_tiny()
