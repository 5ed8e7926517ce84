"""The synthesis stage: a prompt JSONL in, resumable records and a summary out.

    summary = synthesize(config)    # opera_jax/synth/config.py documents every key

Reads top to bottom: setup → data → resume → teacher → loop → summary. Records are written
as soon as each prompt has its answer (records.py), so a kill loses only the prompts in flight
and a rerun continues where the file ends. Each record:

    id, prompt, reference, task_type, thinking, output, reflection_count,
    chosen_ppl [per reflective state], rejected_ppls [per state, B-1 each],
    think_end (close | eos | budget), answer_finish (eos | length), thinking_tokens,
    teacher, config_hash
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from typing import Callable

import jax
import ml_collections
from tqdm.auto import tqdm

from opera_jax import sharding as sh
from opera_jax.data import toy_domain
from opera_jax.data.jsonl import read_jsonl, write_jsonl
from opera_jax.model import build
from opera_jax.model.config import Qwen3Config
from opera_jax.model.hf_io import load_pretrained
from opera_jax.sampling import Sampler, default_eos_ids, token_bytes
from opera_jax.synth.job import Job, PhaseEvent, Settings
from opera_jax.synth.records import RecordWriter, config_hash, read_records
from opera_jax.synth.scheduler import Batching, Counters, Scheduler
from opera_jax.tokenizer import load_tokenizer, special_token_ids

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("id", "prompt", "reference")


class _Interrupted(Exception):
    """`stop_after` records were written (a simulated kill)."""


def settings_from(config: ml_collections.ConfigDict) -> tuple[Settings, Batching]:
    s = config.synth
    settings = Settings(
        guiding_words=tuple(s.guiding_words), num_candidates=s.num_candidates,
        max_states=s.max_states, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        max_phase_tokens=s.max_phase_tokens, max_candidate_tokens=s.max_candidate_tokens,
        max_thinking_tokens=s.max_thinking_tokens, max_answer_tokens=s.max_answer_tokens,
        seed=s.seed, after_think=s.after_think)
    return settings, Batching(batch_prompts=s.batch_prompts,
                              batch_candidates=s.batch_candidates,
                              rows_per_call=s.rows_per_call, compact=s.compact)


def teacher_name(teacher: ml_collections.ConfigDict) -> str:
    return (teacher.name or teacher.hf_dir
            or f"preset:{teacher.preset}@{teacher.init_seed}")


def make_mesh(config: ml_collections.ConfigDict):
    """The `mesh` section's mesh; None for one device (`num_devices` 1)."""
    n = config.mesh.num_devices
    if n == 1:
        return None
    return sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                        devices=jax.devices() if n < 0 else jax.devices()[:n])


def load_teacher(config: ml_collections.ConfigDict, mesh=None):
    """(model, tokenizer) from the `teacher` section: a HF directory or preset + seed."""
    t = config.teacher
    kwargs = dict(dtype=t.dtype, param_dtype=t.param_dtype or None,
                  attention_impl=t.attention_impl or None)
    if t.hf_dir:
        return load_pretrained(t.hf_dir, mesh=mesh, **kwargs)
    model = build.init_model(Qwen3Config.preset(t.preset), mesh=mesh, seed=t.init_seed,
                             **kwargs)
    return model, load_tokenizer(None)


def make_sampler(model, tokenizer, mesh=None) -> Sampler:
    pad = special_token_ids(tokenizer)["pad"]
    return Sampler(model, token_pieces=token_bytes(tokenizer, model.config.vocab_size),
                   eos_ids=default_eos_ids(tokenizer), pad_id=pad or 0, mesh=mesh)


def read_prompts(config: ml_collections.ConfigDict) -> tuple[list[dict], int]:
    """(valid prompt rows with unique ids, count of skipped rows); bad rows name their line."""
    path = config.input
    if config.write_toy_prompts and not os.path.exists(path):
        write_jsonl(path, toy_domain.prompt_rows(config.write_toy_prompts, seed=0))
    with open(path, encoding="utf-8") as f:
        lines = sum(1 for line in f if line.strip())
    rows = read_jsonl(path, required=PROMPT_FIELDS, on_error=config.on_bad_row)
    unique, seen = [], set()
    for row in rows:
        if row["id"] in seen:
            log.warning("%s: duplicate id %r; skipping the row", row["_source"], row["id"])
            continue
        seen.add(row["id"])
        unique.append(row)
    return unique, lines - len(unique)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def synthesize(config: ml_collections.ConfigDict, *, teacher=None, stop_after: int | None = None,
               on_event: Callable[[PhaseEvent], None] | None = None) -> dict:
    """Runs (or resumes) guiding-word synthesis as configured.

    Args:
      config: see opera_jax/synth/config.py for every key.
      teacher: optional (model, tokenizer) already in memory; default `load_teacher(config)`
        (on the `mesh` section's devices; the sampler puts an in-memory teacher there too).
      stop_after: stop once this many new records are written, dropping the prompts in
        flight, as a kill would (for tests).
      on_event: called with every phase's `PhaseEvent` (tracing, tests).
    Returns:
      The summary: counts, reflections, lengths, throughput (also logged and written to
      `<output>.summary.json`).
    """
    # ---- setup ----
    if config.get("stage", "synth") != "synth":
        raise ValueError(f"config.stage is {config.stage!r}; this stage runs 'synth'")
    if jax.process_count() > 1:
        # Every process would append the same records to one file.
        raise NotImplementedError("synthesis runs in one process (one host, any number of its "
                                  "devices); run it on one host or split the prompt file")
    settings, batching = settings_from(config)
    fingerprint, name = config_hash(config), teacher_name(config.teacher)

    # ---- data ----
    rows, skipped = read_prompts(config)

    # ---- resume ----
    existing = read_records(config.output)
    other = {r.get("config_hash") for r in existing} - {fingerprint}
    if other:
        raise ValueError(f"{config.output} holds records of config hash {sorted(other)}, this "
                         f"config has {fingerprint}: use a new output path")
    done = {str(r["id"]) for r in existing}
    todo = [r for r in rows if str(r["id"]) not in done]
    log.info("%d prompts, %d already in %s, %d skipped rows", len(rows), len(rows) - len(todo),
             config.output, skipped)

    # ---- teacher (not loaded when nothing is left to do) ----
    scheduler = None
    if todo:
        mesh = make_mesh(config)
        model, tokenizer = teacher if teacher is not None else load_teacher(config, mesh)
        scheduler = Scheduler(make_sampler(model, tokenizer, mesh), tokenizer, settings,
                              batching)

    # ---- loop ----
    written: list[dict] = []
    start = time.perf_counter()
    with RecordWriter(config.output) as writer, tqdm(
            total=len(todo), unit="prompt", disable=not config.get("progress", True)) as bar:

        def on_done(job: Job) -> None:
            record = {**job.record(), "teacher": name, "config_hash": fingerprint}
            writer.write(record)  # flushed and fsynced: a kill after this keeps it
            written.append(record)
            bar.update(1)
            if stop_after is not None and len(written) >= stop_after:
                raise _Interrupted

        try:
            if scheduler is not None:
                scheduler.run(({k: v for k, v in r.items() if k != "_source"} for r in todo),
                              on_done=on_done, on_event=on_event)
        except _Interrupted:
            log.warning("stopped after %d records (stop_after)", len(written))
    seconds = time.perf_counter() - start

    # ---- summary ----
    summary = {
        "output": os.path.abspath(config.output), "config_hash": fingerprint, "teacher": name,
        "input_rows": len(rows), "skipped_rows": skipped,
        "already_done": len(rows) - len(todo), "written": len(written),
        "remaining": len(todo) - len(written),
        "mean_reflections": statistics.fmean([r["reflection_count"] for r in written])
        if written else 0.0,
        "thinking_tokens": _stats([r["thinking_tokens"] for r in written]),
        "thinking_chars": _stats([len(r["thinking"]) for r in written]),
        "output_chars": _stats([len(r["output"]) for r in written]),
        "think_end": {k: sum(r["think_end"] == k for r in written)
                      for k in ("close", "eos", "budget")},
        "seconds": seconds, "prompts_per_s": len(written) / max(seconds, 1e-9),
        **dataclasses.asdict(scheduler.counters if scheduler else Counters()),
    }
    write_jsonl(config.output + ".summary.json", [summary])
    log.info("synthesis summary: %s", summary)
    return summary
