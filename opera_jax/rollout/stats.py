"""Host-side metrics of a rollout: response and think lengths, guiding words, the signs of a
policy gaming the reward (diagnostics.py), reward and sub-score means, per-section seconds,
tokens/s and MFU.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from opera_jax.reward import TaskType
from opera_jax.reward.segments import keyword_regex
from opera_jax.rollout import diagnostics
from opera_jax.rollout.batch import Rollout
from opera_jax.sampling import FinishReason


def response_stats(ro: Rollout, tokenizer, *, think_close_id: int | None,
                   keywords: Sequence[str], prefix: str = "response/") -> dict[str, float]:
    """Host metrics of the responses: lengths, think-block length, guiding-word counts, and
    the signs of a policy gaming the reward (`diagnostics.response_quality`: think block
    closed, repeated 4-grams and paragraphs, and the ground truth where the prompt has one).

    think_len counts the tokens through `</think>` (the whole response when it never closed);
    guiding_words counts keyword matches in the think block's text (whole words, any case).
    """
    pattern = keyword_regex(tuple(keywords))
    lengths = np.asarray([len(x) for x in ro.response_ids], np.float64)
    think, words, quality = [], [], []
    for prompt, ids in zip(ro.prompts, ro.response_ids):
        hit = np.flatnonzero(ids == think_close_id) if think_close_id is not None else []
        end = int(hit[0]) + 1 if len(hit) else len(ids)
        think.append(end)
        words.append(len(pattern.findall(tokenizer.decode(ids[:end].tolist()))))
        text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        quality.append(diagnostics.response_quality(prompt, text, ids, keywords=keywords))
    return {f"{prefix}len": float(lengths.mean()),
            f"{prefix}len_max": float(lengths.max()),
            f"{prefix}think_len": float(np.mean(think)),
            f"{prefix}guiding_words": float(np.mean(words)),
            f"{prefix}truncated_frac": float(np.mean(ro.finish_reason == FinishReason.LENGTH)),
            **diagnostics.mean_quality(quality, prefix)}


def reward_metrics(scored, ro: Rollout, prefix: str) -> dict[str, float]:
    """Mean / std of the reward, the mean of each term (`reward.terms.Scored`), and, with the
    opera term, its sub-scores (means over writing rows) and the accuracy of math rows
    (present only when the batch has rows of that kind)."""
    writing = np.asarray([t == TaskType.WRITING.value for t in ro.task_types])
    out = {f"{prefix}mean": float(scored.reward.mean()),
           f"{prefix}std": float(scored.reward.std())}
    out.update({f"{prefix}{k}": float(v.mean()) for k, v in scored.terms.items()})
    opera = scored.opera
    if opera is not None and writing.any():
        out.update({f"{prefix}rank": float(opera.rank_score[writing].mean()),
                    f"{prefix}reflection": float(opera.reflection_score[writing].mean()),
                    f"{prefix}reflection_count": float(opera.reflection_count[writing].mean())})
    if opera is not None and not writing.all():
        out[f"{prefix}math_acc"] = float(opera.reward[~writing].mean())
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
