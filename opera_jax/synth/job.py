"""One prompt's way through guiding-word synthesis (docs/METHOD.md §4): a host state machine.

    THINK ──guiding word──▶ REFLECT ──kept candidate cut at a blank line──▶ THINK
      │                       └──kept candidate ends at a guiding word──▶ REFLECT
      │  after `max_states` reflective states, a guiding word leads to FINISH instead
      └──</think>, EOS or the thinking budget──▶ ANSWER ──EOS / length──▶ DONE
    FINISH (stops at </think> only) ──▶ ANSWER

Every phase is one `Request` (context tokens, rows, stop list, token cap, per-row seeds) and
one `advance` with those rows' completions; `scheduler.py` batches the requests of many jobs
into shared sampler calls.

Contexts. Thinking phases continue chat(wrap_prompt(prompt)) + "<think>\\n" + thinking so far;
the answer continues chat(prompt) + "<think>\\n{thinking}\\n</think>" + `after_think` ("\\n\\n" by
default, the published "\\n" by choice), with the unwrapped prompt. The knobs are the `synth`
config section (`config.sections.Synth`).
A reflective state is a context that ends with a guiding word (the stop string is kept).

Perplexity of a candidate: exp(−mean log p) over every token after the first of
context + candidate, at temperature 1: the sampler's prompt log-probs for the context, its
sampled-token log-probs for the candidate (all generated tokens, through the stop-completing
token or EOS). The lowest wins; its text is cut after its first paragraph (the blank line kept) and
appended.

Randomness. Row j of the k-th request of prompt `id` draws from a seed derived from
(seed, id, k, j) (`row_seed`), so a prompt's result does not depend on which other prompts share
a sampler call, or on whether candidates are sampled together or one by one.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
from typing import Sequence

import numpy as np

from opera_jax.sampling import Completion, FinishReason
from opera_jax.config.sections import Synth
from opera_jax.synth.wrapper import first_paragraph, wrap_prompt
from opera_jax.tokenizer import THINK_CLOSE, THINK_OPEN, encode, encode_prompt


class Phase(enum.Enum):
    THINK = "think"      # thinking until a guiding word, </think> or EOS
    REFLECT = "reflect"  # B candidates at a reflective state; the lowest perplexity is kept
    FINISH = "finish"    # reflective states are used up: thinking until </think>
    ANSWER = "answer"    # the final answer, until EOS
    DONE = "done"


class StopSet(enum.Enum):
    """The stop strings of a sampler call (one list per call)."""

    GUIDED = "guided"  # guiding words (bare, after "\n", after ". ") and </think>
    CLOSE = "close"    # </think>
    NONE = "none"      # EOS only


@dataclasses.dataclass(frozen=True)
class Request:
    """What a job needs from the sampler next: `rows` samples of `context`."""

    phase: Phase
    context: list[int]
    rows: int
    stop_set: StopSet
    max_new_tokens: int
    seeds: list[int]  # one per row


@dataclasses.dataclass(frozen=True)
class PhaseEvent:
    """What one phase did (for tracing and tests)."""

    job_id: str
    phase: Phase
    state: int                       # reflective states completed before this phase
    context: list[int]
    completions: list[Completion]
    ppls: list[float] | None = None  # REFLECT: each candidate's perplexity
    chosen: int | None = None        # REFLECT: index of the kept candidate


def row_seed(seed: int, job_id: str, call: int, row: int) -> int:
    """A 31-bit sampler row seed from (config seed, prompt id, request index, row)."""
    digest = hashlib.blake2b(f"{seed}\x00{job_id}\x00{call}\x00{row}".encode(),
                             digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def perplexity(context_logprobs: Sequence[float], candidate_logprobs: Sequence[float]) -> float:
    """exp(−mean) over the context's scored tokens and the candidate's tokens (float64 sum)."""
    count = len(context_logprobs) + len(candidate_logprobs)
    total = math.fsum(map(float, context_logprobs)) + math.fsum(map(float, candidate_logprobs))
    return math.exp(-total / count)


class Job:
    """One prompt row (`id`, `prompt`, `reference`, optional `task_type`) in synthesis."""

    def __init__(self, row: dict, tokenizer, settings: Synth, *,
                 special_tokens_in_text: bool = False):
        self.row, self.tokenizer, self.settings = row, tokenizer, settings
        self.id = str(row["id"])
        # The prompt is data: special-token strings in it stay plain text (tokenizer.py).
        self.think_head = (encode_prompt(tokenizer, wrap_prompt(row["prompt"]),
                                         special_tokens_in_text=special_tokens_in_text)
                           + encode(tokenizer, THINK_OPEN + "\n"))
        self.answer_head = encode_prompt(tokenizer, row["prompt"],
                                         special_tokens_in_text=special_tokens_in_text)
        self.phase = Phase.THINK
        self.thinking = ""
        self.calls = 0       # requests answered so far (seeds the next one)
        self.tokens = 0      # thinking tokens generated on the kept path
        self.chosen_ppls: list[float] = []
        self.rejected_ppls: list[list[float]] = []
        self.think_end = ""  # close | eos | budget
        self.output = ""
        self.answer_finish = ""

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    def answer_context(self) -> list[int]:
        return self.answer_head + encode(
            self.tokenizer, f"{THINK_OPEN}\n{self.thinking.strip()}\n{THINK_CLOSE}"
                            f"{self.settings.after_think}")

    def request(self) -> Request:
        """The next sampler request (does not change the job)."""
        s, phase = self.settings, self.phase
        left = s.max_thinking_tokens - self.tokens
        thinking = self.think_head + encode(self.tokenizer, self.thinking)
        if phase is Phase.ANSWER:
            ids, rows, stop, cap = self.answer_context(), 1, StopSet.NONE, s.max_answer_tokens
        elif phase is Phase.REFLECT:
            ids, rows, stop = thinking, s.num_candidates, StopSet.GUIDED
            cap = min(s.max_candidate_tokens, left)
        elif phase in (Phase.THINK, Phase.FINISH):
            ids, rows = thinking, 1
            stop = StopSet.GUIDED if phase is Phase.THINK else StopSet.CLOSE
            cap = min(s.max_phase_tokens, left)
        else:
            raise ValueError(f"job {self.id} is done")
        seeds = [row_seed(s.seed, self.id, self.calls, j) for j in range(rows)]
        return Request(phase, ids, rows, stop, cap, seeds)

    def advance(self, request: Request, completions: Sequence[Completion],
                context_logprobs: Sequence[np.ndarray] | None = None) -> PhaseEvent:
        """Applies the completions of `request` (row order) and moves to the next phase.

        Args:
          context_logprobs: REFLECT only, per row: log p(context[j] | context[:j]), j >= 1.
        """
        phase, state = self.phase, len(self.chosen_ppls)
        self.calls += 1
        ppls, chosen = None, None
        if phase is Phase.ANSWER:
            c = completions[0]
            self.output, self.answer_finish = c.text.strip(), c.finish_reason.name.lower()
            self.phase = Phase.DONE
        elif phase is Phase.REFLECT:
            ppls = [perplexity(lp, c.logprobs) for lp, c in
                    zip(context_logprobs, completions, strict=True)]
            chosen = int(np.argmin(ppls))
            self.chosen_ppls.append(ppls[chosen])
            self.rejected_ppls.append([p for i, p in enumerate(ppls) if i != chosen])
            c = completions[chosen]
            self.tokens += len(c.token_ids)
            kept = first_paragraph(c.text)
            if len(kept) < len(c.text):  # cut at a blank line: the teacher goes on thinking
                self.thinking += kept
                self.phase = Phase.THINK
            else:
                self._continue(c)
        else:  # THINK, FINISH
            c = completions[0]
            self.tokens += len(c.token_ids)
            self._continue(c)
        if self.phase in (Phase.THINK, Phase.REFLECT, Phase.FINISH) and (
                self.tokens >= self.settings.max_thinking_tokens):
            self.think_end, self.phase = "budget", Phase.ANSWER
        return PhaseEvent(self.id, phase, state, request.context, list(completions), ppls,
                          chosen)

    def _continue(self, c: Completion) -> None:
        """Appends a whole thinking completion and picks the phase its ending calls for."""
        if c.finish_reason is FinishReason.STOP and c.stop == THINK_CLOSE:
            self.thinking += c.text[:c.stop_offset]
            self.think_end, self.phase = "close", Phase.ANSWER
        elif c.finish_reason is FinishReason.EOS:  # the turn ended without </think>
            self.thinking += c.text
            self.think_end, self.phase = "eos", Phase.ANSWER
        elif c.finish_reason is FinishReason.STOP:  # a guiding word: a reflective state
            self.thinking += c.text
            capped = len(self.chosen_ppls) >= self.settings.max_states
            self.phase = Phase.FINISH if capped else Phase.REFLECT
        else:  # LENGTH: the same kind of phase goes on
            self.thinking += c.text
            self.phase = Phase.FINISH if self.phase is Phase.FINISH else Phase.THINK

    def record(self) -> dict:
        """The output record (without `teacher` and `config_hash`, added by the run)."""
        return {"id": self.id, "prompt": self.row["prompt"], "reference": self.row["reference"],
                "task_type": self.row.get("task_type", "writing"),
                "thinking": self.thinking.strip(), "output": self.output,
                "reflection_count": len(self.chosen_ppls), "chosen_ppl": self.chosen_ppls,
                "rejected_ppls": self.rejected_ppls, "think_end": self.think_end,
                "answer_finish": self.answer_finish, "thinking_tokens": self.tokens}
