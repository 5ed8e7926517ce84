"""GRPO of the tiny preset on the embedded toy domain: the CPU smoke run (about a minute).

    python -m opera_jax.train --config=configs/grpo_tiny.py

8 prompts × 4 responses of up to 64 tokens per RL step, 2 optimizer updates per step, the OPERA
reward scored by the policy, KL to the frozen initial weights. Reads `data.path` =
"toy:prompts:256" (generated toy prompt rows; any JSONL / ArrayRecord file of prompt,
reference[, task_type] rows works the same); validation uses the toy domain's held-out
prompts. Outputs go to `workdir`: metrics.jsonl, tb/ (TensorBoard), checkpoints/ and
reward_curves.png. Rerunning the same command resumes from the newest checkpoint; use a new
`--config.workdir` for a fresh run.

From random weights the responses are noise (no think blocks, so the reward is the rank term
only). After the tiny SFT run, start from its weights instead (the reference follows):

    python -m opera_jax.train --config=configs/sft_tiny.py
    python -m opera_jax.train --config=configs/grpo_tiny.py \\
        --config.model.checkpoint=/tmp/opera_sft_tiny --config.workdir=/tmp/opera_grpo_from_sft

Every key is documented in opera_jax/config/sections.py.
"""

from opera_jax.config.setups import grpo_tiny


def get_config():
    return grpo_tiny()
