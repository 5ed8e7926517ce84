"""Reference LP computation: one plain full forward pass per context (tests and benchmarks).

As the published code: each context c is scored by a forward pass over tokens(c) + tokens(a)
and LP(c) is the mean log-probability of a's tokens. No cache and no custom mask: contexts are
rows of a plain causal forward, right-padded to a bucket length (padding after the reference
cannot change earlier positions under a causal mask) and run `rows_per_call` at a time. Only
the reference positions go through the vocabulary projection (the published code projected
every position; the values are the same, the baseline is just not needlessly slow).
Independent of kernel.py on purpose; it shares only `Context` and `bucket_size`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opera_jax.buckets import bucket_size
from opera_jax.reward.contexts import Context
from opera_jax.sharding import to_host


def naive_reference_logprobs(model, sequences: Sequence[Sequence[int]],
                             references: Sequence[Sequence[int]],
                             contexts: Sequence[Sequence[Context]], *, rows_per_call: int = 8,
                             temperature: float = 1.0, logprob_chunk: int = 512,
                             min_bucket: int = 64, sort_by_length: bool = False
                             ) -> list[np.ndarray]:
    """LP of each sample's reference under each of its contexts, one forward per context.

    Args:
      model: the scorer, a `Qwen3`.
      sequences: per sample, the token ids of prompt + response.
      references: per sample, the reference's token ids (non-empty).
      contexts: per sample, its contexts.
      rows_per_call: contexts per forward call (each context is its own row).
      temperature: softmax temperature of the log-probs.
      logprob_chunk: positions per chunk of the float32 log-softmax.
      min_bucket: smallest padded row length.
      sort_by_length: run rows in order of length (less padding per call) instead of in
        sample order.
    Returns:
      Per sample, float32 [len(contexts[i])] LP values.
    """
    rows = []  # (tokens, reference start, reference length)
    for seq, ref, ctx in zip(sequences, references, contexts):
        for c in ctx:
            prefix = list(seq[:c.prefix_len]) + ([] if c.extra_token is None else [c.extra_token])
            rows.append((prefix + list(ref), len(prefix), len(ref)))
    order = list(range(len(rows)))
    if sort_by_length:
        order.sort(key=lambda i: len(rows[i][0]))
    graphdef, state = nnx.split(model)
    lp = np.zeros((len(rows),), np.float32)
    for start in range(0, len(order), rows_per_call):
        idx = order[start:start + rows_per_call]
        t = bucket_size(max(len(rows[i][0]) for i in idx), min_bucket)
        r = bucket_size(max(rows[i][2] for i in idx), min(min_bucket, t))
        tokens = np.zeros((rows_per_call, t), np.int32)
        ref_start = np.ones((rows_per_call,), np.int32)
        ref_len = np.ones((rows_per_call,), np.int32)
        for j, i in enumerate(idx):
            toks, ref_start[j], ref_len[j] = rows[i]
            tokens[j, :len(toks)] = toks
        out = _forward(graphdef, state, tokens, ref_start, ref_len, jnp.float32(temperature),
                       ref_bucket=r, logprob_chunk=logprob_chunk)
        lp[idx] = np.asarray(to_host(out))[:len(idx)]
    result, pos = [], 0
    for ctx in contexts:
        result.append(lp[pos:pos + len(ctx)])
        pos += len(ctx)
    return result


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_bucket", "logprob_chunk"))
def _forward(graphdef, state, tokens, ref_start, ref_len, temperature, *, ref_bucket,
             logprob_chunk):
    """Mean log p of tokens[ref_start : ref_start + ref_len] per row, plain causal forward."""
    model = nnx.merge(graphdef, state)
    hidden = model(tokens, return_hidden=True)  # [B, T, D]
    # Reference token j sits at ref_start + j and is predicted by position ref_start + j - 1;
    # only those positions go through the vocabulary projection.
    j = jnp.arange(ref_bucket)[None, :]
    target_pos = jnp.minimum(ref_start[:, None] + j, tokens.shape[1] - 1)  # [B, R]
    h = jnp.take_along_axis(hidden, (target_pos - 1)[..., None], axis=1)  # [B, R, D]
    targets = jnp.take_along_axis(tokens, target_pos, axis=1)
    logp = model.logprobs(h, targets, chunk_size=logprob_chunk, temperature=temperature)
    mask = j < ref_len[:, None]
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=1) / ref_len.astype(jnp.float32)
