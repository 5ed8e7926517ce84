"""Attention backends and masks against a loop-over-positions numpy reference."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.model import attention as A
from opera_jax.model import splash_tpu


def _numpy_reference(q, k, v, mask):
    """Per (batch, query, head) softmax over the visible keys, in float64."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for ti in range(t):
            vis = np.nonzero(mask[bi, ti])[0]
            if len(vis) == 0:
                continue
            for ni in range(n):
                s = k[bi, vis, ni // g] @ q[bi, ti, ni] / np.sqrt(h)
                p = np.exp(s - s.max())
                out[bi, ti, ni] = (p / p.sum()) @ v[bi, vis, ni // g]
    return out


def _inputs(b=2, t=7, n=4, kh=2, h=8, seed=0):
    rng = np.random.RandomState(seed)
    q = rng.randn(b, t, n, h).astype(np.float32)
    k = rng.randn(b, t, kh, h).astype(np.float32)
    v = rng.randn(b, t, kh, h).astype(np.float32)
    return q, k, v


def _mask_by_hand(seg, causal=True):
    b, t = seg.shape
    m = np.zeros((b, t, t), bool)
    for bi in range(b):
        for i in range(t):
            for j in range(t):
                m[bi, i, j] = seg[bi, i] == seg[bi, j] != 0 and (j <= i or not causal)
    return m


@pytest.mark.parametrize("seg", [
    np.ones((2, 7), np.int32),                                  # causal
    np.array([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]),  # left padding
    np.array([[1, 1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 2, 2, 0]]),  # packed + right pad
])
def test_xla_attention_matches_numpy(seg):
    q, k, v = _inputs()
    slots = np.broadcast_to(np.arange(7), (2, 7))
    got = A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=jnp.asarray(seg),
                      kv_segment_ids=jnp.asarray(seg), q_slots=slots, kv_slots=slots, impl="xla")
    mask = _mask_by_hand(seg)
    np.testing.assert_array_equal(
        np.asarray(A.build_mask(jnp.asarray(seg), jnp.asarray(seg), slots, slots)), mask)
    np.testing.assert_allclose(np.asarray(got), _numpy_reference(q, k, v, mask), atol=1e-5)
    # pads (segment 0) see nothing and return zeros
    assert np.all(np.asarray(got)[seg == 0] == 0)


def test_dense_mask_is_anded():
    q, k, v = _inputs(seed=1)
    seg = np.ones((2, 7), np.int32)
    slots = np.broadcast_to(np.arange(7), (2, 7))
    extra = np.random.RandomState(3).rand(2, 7, 7) > 0.3
    got = A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=seg,
                      kv_segment_ids=seg, q_slots=slots, kv_slots=slots, mask=jnp.asarray(extra),
                      impl="xla")
    want = _numpy_reference(q, k, v, _mask_by_hand(seg) & extra)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_xla_equals_jax_reference_causal():
    q, k, v = _inputs(b=3, t=16, n=8, kh=2, h=16, seed=2)
    slots = np.broadcast_to(np.arange(16), (3, 16))
    seg = np.ones((3, 16), np.int32)
    ours = A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=seg,
                       kv_segment_ids=seg, q_slots=slots, kv_slots=slots, impl="xla")
    theirs = jax.nn.dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                          is_causal=True, implementation="xla")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)


def test_unavailable_backend_falls_back_and_logs_once(caplog):
    q, k, v = _inputs()
    seg = np.ones((2, 7), np.int32)
    slots = np.broadcast_to(np.arange(7), (2, 7))
    A._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        outs = [A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=seg,
                            kv_segment_ids=seg, q_slots=slots, kv_slots=slots, impl="cudnn",
                            layout=A.Layout.CAUSAL) for _ in range(2)]
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "'cudnn'" in msgs[0] and "platform is cpu" in msgs[0]
    np.testing.assert_allclose(np.asarray(outs[0]),
                               _numpy_reference(q, k, v, _mask_by_hand(seg)), atol=1e-5)


def test_default_impl_by_platform():
    assert A.default_impl("gpu") is A.AttentionImpl.CUDNN
    assert A.default_impl("tpu") is A.AttentionImpl.SPLASH
    assert A.default_impl("cpu") is A.AttentionImpl.XLA


def test_packed_sequences_do_not_attend_across_segments(hf_tiny):
    """A packed row gives each sequence the logits it has alone."""
    from opera_jax import load_pretrained

    model, _ = load_pretrained(hf_tiny[0])
    rng = np.random.RandomState(7)
    a, b = rng.randint(0, 1019, 9), rng.randint(0, 1019, 6)
    packed = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 9 + [2] * 6 + [0, 0]], np.int32)
    got = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(seg)))
    alone_a = np.asarray(model(jnp.asarray(a[None], jnp.int32)))[0]
    alone_b = np.asarray(model(jnp.asarray(b[None], jnp.int32)))[0]
    np.testing.assert_allclose(got[0, :9], alone_a, atol=1e-5)
    np.testing.assert_allclose(got[0, 9:15], alone_b, atol=1e-5)


def test_splash_kernel_in_interpreter_equals_xla():
    """The TPU splash path (Pallas interpreter on CPU) equals xla on causal + packed segments."""
    b, t, n, kh, h = 2, 256, 4, 2, 128
    rng = np.random.RandomState(5)
    q = rng.randn(b, t, n, h).astype(np.float32)
    k = rng.randn(b, t, kh, h).astype(np.float32)
    v = rng.randn(b, t, kh, h).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    seg[1, 100:] = 2  # two packed sequences in row 1
    slots = np.broadcast_to(np.arange(t), (b, t))
    want = A.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_segment_ids=seg,
                       kv_segment_ids=seg, q_slots=slots, kv_slots=slots, impl="xla")
    got = splash_tpu.splash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                      jnp.asarray(seg), jnp.asarray(seg), interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
