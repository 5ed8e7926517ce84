"""Prompts → sampler → a token-level GRPO batch (the rollout half of an RL step).

    rows = next(iter(prompt_batches(records, tok, batch_size=8, seed=0, max_prompt_len=64)))
    ro = sample_rollout(sampler, rows, n=4, seq_len=128, max_new_tokens=64, seed=step_seed)
    ro.tokens[r]          # prompt + response of row r (row r = prompt r // n), right-padded
    ro.mask[r, t] == 1    # tokens[r, t + 1] is a response token: the loss position of it

Layout: every row is [prompt, response, pad…] of one static length T = max_prompt_len +
max_new_tokens, so the update step compiles once. Log-probs are aligned to the position that
predicts the token: entry t is log p(tokens[t + 1] | tokens[..t]). Response tokens include the
EOS the policy wrote (stopping is learnt); a response cut at the length limit is trained as is.
`old_logprobs` are the sampler's (temperature 1, before top-k / top-p), i.e. π_old of the same
distribution the loss differentiates, whatever temperature sampled the token.

Also here: the host-side metrics of a rollout (response and think lengths, guiding words,
reward and sub-score means, per-section seconds, tokens/s and MFU).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Sequence

import grain
import jax
import numpy as np

from opera_jax import tokenizer as tk
from opera_jax.data.pipeline import shuffled_source
from opera_jax.reward import TaskType
from opera_jax.sampling import FinishReason, Sampler

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "reference")


class TokenizePrompt:
    """Prompt row (`prompt`, `reference`, optional `task_type`, `id`) → token ids.

    The prompt gets the chat template with the generation prompt (thinking on by default), as
    the policy sees it; the reference is tokenised on its own. Prompts longer than
    `max_prompt_len` tokens give None (filtered out, with a warning).
    """

    def __init__(self, tokenizer, *, max_prompt_len: int, enable_thinking: bool = True):
        self.tokenizer, self.max_prompt_len = tokenizer, max_prompt_len
        self.enable_thinking = enable_thinking

    def __call__(self, row: dict) -> dict | None:
        text = tk.apply_chat_template(self.tokenizer, row["prompt"],
                                      enable_thinking=self.enable_thinking)
        ids = tk.encode(self.tokenizer, text)
        if len(ids) > self.max_prompt_len:
            log.warning("prompt %s has %d tokens > max_prompt_len %d: skipped",
                        row.get("id", "?"), len(ids), self.max_prompt_len)
            return None
        return {"id": str(row.get("id", "")), "prompt_ids": np.asarray(ids, np.int32),
                "reference_ids": np.asarray(tk.encode(self.tokenizer, row["reference"]),
                                            np.int32),
                "task_type": TaskType(row.get("task_type", "writing")).value}


def prompt_batches(records: Sequence[dict], tokenizer, *, batch_size: int, seed: int,
                   max_prompt_len: int, enable_thinking: bool = True, shuffle: bool = True,
                   num_epochs: int | None = None, num_threads: int = 2,
                   per_host: bool = True) -> grain.IterDataset:
    """This host's prompt batches: lists of `TokenizePrompt` dicts, `batch_size / hosts` each;
    with `per_host=False` every host reads the same global batches of `batch_size` (GRPO's
    host-side sampling and reward work on the whole batch in every process).

    Reuses the SFT pipeline's seeded, per-epoch reshuffled, host-strided source, so the
    iterator's position checkpoints the same way (`Checkpointer.save(data_iter=…)`).
    """
    count = jax.process_count() if per_host else 1
    if batch_size % count:
        raise ValueError(f"{batch_size} prompts per step are not divisible by {count} hosts")
    ds = shuffled_source(records, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                         **({} if per_host else dict(process_index=0, process_count=1)))
    ds = ds.map(TokenizePrompt(tokenizer, max_prompt_len=max_prompt_len,
                               enable_thinking=enable_thinking))
    ds = ds.filter(lambda ex: ex is not None)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1) * 8)
    return ds.to_iter_dataset(read).batch(batch_size // count, batch_fn=list)


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One RL step's responses on the host; R = prompts · n rows, row r is prompt r // n."""

    tokens: np.ndarray        # int32 [R, T] prompt + response, then pad
    segment_ids: np.ndarray   # int32 [R, T] 1 on prompt and response, 0 on padding
    mask: np.ndarray          # float32 [R, T] 1 where tokens[t + 1] is a response token
    old_logprobs: np.ndarray  # float32 [R, T] sampler log p(tokens[t + 1]) on the mask, else 0
    prompt_ids: list[np.ndarray]     # per row
    response_ids: list[np.ndarray]   # per row, EOS included when the row ended on it
    reference_ids: list[np.ndarray]  # per row
    task_types: list[str]            # per row
    group_ids: np.ndarray            # int32 [R] prompt index within the step
    finish_reason: np.ndarray        # int32 [R] sampling.FinishReason
    num_samples: int                 # n


def sample_rollout(sampler: Sampler, rows: Sequence[dict], *, n: int, seq_len: int,
                   max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                   top_k: int = 0, seed: int = 0, prompts_per_call: int = 0) -> Rollout:
    """Samples n responses per prompt row and lays them out as a training batch.

    Args:
      sampler: a `Sampler` holding the current policy weights (`set_params`).
      rows: `TokenizePrompt` dicts.
      n: responses per prompt (G).
      seq_len: T >= longest prompt + max_new_tokens.
      seed: the step's sampling seed (call k of a chunked rollout uses seed + k).
      prompts_per_call: sample this many prompts per sampler call (bounds the KV cache:
        prompts_per_call · n rows); 0 = all in one call.
    Returns:
      `Rollout`.
    """
    prompts = [r["prompt_ids"] for r in rows]
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > seq_len:
        raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds "
                         f"seq_len {seq_len}")
    per_call = prompts_per_call or len(prompts)
    outs = [sampler.sample([p.tolist() for p in prompts[i:i + per_call]],
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, n=n, seed=seed + k)
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
                   prompt_ids=[prompts[r // n] for r in range(count)], response_ids=responses,
                   reference_ids=[rows[r // n]["reference_ids"] for r in range(count)],
                   task_types=[rows[r // n]["task_type"] for r in range(count)],
                   group_ids=np.arange(count, dtype=np.int32) // n,
                   finish_reason=np.asarray(finish, np.int32), num_samples=n)


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern:
    """Whole-word, case-insensitive alternation of `keywords`, longest first, so "Wait a
    minute" counts once rather than also as "Wait"."""
    words = sorted(keywords, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
                      + r")\b", re.IGNORECASE)


def response_stats(ro: Rollout, tokenizer, *, think_close_id: int | None,
                   keywords: re.Pattern, prefix: str = "response/") -> dict[str, float]:
    """Host metrics of the responses: lengths, think-block length, guiding-word counts.

    think_len counts the tokens through `</think>` (the whole response when it never closed);
    guiding_words counts keyword matches in the think block's text (whole words, any case).
    """
    lengths = np.asarray([len(x) for x in ro.response_ids], np.float64)
    think, words = [], []
    for ids in ro.response_ids:
        hit = np.flatnonzero(ids == think_close_id) if think_close_id is not None else []
        end = int(hit[0]) + 1 if len(hit) else len(ids)
        think.append(end)
        words.append(len(keywords.findall(tokenizer.decode(ids[:end].tolist()))))
    return {f"{prefix}len": float(lengths.mean()),
            f"{prefix}len_max": float(lengths.max()),
            f"{prefix}think_len": float(np.mean(think)),
            f"{prefix}guiding_words": float(np.mean(words)),
            f"{prefix}truncated_frac": float(np.mean(ro.finish_reason == FinishReason.LENGTH))}


def reward_metrics(result, ro: Rollout, prefix: str) -> dict[str, float]:
    """Mean / std of the reward, the sub-scores (means over writing rows) and the accuracy of
    math rows (present only when the batch has rows of that kind)."""
    writing = np.asarray([t == TaskType.WRITING.value for t in ro.task_types])
    out = {f"{prefix}mean": float(result.reward.mean()),
           f"{prefix}std": float(result.reward.std())}
    if writing.any():
        out.update({f"{prefix}rank": float(result.rank_score[writing].mean()),
                    f"{prefix}reflection": float(result.reflection_score[writing].mean()),
                    f"{prefix}reflection_count": float(result.reflection_count[writing].mean())})
    if not writing.all():
        out[f"{prefix}math_acc"] = float(result.reward[~writing].mean())
    return out


def step_timing(ro: Rollout, *, rollout_s: float, reward_s: float, logprob_s: float,
                update_s: float, arch, peak: float, passes: int) -> dict[str, float]:
    """Seconds and tokens/s of the step's sections, and MFU when `peak` is known.

    Args:
      ro: the step's rollout.
      rollout_s, reward_s, update_s: wall seconds of the sections; logprob_s: the part of
        update_s spent on the old / reference log-prob passes.
      arch: the `Qwen3Config` (its forward FLOPs per token at the batch's mean length).
      peak: peak FLOP/s of the whole mesh; 0 = unknown, no MFU.
      passes: no-grad log-prob passes in the update (recomputed old, reference).
    Returns:
      time/*, throughput/*, tokens_per_s (generated tokens per step second) and mfu/*: the
      update counts 3 passes (forward + backward) plus `passes`, the rollout one pass over
      each prompt (prefilled once) and each generated token.
    """
    generated = sum(len(x) for x in ro.response_ids)
    seq_tokens = int(ro.segment_ids.sum())
    prompt_tokens = sum(len(p) for p in ro.prompt_ids[::ro.num_samples])
    step_s = rollout_s + reward_s + update_s
    out = {"time/rollout_s": rollout_s, "time/reward_s": reward_s, "time/update_s": update_s,
           "time/logprob_s": logprob_s, "time/step_s": step_s,
           "time/reward_share": reward_s / step_s,
           "throughput/rollout_tokens_per_s": generated / rollout_s,
           "throughput/update_tokens_per_s": seq_tokens / update_s,
           "tokens_per_s": generated / step_s}
    if peak > 0:
        per_token = arch.flops_per_token(seq_tokens / len(ro.response_ids))
        out["mfu/update"] = per_token * seq_tokens * (3 + passes) / update_s / peak
        out["mfu/rollout"] = per_token * (prompt_tokens + generated) / rollout_s / peak
    return out
