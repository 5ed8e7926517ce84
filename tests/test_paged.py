"""Paged KV pieces on their own: the page allocator and the prefix cache by hand, paged
attention (XLA tiles and the Pallas kernels in interpret mode) against a per-row numpy loop,
and the decoder over a `PagedKVCache` (chunked prefill + one decode step) against a plain
forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import opera_jax
from opera_jax.model import paged
from opera_jax.sampling import pages
from opera_jax.sampling.prefix_cache import PrefixCache


def test_allocator_by_hand():
    a = pages.PageAlloc.init(8)  # pages 1..7; 0 is the null page
    assert int(a.top) == 7 and int(a.in_use()) == 0
    a, got = pages.alloc(a, jnp.array([True, False, True, True]))
    np.testing.assert_array_equal(got, [1, 0, 2, 3])
    assert int(a.top) == 4
    np.testing.assert_array_equal(a.refs, [0, 1, 1, 1, 0, 0, 0, 0])
    # Page 2 shared by two more holders (listed twice in one call).
    a = pages.retain(a, jnp.array([2, 2, 3, 0]), jnp.array([True, True, False, True]))
    np.testing.assert_array_equal(a.refs, [0, 1, 3, 1, 0, 0, 0, 0])
    # Releasing 2 twice and 1 and 3 once: 1 and 3 are free, 2 keeps one holder.
    a = pages.release(a, jnp.array([[2, 1], [2, 3]]), jnp.array([[True, True], [True, True]]))
    np.testing.assert_array_equal(a.refs, [0, 0, 1, 0, 0, 0, 0, 0])
    assert int(a.top) == 6 and int(a.in_use()) == 1
    assert sorted(np.asarray(a.free[:6]).tolist()) == [1, 3, 4, 5, 6, 7]
    a, got = pages.alloc(a, jnp.array([True, True]))  # the most recently freed first
    np.testing.assert_array_equal(got, [3, 1])
    a = pages.release(a, jnp.array([2, 3, 1]), jnp.array([True, True, True]))
    assert int(a.top) == 7 and not np.asarray(a.refs).any()
    assert sorted(np.asarray(a.free[:7]).tolist()) == list(range(1, 8))


def test_prefix_cache_by_hand():
    c = PrefixCache(page_size=2)
    assert c.insert([1, 2, 3, 4, 5], [7, 8]) == [7, 8] and len(c) == 2
    assert [n.page for n in c.match([1, 2, 3, 4, 9], max_pages=5)] == [7, 8]
    assert [n.page for n in c.match([1, 2, 3, 9], max_pages=5)] == [7]
    assert [n.page for n in c.match([1, 2, 3, 4], max_pages=1)] == [7]
    assert c.match([2, 1, 3, 4], max_pages=5) == []
    # The same prefix prefilled again under other pages: the cached ones stay.
    assert c.insert([1, 2, 3, 4, 6, 6], [11, 12, 13]) == [13]
    assert [n.page for n in c.match([1, 2, 3, 4, 6, 6], max_pages=3)] == [7, 8, 13]
    # Log-probs: a node without them does not match when they are needed.
    assert c.match([1, 2, 3, 4], max_pages=2, need_logprobs=True) == []
    c.insert([1, 2, 3, 4], [20, 21], logprobs=np.array([0.0, -1.0, -2.0, -3.0]))
    hit = c.match([1, 2, 3, 4], max_pages=2, need_logprobs=True)
    assert [n.page for n in hit] == [7, 8]
    np.testing.assert_array_equal(hit[1].logprobs, [-2.0, -3.0])
    # Eviction takes least recently used leaves, never a kept node, parents after children.
    c.match([1, 2, 3, 4, 6, 6], max_pages=3)
    assert c.evict(1, keep=[]) == [13] and len(c) == 2
    assert c.evict(5, keep=hit[:1]) == [8] and len(c) == 1
    assert c.clear() == [7] and len(c) == 0


def _reference(q, kp, vp, table, lengths):
    """Per row and head: softmax over positions 0 .. lengths-1 read through the table."""
    b, n, h = q.shape
    kh, _, p, _ = kp.shape
    out = np.zeros((b, n, h))
    for bi in range(b):
        pos = np.arange(lengths[bi])
        pg = table[bi, pos // p]
        for ni in range(n):
            k, v = kp[ni // (n // kh), pg, pos % p], vp[ni // (n // kh), pg, pos % p]
            s = k @ q[bi, ni] / np.sqrt(h)
            e = np.exp(s - s.max())
            out[bi, ni] = (e / e.sum()) @ v
    return out


def _paged_inputs(seed=0, b=6, n=4, kh=2, h=32, p=4, j=8, m=40):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, n, h)).astype(np.float32)
    kp = rng.normal(size=(kh, m, p, h)).astype(np.float32)
    vp = rng.normal(size=(kh, m, p, h)).astype(np.float32)
    table = rng.integers(1, m, size=(b, j)).astype(np.int32)  # shared and scattered pages
    lengths = np.array([1, 5, j * p, 17, 9, 30], np.int32)[:b]
    return q, kp, vp, table, lengths


@pytest.mark.parametrize("tile,block", [(0, 8), (2, 2), (3, 3), (1, 1)])
def test_decode_attention_xla_tiles(tile, block):
    q, kp, vp, table, lengths = _paged_inputs()
    got = paged.decode_attention_xla(*map(jnp.asarray, (q, kp, vp, table, lengths)),
                                     slot_tile=tile, page_block=block)
    np.testing.assert_allclose(got, _reference(q, kp, vp, table, lengths), atol=2e-6)


@pytest.mark.parametrize("kernel,atol", [(paged.PagedKernel.PALLAS_GPU, 2e-6),
                                         # the TPU kernel reads the pages as bfloat16
                                         (paged.PagedKernel.PALLAS_TPU, 3e-2)])
def test_decode_attention_pallas_interpreted(kernel, atol):
    q, kp, vp, table, lengths = _paged_inputs(seed=1)
    got = paged.decode_attention_pallas(*map(jnp.asarray, (q, kp, vp, table, lengths)),
                                        kernel=kernel, page_block=2, interpret=True)
    np.testing.assert_allclose(got, _reference(q, kp, vp, table, lengths), atol=atol)


def test_decoder_over_paged_cache_matches_plain_forward():
    cfg = opera_jax.Qwen3Config.preset("tiny")
    model = opera_jax.init_model(cfg, seed=3)
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda params, tokens, cache: nnx.merge(graphdef, params)(tokens, cache=cache))
    rng = np.random.default_rng(0)
    p, j = 4, 8
    lengths = [13, 6]  # row 1 has padding in its second chunk
    seqs = [rng.integers(0, cfg.vocab_size, size=n) for n in lengths]
    # Each row's pages, scattered over a pool of 24 (page 0 is the null page).
    table = np.zeros((2, j), np.int32)
    table[0, :4], table[1, :2] = [5, 2, 9, 17], [11, 3]
    shape = (cfg.num_key_value_heads, 24, p, cfg.head_dim)
    k = tuple(jnp.zeros(shape) for _ in range(cfg.num_hidden_layers))
    v = tuple(jnp.zeros(shape) for _ in range(cfg.num_hidden_layers))
    logits = []
    for start in (0, 8):  # two chunks of 8 positions (the last token is decoded below)
        tokens = np.zeros((2, 8), np.int32)
        valid = np.zeros((2, 8), bool)
        for b, s in enumerate(seqs):
            part = s[start:min(start + 8, len(s) - 1)]
            tokens[b, :len(part)], valid[b, :len(part)] = part, True
        cache = paged.PagedKVCache(k=k, v=v, table=jnp.asarray(table),
                                   starts=jnp.full((2,), start, jnp.int32),
                                   valid=jnp.asarray(valid))
        out, cache = run(params, jnp.asarray(tokens), cache)  # default positions: starts + t
        k, v = cache.k, cache.v
        logits.append(np.asarray(out))
    last = np.array([s[-1] for s in seqs], np.int32)[:, None]
    starts = jnp.asarray([n - 1 for n in lengths], jnp.int32)
    full = [np.asarray(model(jnp.asarray(s[None])))[0] for s in seqs]  # [T, V] each
    # One decode step for both rows, XLA kernel (the Pallas ones: tested on their own above).
    cache = paged.PagedKVCache(k=k, v=v, table=jnp.asarray(table), starts=starts,
                               valid=jnp.ones((2, 1), bool),
                               attention=paged.PagedAttention(slot_tile=1, page_block=2))
    step, _ = run(params, jnp.asarray(last), cache)
    for b, s in enumerate(seqs):
        got = np.concatenate([logits[0][b], logits[1][b]])[:len(s) - 1]
        np.testing.assert_allclose(got, full[b][:-1], atol=2e-5)
        np.testing.assert_allclose(np.asarray(step)[b, 0], full[b][-1], atol=2e-5)
