"""The synthesis stage: prompt rows in, resumable records and a summary out.

    summary = synthesize(run)    # a SynthRun; config/sections.py documents every key

Reads top to bottom: setup → data → resume → teacher → loop → summary. Records are written
as soon as each prompt has its answer (records.py) to `workdir/records.jsonl`, so a kill loses
only the prompts in flight and a rerun continues where the file ends; SIGTERM stops after the
current round and raises `checkpoint.Preempted`. Prompts longer than `synth.max_prompt_len`
tokens (wrapped and templated) are skipped with a count, so one huge row cannot size the
cache. Each record:

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
from tqdm.auto import tqdm

from opera_jax.checkpoint import Preempted, catch_sigterm
from opera_jax.config import build
from opera_jax.config.runs import SynthRun
from opera_jax.data.jsonl import write_jsonl
from opera_jax.data.sources import open_rows
from opera_jax.locks import WorkdirLock
from opera_jax.sampling import Sampler
from opera_jax.synth.job import Job, PhaseEvent
from opera_jax.synth.records import RecordWriter, config_hash, read_records
from opera_jax.synth.scheduler import Counters, Scheduler
from opera_jax.synth.wrapper import wrap_prompt
from opera_jax.tokenizer import encode_prompt

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("id", "prompt", "reference")
RECORDS = "records.jsonl"


class _Interrupted(Exception):
    """`stop_after` records were written (a simulated kill)."""


def records_path(run: SynthRun) -> str:
    return os.path.join(os.path.abspath(run.workdir), RECORDS)


def teacher_name(run: SynthRun) -> str:
    return (run.synth.teacher_name or run.model.hf_dir
            or f"preset:{run.model.preset}@{run.model.init_seed}")


def read_prompts(run: SynthRun, tokenizer) -> tuple[list[dict], int, int]:
    """(prompt rows to synthesise, rows skipped as bad or duplicate, rows skipped as longer
    than `synth.max_prompt_len`)."""
    rows = open_rows(run.data.path, required=PROMPT_FIELDS, on_bad_row=run.data.on_bad_row,
                     seed=run.data.seed, tfds_data_dir=run.data.tfds_data_dir)
    unique, seen, long = [], set(), 0
    for row in rows:
        row = {k: v for k, v in row.items() if k != "_source"}
        if str(row["id"]) in seen:
            log.warning("%s: duplicate id %r; skipping the row", run.data.path, row["id"])
            continue
        seen.add(str(row["id"]))
        context = encode_prompt(tokenizer, wrap_prompt(row["prompt"]),
                                special_tokens_in_text=run.data.special_tokens_in_text)
        if len(context) > run.synth.max_prompt_len:
            long += 1
            if long <= 3:
                log.warning("%s: prompt %r is longer than synth.max_prompt_len=%d tokens; "
                            "skipped", run.data.path, row["id"], run.synth.max_prompt_len)
            continue
        unique.append(row)
    if long:
        log.warning("%s: %d prompts longer than synth.max_prompt_len=%d tokens skipped",
                    run.data.path, long, run.synth.max_prompt_len)
    # bad rows (skipped by the reader) and duplicate ids
    return unique, getattr(rows, "bad", 0) + len(rows) - len(unique) - long, long


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def synthesize(run: SynthRun, *, teacher=None, stop_after: int | None = None,
               on_event: Callable[[PhaseEvent], None] | None = None) -> dict:
    """Runs (or resumes) guiding-word synthesis.

    Args:
      run: the typed config; `model` is the teacher.
      teacher: optional (model, tokenizer) already in memory; default: built from `run.model`
        on the `mesh` section's devices.
      stop_after: stop once this many new records are written, dropping the prompts in
        flight, as a kill would (for tests).
      on_event: called with every phase's `PhaseEvent` (tracing, tests).
    Returns:
      The summary: counts, reflections, lengths, throughput (also logged and written to
      `workdir/records.jsonl.summary.json`).
    Raises:
      Preempted: SIGTERM arrived; the records written so far are kept.
    """
    if not isinstance(run, SynthRun):
        raise TypeError(f"synthesize needs a SynthRun; got a {type(run).__name__}")
    if jax.process_count() > 1:
        # Every process would append the same records to one file.
        raise NotImplementedError("synthesis runs in one process (one host, any number of its "
                                  "devices); run it on one host or split the prompt file")
    with WorkdirLock(run.workdir, what="synthesis workdir"), catch_sigterm():
        return _synthesize(run, teacher, stop_after, on_event)


def _synthesize(run: SynthRun, teacher, stop_after, on_event) -> dict:
    # ---- setup ----
    output = records_path(run)
    fingerprint, name = config_hash(run.model, run.synth), teacher_name(run)
    tokenizer = teacher[1] if teacher is not None else build.load_model_tokenizer(run.model)

    # ---- data ----
    rows, skipped, too_long = read_prompts(run, tokenizer)

    # ---- resume ----
    existing = read_records(output)
    other = {r.get("config_hash") for r in existing} - {fingerprint}
    if other:
        raise ValueError(f"{output} holds records of config hash {sorted(other)}, this "
                         f"config has {fingerprint}: use a new workdir")
    done = {str(r["id"]) for r in existing}
    todo = [r for r in rows if str(r["id"]) not in done]
    log.info("%d prompts, %d already in %s, %d skipped rows", len(rows), len(rows) - len(todo),
             output, skipped + too_long)

    # ---- teacher (not loaded when nothing is left to do) ----
    scheduler = None
    if todo:
        mesh = build.make_mesh(run.mesh)
        model, tokenizer = teacher if teacher is not None else build.load_model(run.model, mesh)
        sampler = Sampler.for_tokenizer(model, tokenizer, mesh=mesh)
        scheduler = Scheduler(sampler, tokenizer, run.synth,
                              special_tokens_in_text=run.data.special_tokens_in_text)

    # ---- loop ----
    written: list[dict] = []
    finished = True
    start = time.perf_counter()
    with RecordWriter(output) as writer, tqdm(total=len(todo), unit="prompt",
                                              disable=not run.synth.progress) as bar:

        def on_done(job: Job) -> None:
            record = {**job.record(), "teacher": name, "config_hash": fingerprint}
            writer.write(record)  # flushed and fsynced: a kill after this keeps it
            written.append(record)
            bar.update(1)
            if stop_after is not None and len(written) >= stop_after:
                raise _Interrupted

        try:
            if scheduler is not None:
                finished = scheduler.run(todo, on_done=on_done, on_event=on_event)
        except _Interrupted:
            log.warning("stopped after %d records (stop_after)", len(written))
    seconds = time.perf_counter() - start

    # ---- summary ----
    summary = {
        "output": output, "config_hash": fingerprint, "teacher": name,
        "input_rows": len(rows) + skipped + too_long, "skipped_rows": skipped,
        "skipped_long_prompts": too_long, "already_done": len(rows) - len(todo),
        "written": len(written), "remaining": len(todo) - len(written),
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
    write_jsonl(output + ".summary.json", [summary])
    log.info("synthesis summary: %s", summary)
    if not finished:
        raise Preempted(f"synthesis stopped on SIGTERM after {len(written)} new records "
                        f"({summary['remaining']} left); rerun to resume")
    return summary
