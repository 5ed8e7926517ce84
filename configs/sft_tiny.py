"""SFT of the tiny preset on the embedded toy domain: the CPU smoke run (well under a minute).

    python -m opera_jax.train.sft --config=configs/sft_tiny.py --config.sft.steps=20

Writes `data.write_toy_rows` rows of the toy domain (opera_jax/data/toy_domain.py, in the
synthesis output format) to `data.path` first when that file does not exist. Outputs go to
`workdir`: metrics.jsonl, tb/ (TensorBoard) and checkpoints/. Rerunning the same command resumes
from the newest checkpoint; use a new `--config.workdir` for a fresh run. Real runs set `model.hf_dir` to a Qwen3 checkpoint and
`data.path` to the synthesis output (`write_toy_rows=0`).
"""

from opera_jax.train.configs import sft_tiny


def get_config():
    return sft_tiny()
