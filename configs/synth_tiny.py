"""Cold-start synthesis (OPERA method §4) with a tiny teacher on the embedded toy domain.

    python -m opera_jax.synthesize --config=configs/synth_tiny.py

Writes `write_toy_prompts` toy prompt rows (opera_jax/data/toy_domain.py) to `input` when that
file does not exist, then appends one record per prompt to `output` (and the run's summary to
`output`.summary.json). Rerunning the same command resumes: prompts already in `output` are
skipped (a partial last line is dropped). The teacher is random `preset` weights unless
`teacher.hf_dir` names a checkpoint, e.g. the warmed-up toy teacher or a real Qwen3:

    python -m opera_jax.synthesize --config=configs/synth_tiny.py \\
      --config.teacher.hf_dir=/ckpt/Qwen3-32B --config.teacher.dtype=bfloat16 \\
      --config.input=/data/prompts.jsonl --config.write_toy_prompts=0 \\
      --config.output=/data/synth.jsonl --config.mesh.num_devices=-1 \\
      --config.synth.max_thinking_tokens=8192 --config.synth.max_answer_tokens=4096 \\
      --config.synth.max_phase_tokens=1024 --config.synth.max_candidate_tokens=1024

The sequential baseline (one prompt and one candidate per sampler call, as published):
`--config.synth.batch_prompts=1 --config.synth.batch_candidates=False`. Every key is documented
in opera_jax/synth/config.py.
"""

from opera_jax.synth.config import synth_tiny


def get_config():
    return synth_tiny()
