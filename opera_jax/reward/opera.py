"""The OPERA reward of a batch of responses: entry points on text and on token ids.

docs/METHOD.md §2. For each `writing` response: LP of the reference under c_full, c_0 and
c_1..c_K (kernel.py), then

    rank_score       = (#group members with strictly lower LP(c_full)) / (G − 1)   (G = 1: 1.0)
    reflection_score = tanh(#{k : segment k has a keyword and LP(c_k) > LP(c_{k-1})} / 2)
    reward           = rank_weight · rank_score + reflection_weight · reflection_score

For a `math` response: reward = 1.0 if the last `\\boxed{}` outside the think block equals the
reference (both stripped) else 0.0; both sub-scores are 0 and its LPs are not computed (NaN).

Defined behaviour:
  * empty think block, no paragraphs, or a missing "</think>" (a truncated response): K = 0, so
    reflection_score = 0; c_full and c_0 are still scored (rank uses c_full).
  * no "<think>" at all: c_0 = prompt + "<think>", K = 0.
  * more than `config.max_segments` paragraphs: the tail merges into the last segment.
  * a token straddling a character cut (not with Qwen3's tokenizer): the cut rounds down to the
    token boundary before it (segments.py).
  * a group of one: rank_score = 1.0. Ties in LP(c_full) take the lower rank; identical
    (prompt, response, reference) token sequences are scored once, so they tie exactly
    whatever batch they fall in. The group of a writing response is its writing members
    (math members of a group are not ranked).
  * `config.group_size` set: every group must have exactly that many members (ValueError).
  * empty reference (no tokens; for math, empty after stripping): ValueError naming the sample.
  * a non-finite LP: FloatingPointError naming the sample, its group and the context.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Sequence

import numpy as np

from opera_jax import tokenizer as tk
from opera_jax.enums import coerce
from opera_jax.reward import contexts as ctx_lib
from opera_jax.reward import scores
from opera_jax.reward.config import LPImpl, RewardConfig, Scorer, TaskType
from opera_jax.reward.kernel import reference_logprobs
from opera_jax.reward.naive import naive_reference_logprobs
from opera_jax.reward.segments import (content_words, decode_with_offsets, has_keyword,
                                      near_repeat, parse_think_block)


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Per-response reward and its parts (float32 [B] unless noted); `result["reward"]` works.

    lp_full, lp_initial: NaN for math responses (not computed). lp_segments: float32 [K_i]
    per response (empty for math). reflection_count: int32 [B].
    """

    reward: np.ndarray
    rank_score: np.ndarray
    reflection_score: np.ndarray
    reflection_count: np.ndarray
    lp_full: np.ndarray
    lp_initial: np.ndarray
    lp_segments: list[np.ndarray]

    def __getitem__(self, key: str):
        return getattr(self, key)

    def take(self, idx) -> "RewardResult":
        """The results of responses `idx` (int indices), in that order."""
        idx = np.asarray(idx, np.int64)
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
                     if f.name != "lp_segments"},
            lp_segments=[self.lp_segments[i] for i in idx])

    @staticmethod
    def concat(results: Sequence["RewardResult"]) -> "RewardResult":
        """Results of several batches, one after the other."""
        return RewardResult(
            **{f.name: np.concatenate([getattr(r, f.name) for r in results])
               for f in dataclasses.fields(RewardResult) if f.name != "lp_segments"},
            lp_segments=[x for r in results for x in r.lp_segments])


@dataclasses.dataclass(frozen=True)
class _Sample:
    task: TaskType
    response: str
    reference: str
    sequence: list[int] = ()  # prompt + response ids (writing only)
    reference_ids: list[int] = ()
    contexts: list[ctx_lib.Context] = ()
    keyword_flags: tuple[bool, ...] = ()


def score_texts(model, tokenizer, prompts: Sequence[str], responses: Sequence[str],
                references: Sequence[str], group_ids: Sequence[Hashable],
                task_types: Sequence[TaskType | str] | None = None, *,
                config: RewardConfig | None = None, reference_model=None) -> RewardResult:
    """OPERA rewards of text responses (offline scoring and checks).

    Args:
      model: the policy, a `Qwen3` (the scorer unless `config.scorer` is REFERENCE).
      tokenizer: its tokenizer (fast, with Qwen3's chat template and think tags).
      prompts: raw user prompts; the chat template (thinking on) is applied here, as the
        policy saw them.
      responses: response texts y (think block, then the answer).
      references: reference answers a, tokenized on their own.
      group_ids: group (prompt) of each response.
      task_types: `TaskType` per response; None = all writing.
      config: `RewardConfig` (default: published settings, whole-word keywords).
      reference_model: the frozen scorer, needed when `config.scorer` is REFERENCE.
    Returns:
      `RewardResult`.
    """
    config = config or RewardConfig()
    tasks = _tasks(task_types, len(responses))
    think_open = tk.special_token_ids(tokenizer)["think_open"]
    samples = []
    for i, (prompt, response, reference, task) in enumerate(
            zip(prompts, responses, references, tasks, strict=True)):
        if task is TaskType.MATH:
            samples.append(_math_sample(i, response, reference))
            continue
        prompt_ids = tk.encode_prompt(tokenizer, prompt)  # user text: special strings plain
        response_ids, offsets = tk.encode_with_offsets(tokenizer, response)
        samples.append(_writing_sample(i, prompt_ids, response_ids, offsets, response,
                                       tk.encode_text(tokenizer, reference), reference,
                                       think_open, config))
    return _score_samples(model, samples, group_ids, config=config,
                          reference_model=reference_model)


def score_token_ids(model, tokenizer, prompt_ids: Sequence[Sequence[int]],
                    response_ids: Sequence[Sequence[int]],
                    reference_ids: Sequence[Sequence[int]], group_ids: Sequence[Hashable],
                    task_types: Sequence[TaskType | str] | None = None, *,
                    config: RewardConfig | None = None, reference_model=None) -> RewardResult:
    """OPERA rewards of sampled token ids (the RL loop): the scorer sees exactly these ids.

    Args:
      prompt_ids: per response, the prompt ids as the policy saw them (template applied).
      response_ids: per response, the sampled ids without padding; a trailing run of eos / pad
        ids is dropped (the published scorer decoded without special tokens).
      reference_ids: per response, the reference's ids.
      Others as in `score_texts`. The tokenizer decodes the response (think block, keywords)
      and, for math, the reference (special tokens skipped).
    Returns:
      `RewardResult`.
    """
    config = config or RewardConfig()
    tasks = _tasks(task_types, len(response_ids))
    special = tk.special_token_ids(tokenizer)
    trailing = {special["eos"], special["pad"]}
    samples = []
    for i, (prompt, response, reference, task) in enumerate(
            zip(prompt_ids, response_ids, reference_ids, tasks, strict=True)):
        response = [int(t) for t in response]
        while response and response[-1] in trailing:
            response.pop()
        text, offsets = decode_with_offsets(tokenizer, response)
        reference_text = tokenizer.decode(list(reference), skip_special_tokens=True)
        if task is TaskType.MATH:
            samples.append(_math_sample(i, text, reference_text))
            continue
        samples.append(_writing_sample(i, [int(t) for t in prompt], response, offsets, text,
                                       [int(t) for t in reference], reference_text,
                                       special["think_open"], config))
    return _score_samples(model, samples, group_ids, config=config,
                          reference_model=reference_model)


def _tasks(task_types, n: int) -> list[TaskType]:
    if task_types is None:
        return [TaskType.WRITING] * n
    if len(task_types) != n:
        raise ValueError(f"{len(task_types)} task types for {n} responses")
    return [coerce(TaskType, t, f"task_types[{i}]") for i, t in enumerate(task_types)]


def _math_sample(i: int, response: str, reference: str) -> _Sample:
    if not reference.strip():
        raise ValueError(f"sample {i}: empty reference (a math reference must be non-blank)")
    return _Sample(TaskType.MATH, response, reference)


def _writing_sample(i, prompt_ids, response_ids, offsets, response, reference_ids, reference,
                    think_open, config: RewardConfig) -> _Sample:
    if not len(reference_ids):
        raise ValueError(f"sample {i}: empty reference (LP needs at least one reference token)")
    if not len(prompt_ids):
        raise ValueError(f"sample {i}: empty prompt (contexts need at least one token)")
    if len(offsets) != len(response_ids):
        raise ValueError(f"sample {i}: {len(offsets)} offsets for {len(response_ids)} tokens")
    block = parse_think_block(response, max_segments=config.max_segments)
    contexts = ctx_lib.plan_contexts(block, offsets, prompt_len=len(prompt_ids),
                                     think_open_id=think_open)
    flags = tuple(has_keyword(s.text, config.keywords, config.keyword_match)
                  for s in block.segments)
    if config.distinct_reflections is not None:  # the deviation: restatements earn nothing
        words = [content_words(s.text, config.keywords) for s in block.segments]
        flags = tuple(f and not near_repeat(w, words[:k], threshold=config.distinct_reflections)
                      for k, (f, w) in enumerate(zip(flags, words)))
    sequence = list(prompt_ids) + list(response_ids)
    ctx_lib.check_contexts(len(sequence), contexts, sample=i)
    return _Sample(TaskType.WRITING, response, reference, sequence, list(reference_ids),
                   contexts, flags)


def _score_samples(model, samples: Sequence[_Sample], group_ids: Sequence[Hashable], *,
                  config: RewardConfig, reference_model=None) -> RewardResult:
    """Scores prepared samples (see `score_texts` / `score_token_ids`)."""
    n = len(samples)
    if len(group_ids) != n:
        raise ValueError(f"{len(group_ids)} group ids for {n} responses")
    _check_group_sizes(group_ids, config.group_size)
    scorer = model if config.scorer is Scorer.POLICY else reference_model
    if scorer is None:
        raise ValueError("config.scorer is 'reference': pass reference_model=")

    writing = [i for i, s in enumerate(samples) if s.task is TaskType.WRITING]
    lps = _logprobs(scorer, [samples[i] for i in writing], config)
    for i, lp in zip(writing, lps):
        bad = np.flatnonzero(~np.isfinite(lp))
        if bad.size:
            j = int(bad[0])
            name = {ctx_lib.FULL: "c_full", ctx_lib.INITIAL: "c_0"}.get(j, f"c_{j - 1}")
            raise FloatingPointError(f"sample {i} (group {group_ids[i]!r}): LP under {name} "
                                     f"is {lp[j]}")

    reward = np.zeros((n,), np.float32)
    rank = np.zeros((n,), np.float32)
    refl = np.zeros((n,), np.float32)
    count = np.zeros((n,), np.int32)
    lp_full = np.full((n,), np.nan, np.float32)
    lp_initial = np.full((n,), np.nan, np.float32)
    lp_segments = [np.zeros((0,), np.float32) for _ in range(n)]
    for i, lp in zip(writing, lps):
        lp_full[i], lp_initial[i] = lp[ctx_lib.FULL], lp[ctx_lib.INITIAL]
        lp_segments[i] = lp[ctx_lib.FIRST_SEGMENT:]
        count[i] = scores.reflection_count(lp_initial[i], lp_segments[i],
                                           samples[i].keyword_flags)
    if writing:
        rank[writing] = scores.rank_scores(lp_full[writing], [group_ids[i] for i in writing])
        refl[writing] = scores.reflection_score(count[writing])
        reward[writing] = (np.float32(config.rank_weight) * rank[writing]
                           + np.float32(config.reflection_weight) * refl[writing])
    check = scores.math_check(config.math_match)
    for i, s in enumerate(samples):
        if s.task is TaskType.MATH:
            reward[i] = check(s.response, s.reference)
    return RewardResult(reward=reward, rank_score=rank, reflection_score=refl,
                        reflection_count=count, lp_full=lp_full, lp_initial=lp_initial,
                        lp_segments=lp_segments)


def _logprobs(scorer, samples: Sequence[_Sample], config: RewardConfig) -> list[np.ndarray]:
    """LP of every context of every sample, each distinct (sequence, reference) scored once.

    Identical responses must get identical LPs, or the rank's ties break: float results vary
    by ~1 ulp with the batch a row is scored in and its padding. Scoring each distinct token
    sequence once and sharing the result makes ties exact wherever the rows fall.
    """
    if not samples:
        return []
    first: dict[tuple, int] = {}
    unique: list[_Sample] = []
    slot = []
    for s in samples:
        key = (tuple(s.sequence), tuple(s.reference_ids), tuple(s.contexts))
        if key not in first:
            first[key] = len(unique)
            unique.append(s)
        slot.append(first[key])
    args = ([s.sequence for s in unique], [s.reference_ids for s in unique],
            [s.contexts for s in unique])
    if config.lp_impl is LPImpl.NAIVE:
        lps = naive_reference_logprobs(scorer, *args, rows_per_call=config.batch_size,
                                       temperature=config.temperature,
                                       logprob_chunk=config.logprob_chunk,
                                       min_bucket=config.min_bucket)
    else:
        lps = reference_logprobs(scorer, *args, config=config)
    return [lps[k] for k in slot]


def _check_group_sizes(group_ids, group_size: int | None) -> None:
    if group_size is None:
        return
    sizes: dict[Hashable, int] = {}
    for g in group_ids:
        sizes[g] = sizes.get(g, 0) + 1
    wrong = {g: s for g, s in sizes.items() if s != group_size}
    if wrong:
        raise ValueError(f"config.group_size is {group_size}, but groups have sizes {wrong}")
