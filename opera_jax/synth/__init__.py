"""Cold-start synthesis (OPERA method §4): guiding-word thinking with perplexity-prioritised
branches, many prompts and all their candidates batched into shared sampler calls.

Layers, bottom up: `wrapper` (the instruction wrapper, stop strings, paragraphs), `job` (one
prompt's state machine), `scheduler` (rounds of batched sampler calls), `records` (resumable
JSONL output, config hash), `stage` (`synthesize(config) -> summary`).

    python -m opera_jax.synthesize --config=configs/synth_tiny.py
"""

from opera_jax.synth.job import Job, Phase, PhaseEvent, Settings, perplexity, row_seed
from opera_jax.synth.records import RecordWriter, config_hash, read_records
from opera_jax.synth.scheduler import Batching, Scheduler
from opera_jax.synth.stage import load_teacher, make_sampler, synthesize
from opera_jax.synth.wrapper import GUIDING_WORDS, first_paragraph, stop_strings, wrap_prompt

__all__ = ["Batching", "GUIDING_WORDS", "Job", "Phase", "PhaseEvent", "RecordWriter",
           "Scheduler", "Settings", "config_hash", "first_paragraph", "load_teacher",
           "make_sampler", "perplexity", "read_records", "row_seed", "stop_strings",
           "synthesize", "wrap_prompt"]
