"""Cold-start synthesis (docs/METHOD.md §4) with a tiny random teacher on toy prompts.

    python -m opera_jax.train --config=configs/synth_tiny.py

Reads `data.path` = "toy:prompts:32" and appends one record per prompt to
`workdir`/records.jsonl (the run's summary to records.jsonl.summary.json). Rerunning the same
command resumes: prompts already written are skipped (a partial last line is dropped). The
teacher is the `model` section: random `preset` weights here, or a checkpoint:

    python -m opera_jax.train --config=configs/synth_tiny.py \\
      --config.model.hf_dir=/ckpt/Qwen3-32B --config.model.preset=None \\
      --config.model.dtype=bfloat16 --config.data.path=/data/prompts.jsonl \\
      --config.workdir=/runs/synth --config.synth.max_thinking_tokens=8192 \\
      --config.synth.max_answer_tokens=4096 --config.synth.max_phase_tokens=1024 \\
      --config.synth.max_candidate_tokens=1024 --config.synth.max_prompt_len=6144

The sequential baseline (one prompt and one candidate per sampler call, as published):
`--config.synth.batch_prompts=1 --config.synth.batch_candidates=False`. Every key is
documented in opera_jax/config/sections.py.
"""

from opera_jax.config.setups import synth_tiny


def get_config():
    return synth_tiny()
