"""LP of the reference under every context of a batch of responses, in one jitted call.

LP(c) = mean_t log π(a_t | c, a_<t) (docs/METHOD.md §1). Every context is a prefix of
prompt + response (see contexts.py), so instead of one full forward pass per context:

1. Prefill: one pass over prompt + response for the B responses of the call, writing the
   keys/values of every layer into a KV cache (run in chunks of `prefill_chunk` tokens, which
   bounds the attention scores held at once).
2. Reference passes, `contexts_per_step` contexts per step of a `lax.scan`: gather each
   context's cache row, hide the cache slots at and after its cut (cache segment id 0), and
   run [last context token, a_1, …, a_{n-1}] at positions cut-1, cut, … attending to the
   visible slots and causally to themselves; take float32 log p(a_t) from the hidden states
   (chunked log-softmax, `Qwen3.logprobs`) and their mean over the reference.
   Contexts are sorted by length, and a step attends only to the first w cache slots, w the
   smallest of `cache_windows` static sizes (~P/n, 2P/n, …, P; a `lax.switch` branch each)
   that holds its contexts: short contexts do not pay for the whole response's slots.

The last context token is run again rather than read from the prefill so that one pass form
covers every context, including c_0 = x + "<think>" for a response without "<think>" (all of
x visible, "<think>" fed first). Its key/value is recomputed from the same inputs, so the
result equals the naive computation up to float rounding (tests: ≤ 1e-5 in float32).

Cost per response: one pass over |x| + |y| tokens plus (K + 2) passes over |a| tokens (each
attending to about |x| + |b_k| + |a| slots), against (K + 2) passes over |x| + |b_k| + |a|
tokens. Attention goes through the model's cached-call path (XLA, dense scores over the
window); see benchmarks/RESULTS.md for what that means on GPU.
Lengths, batch and context counts are padded to buckets (`buckets.bucket_size`), so a new
batch of the same bucket sizes reuses the compiled function (`TRACE_COUNT` counts traces).
"""

from __future__ import annotations

import collections
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opera_jax.model import KVCache
from opera_jax.model import attention
from opera_jax.reward.config import RewardConfig
from opera_jax.buckets import bucket_size, round_up
from opera_jax.reward.contexts import Context
from opera_jax.sharding import batch_shards, constrain, current_mesh, to_host

# Traces of the jitted kernel (a test checks that equal bucket sizes do not retrace).
TRACE_COUNT: collections.Counter = collections.Counter()


def reference_logprobs(model, sequences: Sequence[Sequence[int]],
                       references: Sequence[Sequence[int]],
                       contexts: Sequence[Sequence[Context]], *,
                       config: RewardConfig = RewardConfig()) -> list[np.ndarray]:
    """LP of each sample's reference under each of its contexts.

    Args:
      model: the scorer, a `Qwen3`.
      sequences: per sample, the token ids of prompt + response.
      references: per sample, the reference's token ids (non-empty).
      contexts: per sample, its contexts (cuts of its sequence).
      config: kernel knobs (`batch_size`, `contexts_per_step`, `cache_windows`,
        `prefill_chunk`, `logprob_chunk`, `min_bucket`) and `temperature`.
    Returns:
      Per sample, float32 [len(contexts[i])] LP values.
    """
    graphdef, state = nnx.split(model)
    temperature = jnp.float32(config.temperature)
    out: list[np.ndarray] = []
    for start in range(0, len(sequences), config.batch_size):
        sl = slice(start, start + config.batch_size)
        if not any(contexts[sl]):
            out.extend(np.zeros((0,), np.float32) for _ in contexts[sl])
            continue
        shards = batch_shards(current_mesh())
        packed, windows, index = pack_inputs(sequences[sl], references[sl], contexts[sl], config,
                                             shards=shards)
        lp_packed = np.asarray(to_host(lp_kernel(
            graphdef, state, *packed, temperature, windows=windows,
            logprob_chunk=config.logprob_chunk, shards=shards)), np.float32)
        lp = np.empty((sum(map(len, contexts[sl])),), np.float32)
        real = index >= 0
        lp[index[real]] = lp_packed[real]
        pos = 0
        for ctx in contexts[sl]:
            out.append(lp[pos:pos + len(ctx)])
            pos += len(ctx)
    return out


def pack_inputs(sequences, references, contexts, config: RewardConfig, *, shards: int = 1):
    """Host side of one call: inputs padded to bucket sizes, contexts sorted into steps.

    With `shards` > 1 the responses are split into that many equal groups (the devices of the
    batch axis, group j on device j) and every step takes the same number of contexts from
    each group, each group's own contexts sorted by length: a context reads only its device's
    part of the KV cache, which stays sharded (see `lp_kernel`).

    Returns:
      (the kernel's array arguments, the static window sizes, index: for each LP the kernel
      returns, the context it belongs to, counted sample by sample, or -1 for padding).
    """
    per = config.buckets_per_octave
    b = round_up(bucket_size(len(sequences), 1, per), shards)
    p = bucket_size(max(len(s) for s in sequences), config.min_bucket, per)
    # Equal prefill chunks of at most `prefill_chunk` tokens (multiples of 8) covering p.
    n_chunks = -(-p // config.prefill_chunk)
    chunk = round_up(-(-p // n_chunks), 8)
    p = n_chunks * chunk
    r = bucket_size(max(len(a) for a in references), config.min_bucket, per)
    tokens = np.zeros((b, p), np.int32)
    lengths = np.zeros((b,), np.int32)
    reference = np.zeros((b, r), np.int32)
    ref_lengths = np.zeros((b,), np.int32)
    group = b // shards
    # Per group: (context number, row, visible slots, first token) of each of its contexts.
    groups: list[list[tuple[int, int, int, int]]] = [[] for _ in range(shards)]
    number = 0
    for i, (seq, ref, ctx) in enumerate(zip(sequences, references, contexts)):
        tokens[i, :len(seq)] = seq
        lengths[i] = len(seq)
        reference[i, :len(ref)] = ref
        ref_lengths[i] = len(ref)
        for c in ctx:
            if c.extra_token is None:  # last context token is seq[prefix_len - 1]
                entry = (c.prefix_len - 1, seq[c.prefix_len - 1])
            else:  # the whole prefix is visible, the extra token comes first
                entry = (c.prefix_len, c.extra_token)
            groups[i // group].append((number, i, *entry))
            number += 1
    # Each group's contexts in order of visible length, so each step's window fits tightly.
    for g in groups:
        g.sort(key=lambda e: e[2])  # stable: ties keep their order
    n = number
    per_step = min(config.contexts_per_step, 1 << max(0, (n - 1).bit_length()))
    local = max(1, per_step // shards)  # contexts per group per step
    steps = bucket_size(max(1, max(-(-len(g) // local) for g in groups)), 1, per)
    # [steps, shards, local] of (context number or -1, row, visible, first); padding reads
    # its own group's first row with nothing visible.
    packed = np.zeros((steps, shards, local, 4), np.int64)
    packed[..., 0] = -1
    packed[..., 1] = (np.arange(shards) * group)[None, :, None]
    for j, g in enumerate(groups):
        if g:
            flat = packed[:, j].reshape(steps * local, 4)
            flat[:len(g)] = np.asarray(g, np.int64)
            packed[:, j] = flat.reshape(steps, local, 4)
    packed = packed.reshape(steps, shards * local, 4)
    index = packed[..., 0].reshape(-1)
    ctx_arrays = [packed[..., k].astype(np.int32) for k in (1, 2, 3)]
    windows = cache_windows(p, config.cache_windows)
    # Smallest window holding every visible slot of the step's contexts.
    window = np.searchsorted(windows, ctx_arrays[1].max(axis=1)).astype(np.int32)
    tokens = tokens.reshape(b, p // chunk, chunk).transpose(1, 0, 2)  # [chunks, B, chunk]
    return (tokens, lengths, reference, ref_lengths, *ctx_arrays, window), windows, index


def cache_windows(p: int, count: int) -> tuple[int, ...]:
    """The static window sizes (cache slots a reference pass attends to): ~p·i/count."""
    sizes = {min(p, round_up(-(-p * i // count), 8)) for i in range(1, count + 1)}
    return tuple(sorted(sizes))


@functools.partial(jax.jit, static_argnames=("graphdef", "windows", "logprob_chunk", "shards"))
def lp_kernel(graphdef, state, tokens, lengths, reference, ref_lengths, ctx_row, ctx_visible,
            ctx_first, ctx_window, temperature, *, windows: tuple[int, ...], logprob_chunk: int,
            shards: int = 1):
    """Prefill + reference passes.

    Shapes: tokens [C, B, P/C] (prefill chunks); lengths, ref_lengths [B]; reference [B, R];
    ctx_row, ctx_visible, ctx_first [steps, per_step]; ctx_window [steps] (index into
    `windows`). Returns LP float32 [steps · per_step]. `shards`: as `pack_inputs` was given
    (the i-th of `shards` equal parts of a step's contexts reads rows of the i-th part of B),
    so the KV cache stays sharded over the batch axis and each context's rows are gathered
    on the device that holds them.
    """
    TRACE_COUNT["kernel"] += 1
    model = nnx.merge(graphdef, state)
    n_chunks, b, chunk = tokens.shape
    p, r = n_chunks * chunk, reference.shape[1]

    # 1. Prefill. Slots [p, p + r) stay free for the reference passes' own keys.
    seg = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)  # [B, P]; 0 = padding
    seg = seg.reshape(b, n_chunks, chunk).transpose(1, 0, 2)

    def prefill(cache, xs):
        toks, sg = xs
        _, cache = model(toks, segment_ids=sg, cache=cache, return_hidden=True)
        return cache, None

    cache = KVCache.init(model.config, b, p + r, model.dtype).map_kv(
        lambda x: constrain(x, KVCache.LOGICAL_AXES))
    if n_chunks == 1:
        # One pass: right-padded rows from slot 0 with a static start (Python int end), the
        # call shape fused kernels take whole (cuDNN with per-row lengths, splash).
        _, cache = model(tokens[0], segment_ids=seg[0], cache=cache.replace(end=0),
                         return_hidden=True, right_padded=True)
    elif attention.target_platform() == "tpu":
        # Splash needs each chunk's offset static: the chunks unrolled, offsets Python ints
        # (a scan's traced offset would send the prefill to XLA attention).
        for i in range(n_chunks):
            _, cache = model(tokens[i], segment_ids=seg[i], cache=cache.replace(end=i * chunk),
                             return_hidden=True)
    else:
        cache, _ = jax.lax.scan(prefill, cache, (tokens, seg))

    # 2. Reference passes, `per_step` contexts side by side, attending to a window of w cache
    # slots (w static per branch; the step's contexts all have visible <= w).
    offsets = jnp.arange(r, dtype=jnp.int32)

    def reference_pass(w, rows, visible, first):
        # Slots [0, w + r) of each context's row; slots >= visible are hidden, and the pass
        # writes its own keys over [w, w + r).
        ctx_cache = cache.map_kv(lambda x: _take_rows(x[:, :, :w + r], rows, shards)).replace(
            segment_ids=(jnp.arange(w + r)[None, :] < visible[:, None]).astype(jnp.int32),
            end=w)  # static: the pass's queries sit at slots w .. w + r - 1
        ref, n = reference[rows], ref_lengths[rows]  # [per_step, R], [per_step]
        valid = offsets[None, :] < n[:, None]
        toks = jnp.concatenate([first[:, None], ref[:, :-1]], axis=1)
        hidden, _ = model(toks, positions=visible[:, None] + offsets[None, :],
                          segment_ids=valid.astype(jnp.int32), cache=ctx_cache,
                          return_hidden=True)
        # float32 log-softmax (chunked inside): LP differences are small, bf16 would blur them.
        logp = model.logprobs(hidden, ref, chunk_size=logprob_chunk, temperature=temperature)
        total = jnp.sum(jnp.where(valid, logp, 0.0), axis=1)
        return total / jnp.maximum(n, 1).astype(jnp.float32)

    branches = [functools.partial(reference_pass, w) for w in windows]

    def step(_, xs):
        rows, visible, first, window = xs
        return None, jax.lax.switch(window, branches, rows, visible, first)

    _, lp = jax.lax.scan(step, None, (ctx_row, ctx_visible, ctx_first, ctx_window))
    return lp.reshape(-1)


def _take_rows(x, rows, shards: int):
    """x[rows] along axis 0, each of `shards` equal parts of `rows` indexing its own part of
    x: a gather batched over the parts, which the partitioner keeps on each device (a plain
    take of arbitrary rows would gather the whole sharded cache to every device)."""
    if shards == 1:
        return jnp.take(x, rows, axis=0)
    b = x.shape[0]
    parts = constrain(x.reshape(shards, b // shards, *x.shape[1:]),
                      ("batch",) + (None,) * x.ndim)
    first_row = jnp.arange(shards, dtype=rows.dtype) * (b // shards)  # of each part
    local = rows.reshape(shards, -1) - first_row[:, None]
    out = jax.vmap(lambda part, i: jnp.take(part, i, axis=0))(parts, local)
    return out.reshape(-1, *x.shape[1:])
