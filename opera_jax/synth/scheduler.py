"""Batched synthesis: many prompts in flight, all their candidates in shared sampler calls.

A host-level scheduler over rounds of sampler calls; each round advances every in-flight
prompt by one phase (job.py):

  1. top the in-flight set up to `batch_prompts` from the queue (finished prompts have left,
     so a prompt with a long thinking holds back only the rounds it is in, never a batch);
  2. collect every job's next request and group the rows into sampler calls by stop list and
     samples per prompt: REFLECT (guiding words + </think>, n = B: one prefill of the context,
     B candidates), THINK (the same stops, n = 1), FINISH (</think>) and ANSWER (EOS only);
     at most four calls per round, each split into `rows_per_call` chunks when set. Every row
     draws from its own seed, so nothing depends on which other rows share a call;
  3. hand each job its completions (and, for REFLECT, its context log-probs); emit the jobs
     that finished.

`batch_candidates=False` puts candidate j of every reflecting prompt in its own call; with
`batch_prompts=1` that is the published procedure, one prompt at a time and one candidate at
a time (the baseline of benchmarks/bench_synth_cpu.py). Both modes give the same records.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterable

from opera_jax.sampling import Sampler
from opera_jax.sampling.generate import completions
from opera_jax.checkpoint import sigterm_received
from opera_jax.config.sections import Synth
from opera_jax.synth.job import Job, Phase, PhaseEvent, Request, StopSet
from opera_jax.synth.wrapper import stop_strings
from opera_jax.tokenizer import THINK_CLOSE


@dataclasses.dataclass
class Counters:
    """Work done, for the summary and the benchmark."""

    rounds: int = 0
    sampler_calls: int = 0
    rows: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0  # context tokens prefilled (unpadded; a REFLECT's once)
    # Decode-loop iterations run (each call runs until its longest row): the time of a device
    # whose decode step costs the same for 1 or many rows.
    decode_steps: int = 0


class Scheduler:
    """Runs prompt rows through synthesis on one `Sampler` holding the teacher.

    Args:
      sampler: built with the teacher's token pieces and EOS ids.
      tokenizer: the teacher's tokenizer.
      settings: the `synth` section: the knobs that shape a record, and how requests share
        calls (`batch_prompts`, `batch_candidates`, `rows_per_call`, `compact`).
    """

    def __init__(self, sampler: Sampler, tokenizer, settings: Synth, *,
                 special_tokens_in_text: bool = False):
        self.sampler, self.tokenizer = sampler, tokenizer
        self.settings = self.batching = settings
        self.special_tokens_in_text = special_tokens_in_text
        self.stops = {StopSet.GUIDED: stop_strings(settings.guiding_words),
                      StopSet.CLOSE: (THINK_CLOSE,), StopSet.NONE: ()}
        self.counters = Counters()

    def run(self, rows: Iterable[dict], *, on_done: Callable[[Job], None],
            on_event: Callable[[PhaseEvent], None] | None = None) -> bool:
        """Synthesises every row; `on_done(job)` runs as soon as a job has its answer.

        Returns:
          False when SIGTERM arrived (inside `checkpoint.catch_sigterm`): it stops after the
          current round; the prompts in flight are dropped and redone by a rerun.
        """
        queue, active = collections.deque(rows), []
        while queue or active:
            if sigterm_received():
                return False
            while queue and len(active) < self.batching.batch_prompts:
                active.append(Job(queue.popleft(), self.tokenizer, self.settings,
                                  special_tokens_in_text=self.special_tokens_in_text))
            for event in self.step(active):
                if on_event is not None:
                    on_event(event)
            for job in active:
                if job.done:
                    on_done(job)
            active = [job for job in active if not job.done]
        return True

    def step(self, jobs: list[Job]) -> list[PhaseEvent]:
        """One round: every job advances by one phase."""
        self.counters.rounds += 1
        requests = [job.request() for job in jobs]
        # Calls keyed by (stop list, samples per prompt, part); entries are (job, its rows).
        calls: dict[tuple[StopSet, int, int], list[tuple[int, list[int]]]] = {}
        for i, req in enumerate(requests):
            if req.phase is Phase.REFLECT and self.batching.batch_candidates:
                calls.setdefault((req.stop_set, req.rows, 0), []).append((i, list(range(
                    req.rows))))
            else:  # one row per prompt; unbatched candidate j goes to call part j
                for j in range(req.rows):
                    calls.setdefault((req.stop_set, 1, j), []).append((i, [j]))
        results = [[None] * req.rows for req in requests]
        context_lps = [[None] * req.rows for req in requests]
        for (stop_set, n, _), entries in calls.items():
            # Similar context lengths share a chunk: less prompt padding and a shorter cache.
            entries.sort(key=lambda e: len(requests[e[0]].context))
            per_call = (len(entries) if self.batching.rows_per_call is None
                        else max(1, self.batching.rows_per_call // n))
            for lo in range(0, len(entries), per_call):
                self._call(stop_set, n, entries[lo:lo + per_call], requests, results,
                           context_lps)
        return [job.advance(req, results[i],
                            context_lps[i] if req.phase is Phase.REFLECT else None)
                for i, (job, req) in enumerate(zip(jobs, requests))]

    def _call(self, stop_set: StopSet, n: int, entries: list[tuple[int, list[int]]],
              requests: list[Request], results: list, context_lps: list) -> None:
        """One sampler call: entry (job index, rows) is one prompt with n = len(rows) samples
        (a REFLECT's B candidates share one prefill); fills results in place."""
        s, stop = self.settings, self.stops[stop_set]
        reqs = [requests[i] for i, _ in entries]
        scored = any(r.phase is Phase.REFLECT for r in reqs)
        samples = self.sampler.sample(
            [r.context for r in reqs], max_new_tokens=[r.max_new_tokens for r in reqs],
            temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or 0, n=n, stop=stop,
            seed=s.seed, prompt_logprobs=scored,
            row_seeds=[requests[i].seeds[j] for i, rows in entries for j in rows],
            compact=self.batching.compact, slots=self.batching.sampler_slots())
        outs = completions(samples, self.sampler.table, stop, self.sampler.eos_ids)
        for e, (i, rows) in enumerate(entries):
            for k, j in enumerate(rows):
                results[i][j] = outs[e * n + k]
                if scored:
                    context_lps[i][j] = samples.prompt_logprobs[e]
        self.counters.sampler_calls += 1
        self.counters.rows += len(outs)
        self.counters.generated_tokens += int(samples.lengths.sum())
        self.counters.prefill_tokens += sum(len(r.context) for r in reqs)
        self.counters.decode_steps += int(samples.lengths.max())
