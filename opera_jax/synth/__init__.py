"""Cold-start synthesis (docs/METHOD.md §4): guiding-word thinking with perplexity-prioritised
branches, many prompts and all their candidates batched into shared sampler calls.

Layers, bottom up: `wrapper` (the instruction wrapper, stop strings, paragraphs), `job` (one
prompt's state machine), `scheduler` (rounds of batched sampler calls), `records` (resumable
JSONL output, config hash), `stage` (`synthesize(config) -> summary`).

    python -m opera_jax.train --config=configs/synth_tiny.py
"""

from opera_jax.synth.job import Job, Phase, PhaseEvent, perplexity, row_seed
from opera_jax.synth.records import RecordWriter, config_hash, read_records
from opera_jax.synth.scheduler import Scheduler
from opera_jax.synth.stage import records_path, synthesize
from opera_jax.synth.wrapper import first_paragraph, stop_strings, wrap_prompt

__all__ = ["Job", "Phase", "PhaseEvent", "RecordWriter", "Scheduler", "config_hash",
           "first_paragraph", "perplexity", "read_records", "records_path", "row_seed",
           "stop_strings", "synthesize", "wrap_prompt"]
