"""Text in, text out: `generate(model, tokenizer, prompts, ...)` for users and scripts.

    outs = generate(model, tok, ["<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n"],
                    max_new_tokens=256, temperature=0.6, top_p=0.95, top_k=20, n=4,
                    stop=("Wait", "\\nWait", "</think>"))
    outs[0].text, outs[0].finish_reason, outs[0].stop, outs[0].logprobs

Prompts are encoded as they are (no BOS, no chat template: apply `tokenizer.apply_chat_template`
or `opera_jax.tokenizer.apply_chat_template` first). For repeated calls with one model, build a
`Sampler` once; `generate` makes a light one per call (the token byte table is cached).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from opera_jax.model.paged import bytes_per_token
from opera_jax.sampling import stops
from opera_jax.sampling.loop import FinishReason
from opera_jax.sampling.sampler import Sampler, Samples, _per_row, default_kv_memory
from opera_jax.tokenizer import encode


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sample.

    text: the generated text. With finish_reason STOP it ends exactly at the end of the stop
      string (the last token may carry more bytes, e.g. " Wait," for "Wait"; they are cut);
      with EOS the EOS token's text is left out.
    token_ids, logprobs: every generated token, through the EOS or stop-completing token;
      logprobs are float32 log softmax(raw logits) at temperature 1, before top-k / top-p.
    stop: the stop string that fired (None unless STOP); stop_offset: character offset in
      `text` where it starts, so text[:stop_offset] is the text before the stop word.
    prompt_logprobs: with `generate(..., prompt_logprobs=True)`, log p(prompt token j | the
      ones before) for j >= 1 (same for every sample of a prompt); else None.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    stop: str | None
    stop_offset: int | None
    prompt_index: int
    sample_index: int
    prompt_logprobs: list[float] | None = None


def completions(samples: Samples, table: stops.TokenTable, stop: Sequence[str],
                eos_ids: Sequence[int]) -> list[Completion]:
    """Host-side decoding of sampler rows into `Completion`s (row order kept)."""
    out = []
    for r in range(len(samples.lengths)):
        ids, lps = samples.row(r)
        reason = FinishReason(int(samples.finish_reason[r]))
        text_ids = ids[:-1] if reason is FinishReason.EOS and ids[-1] in eos_ids else ids
        raw = table.detokenize(text_ids.tolist())
        hit, offset = None, None
        if reason is FinishReason.STOP:
            hit = stop[int(samples.stop_index[r])]
            raw = raw[:int(samples.stop_end[r])]
            # The stop starts on a character boundary: the prefix decodes on its own.
            offset = len(raw[:int(samples.stop_start[r])].decode("utf-8", errors="replace"))
        prompt = r // samples.num_samples
        out.append(Completion(
            text=raw.decode("utf-8", errors="replace"), token_ids=ids.tolist(),
            logprobs=lps.tolist(), finish_reason=reason, stop=hit, stop_offset=offset,
            prompt_index=prompt, sample_index=r % samples.num_samples,
            prompt_logprobs=None if samples.prompt_logprobs is None
            else samples.prompt_logprobs[prompt].tolist()))
    return out


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens, temperature=1.0,
             top_p=1.0, top_k=0, n: int = 1, stop: Sequence[str] = (), seed: int = 0,
             eos_ids: Sequence[int] | None = None, mesh=None,
             prompt_logprobs: bool = False, slots: int | str | None = None) -> list[Completion]:
    """Samples n continuations of each prompt string.

    Args:
      model: a `Qwen3`. tokenizer: its `transformers` tokenizer.
      prompts: strings, encoded without added special tokens.
      max_new_tokens, temperature, top_p, top_k: scalar or one per prompt (temperature 0 =
        greedy; top_k 0 / top_p 1 = off).
      n: samples per prompt. stop: stop strings, matched in the generated text only.
      seed: fixes the samples. eos_ids: default `default_eos_ids(tokenizer)`.
      mesh: optional (data, fsdp, tensor) mesh.
      prompt_logprobs: also score the prompt tokens (perplexity over prompt + output).
      slots: None = one fixed batch; S or "auto" = the continuous-batching engine with at
        most S rows decoding at once (`Sampler.sample`).
    Returns:
      len(prompts) · n Completions, prompt-major (prompt i's samples are [i·n, (i+1)·n)).
    """
    stop = tuple(stop)
    ids = [encode(tokenizer, p) for p in prompts]
    kv_memory = None
    if slots is not None:  # a pool for this call alone: no larger than all of its rows
        max_new = _per_row(max_new_tokens, len(ids), n, np.int64)
        tokens = sum(map(len, ids)) + int(max_new.sum()) + 16 * (len(max_new) + len(ids) + 1)
        kv_memory = min(default_kv_memory(), tokens * bytes_per_token(model.config, model.dtype))
    sampler = Sampler.for_tokenizer(model, tokenizer, mesh=mesh, eos_ids=eos_ids,
                                    kv_memory=kv_memory)
    eos_ids = sampler.eos_ids
    samples = sampler.sample(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, n=n, stop=stop, seed=seed,
                             prompt_logprobs=prompt_logprobs, slots=slots)
    return completions(samples, sampler.table, stop, eos_ids)
