"""Prompts → sampler → a token-level GRPO batch (the rollout half of an RL step).

    rows = next(iter(prompt_batches(records, tok, batch_size=8, seed=0, max_prompt_len=64)))
    ro = sample_rollout(sampler, rows, n=4, seq_len=128, max_new_tokens=64, seed=step_seed)
    ro.tokens[r]          # prompt + response of row r (row r = prompt r // n), right-padded
    ro.mask[r, t] == 1    # tokens[t + 1] is a response token: the loss position of it

Layout: every row is [prompt, response, pad…] of one static length T = max_prompt_len +
max_new_tokens, so the update step compiles once. Log-probs are aligned to the position that
predicts the token: entry t is log p(tokens[t + 1] | tokens[..t]). Response tokens include the
EOS the policy wrote (stopping is learnt); a response cut at the length limit is trained as is.
`old_logprobs` are the sampler's (temperature 1, before top-k / top-p), i.e. π_old of the same
distribution the loss differentiates, whatever temperature sampled the token.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from opera_jax.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One RL step's responses on the host; R = prompts · n rows, row r is prompt r // n."""

    tokens: np.ndarray        # int32 [R, T] prompt + response, then pad
    segment_ids: np.ndarray   # int32 [R, T] 1 on prompt and response, 0 on padding
    mask: np.ndarray          # float32 [R, T] 1 where tokens[t + 1] is a response token
    old_logprobs: np.ndarray  # float32 [R, T] sampler log p(tokens[t + 1]) on the mask, else 0
    prompts: list[str]               # per row, the user message (no template)
    prompt_ids: list[np.ndarray]     # per row
    response_ids: list[np.ndarray]   # per row, EOS included when the row ended on it
    reference_ids: list[np.ndarray]  # per row
    task_types: list[str]            # per row
    group_ids: np.ndarray            # int32 [R] prompt index within the step
    finish_reason: np.ndarray        # int32 [R] sampling.FinishReason
    num_samples: int                 # n
    rows: list[dict]                 # per row, the prompt's data row (schema-mapped, as read)

    def take(self, idx) -> "Rollout":
        """The rows `idx` (whole groups, in order), their groups renumbered 0, 1, …"""
        idx = np.asarray(idx, np.int64)
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return dataclasses.replace(
            self, tokens=self.tokens[idx], segment_ids=self.segment_ids[idx],
            mask=self.mask[idx], old_logprobs=self.old_logprobs[idx],
            prompts=pick(self.prompts), prompt_ids=pick(self.prompt_ids),
            response_ids=pick(self.response_ids), reference_ids=pick(self.reference_ids),
            task_types=pick(self.task_types),
            group_ids=np.arange(len(idx), dtype=np.int32) // self.num_samples,
            finish_reason=self.finish_reason[idx], rows=pick(self.rows))


def group_rows(group_ids: np.ndarray, groups) -> np.ndarray:
    """Row indices of `groups`, group by group in the order given."""
    parts = [np.flatnonzero(group_ids == g) for g in groups]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def concat(rollouts: Sequence[Rollout]) -> Rollout:
    """Rollouts of the same step, one after the other, their groups renumbered in order."""
    first = rollouts[0]
    cat = lambda name: np.concatenate([getattr(r, name) for r in rollouts])  # noqa: E731
    join = lambda name: [x for r in rollouts for x in getattr(r, name)]  # noqa: E731
    rows = sum(len(r.response_ids) for r in rollouts)
    return dataclasses.replace(
        first, tokens=cat("tokens"), segment_ids=cat("segment_ids"), mask=cat("mask"),
        old_logprobs=cat("old_logprobs"), prompts=join("prompts"), prompt_ids=join("prompt_ids"),
        response_ids=join("response_ids"), reference_ids=join("reference_ids"),
        task_types=join("task_types"),
        group_ids=np.arange(rows, dtype=np.int32) // first.num_samples,
        finish_reason=cat("finish_reason"), rows=join("rows"))


def sample_rollout(sampler: Sampler, rows: Sequence[dict], *, n: int, seq_len: int,
                   max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int | None = None, seed: int = 0,
                   prompts_per_call: int | None = None,
                   slots: int | str | None = None) -> Rollout:
    """Samples n responses per prompt row and lays them out as a training batch.

    Args:
      sampler: a `Sampler` holding the current policy weights (`set_params`).
      rows: `data.pipeline.TokenizePrompt` dicts.
      n: responses per prompt (G).
      seq_len: T >= longest prompt + max_new_tokens.
      seed: the step's sampling seed (call k of a chunked rollout uses seed + k).
      prompts_per_call: sample this many prompts per sampler call (bounds the KV cache:
        prompts_per_call · n rows); None = all in one call. Ignored with `slots`.
      slots: run the continuous-batching engine with this many slots ("auto": chosen from the
        model and memory), all prompts in one call; None = the fixed-batch sampler.
    Returns:
      `Rollout`.
    """
    prompts = [r["prompt_ids"] for r in rows]
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds "
                         f"seq_len {seq_len}")
    per_call = len(prompts) if slots is not None else (prompts_per_call or len(prompts))
    outs = [sampler.sample([p.tolist() for p in prompts[i:i + per_call]],
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k or 0, n=n, seed=seed + k, slots=slots)
            for k, i in enumerate(range(0, len(prompts), per_call))]
    count = len(prompts) * n
    tokens = np.full((count, seq_len), sampler.pad_id, np.int32)
    segment_ids = np.zeros((count, seq_len), np.int32)
    mask = np.zeros((count, seq_len), np.float32)
    old = np.zeros((count, seq_len), np.float32)
    responses, finish = [], []
    for out in outs:
        for j in range(len(out.lengths)):
            r = len(responses)
            prompt = prompts[r // n]
            p, m = len(prompt), int(out.lengths[j])
            ids, lps = out.row(j)
            tokens[r, :p], tokens[r, p:p + m] = prompt, ids
            segment_ids[r, :p + m] = 1
            mask[r, p - 1:p + m - 1] = 1.0  # position t predicts tokens[t + 1]
            old[r, p - 1:p + m - 1] = lps
            responses.append(np.asarray(ids, np.int32))
            finish.append(int(out.finish_reason[j]))
    return Rollout(tokens=tokens, segment_ids=segment_ids, mask=mask, old_logprobs=old,
                   prompts=[rows[r // n]["prompt"] for r in range(count)],
                   prompt_ids=[prompts[r // n] for r in range(count)], response_ids=responses,
                   reference_ids=[rows[r // n]["reference_ids"] for r in range(count)],
                   task_types=[rows[r // n]["task_type"] for r in range(count)],
                   group_ids=np.arange(count, dtype=np.int32) // n,
                   finish_reason=np.asarray(finish, np.int32), num_samples=n,
                   rows=[rows[r // n].get("row", {}) for r in range(count)])
