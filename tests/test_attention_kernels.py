"""The fused attention kernels against the xla path, in float32, for every call shape.

GPU Pallas flash (model/flash_gpu.py) and the TPU kernels (splash_tpu.py, decode_tpu.py) run in
the Pallas interpreter here; the planner's TPU tests compile them for a real topology
(tests/test_plan.py, slow). cuDNN needs a GPU: benchmarks/gpu_suite.py checks it there.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opera_jax.model import attention as A
from opera_jax.model import Qwen3, Qwen3Config
from opera_jax.model.blockwise import blockwise_attention
from opera_jax.model.decode_tpu import decode_attention
from opera_jax.model.flash_gpu import flash_attention
from opera_jax.model.splash_tpu import splash_attention
from opera_jax.reward import RewardConfig, naive_reference_logprobs, reference_logprobs
from opera_jax.reward.contexts import Context
from opera_jax.sampling import Sampler


def _qkv(b, t, s, n, kh, h, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(b, t, n, h).astype(np.float32), rng.randn(b, s, kh, h).astype(np.float32),
            rng.randn(b, s, kh, h).astype(np.float32))


def _xla(q, k, v, qseg, kseg, offset):
    b, t = qseg.shape
    q_slots = np.asarray(offset)[:, None] + np.arange(t)[None]
    kv_slots = np.broadcast_to(np.arange(kseg.shape[1]), kseg.shape)
    return A.xla_attention(q, k, v, A.build_mask(qseg, kseg, q_slots, kv_slots))


def _shapes():
    """(name, q/k/v, q segment ids, kv segment ids, q offset) for each call shape."""
    out = []
    # Packed rows with left and right padding, no cache (SFT packing, sampler prefill).
    q, k, v = _qkv(2, 40, 40, 4, 2, 16, seed=1)
    seg = np.array([[0] * 5 + [1] * 20 + [2] * 15, [1] * 12 + [2] * 12 + [3] * 10 + [0] * 6])
    out.append(("packed", q, k, v, seg, seg, np.zeros(2, np.int32)))
    # Cached prefill: 24 new tokens after 13 (row 0) cache slots, keys buffer of 50.
    q, k, v = _qkv(2, 24, 50, 4, 2, 16, seed=2)
    kseg = np.zeros((2, 50), np.int32)
    kseg[:, :37] = 1
    kseg[1, :4] = 0  # left padding of row 1's prompt
    out.append(("cached", q, k, v, np.ones((2, 24), np.int32), kseg, np.array([13, 13])))
    # Reward window: a prefix of the cache visible (slots < visible), the pass's own tokens at
    # slots w .. w + r - 1 causally; invalid reference positions have segment 0.
    w, r = 32, 20
    q, k, v = _qkv(3, r, w + r, 8, 2, 16, seed=3)
    qseg = np.ones((3, r), np.int32)
    qseg[1, 15:] = 0
    kseg = np.zeros((3, w + r), np.int32)
    for i, visible in enumerate((9, 32, 1)):
        kseg[i, :visible] = 1
    kseg[:, w:] = qseg
    out.append(("reward_window", q, k, v, qseg, kseg, np.full(3, w, np.int32)))
    # Decode: one token per row against a left-padded cache.
    q, k, v = _qkv(3, 1, 64, 8, 2, 16, seed=4)
    kseg = np.ones((3, 64), np.int32)
    kseg[0, :10] = 0
    kseg[:, 41:] = 0
    out.append(("decode", q, k, v, np.ones((3, 1), np.int32), kseg, np.full(3, 40, np.int32)))
    return out


@pytest.mark.parametrize("name,q,k,v,qseg,kseg,offset", _shapes(), ids=[s[0] for s in _shapes()])
def test_flash_gpu_equals_xla_forward_and_gradients(name, q, k, v, qseg, kseg, offset):
    want = _xla(q, k, v, qseg, kseg, offset)
    got = flash_attention(q, k, v, qseg, kseg, offset, block_q=16, block_k=16, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    if name == "decode":
        return
    # Gradients of a nonlinear function of the output (padding rows are zero on both paths).
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * 1.3)  # noqa: E731
    g_want = jax.grad(loss(lambda q, k, v: _xla(q, k, v, qseg, kseg, offset)),
                      argnums=(0, 1, 2))(q, k, v)
    g_got = jax.grad(loss(lambda q, k, v: flash_attention(
        q, k, v, qseg, kseg, offset, block_q=16, block_k=16, interpret=True)),
        argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


@pytest.mark.parametrize("name,q,k,v,qseg,kseg,offset", _shapes(), ids=[s[0] for s in _shapes()])
def test_blockwise_stand_in_equals_xla(name, q, k, v, qseg, kseg, offset):
    """The planner's GPU stand-in computes what the kernels compute (forward and gradients)."""
    fn = lambda q, k, v: blockwise_attention(q, k, v, qseg, kseg, offset, block=16)  # noqa: E731
    want = _xla(q, k, v, qseg, kseg, offset)
    np.testing.assert_allclose(np.asarray(fn(q, k, v)), np.asarray(want), atol=2e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)) * 1.3)  # noqa: E731
    g_want = jax.grad(loss(lambda q, k, v: _xla(q, k, v, qseg, kseg, offset)),
                      argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.grad(loss(fn), argnums=(0, 1, 2))(q, k, v), g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)


@pytest.mark.parametrize("name,q,k,v,qseg,kseg,offset", _shapes()[:3],
                         ids=[s[0] for s in _shapes()[:3]])
def test_splash_equals_xla_on_real_rows(name, q, k, v, qseg, kseg, offset):
    """Splash needs head_dim 128; padding query rows (segment 0) are unused and not compared."""
    rng = np.random.RandomState(9)
    b, t, n, _ = q.shape
    kh = k.shape[2]
    q = rng.randn(b, t, n, 128).astype(np.float32)
    k = rng.randn(b, k.shape[1], kh, 128).astype(np.float32)
    v = rng.randn(*k.shape).astype(np.float32)
    want = np.asarray(_xla(q, k, v, qseg, kseg, offset))
    got = np.asarray(splash_attention(q, k, v, qseg, kseg, q_offset=int(offset[0]),
                                      interpret=True))
    real = qseg != 0
    np.testing.assert_allclose(got[real], want[real], atol=2e-5)


def test_tpu_decode_kernel_equals_xla():
    rng = np.random.RandomState(4)
    b, n, kh, h, s = 3, 8, 2, 128, 384
    q = rng.randn(b, 1, n, h).astype(np.float32)
    k = rng.randn(b, kh, s, h).astype(np.float32)
    v = rng.randn(b, kh, s, h).astype(np.float32)
    kseg = np.ones((b, s), np.int32)
    kseg[0, :7] = 0    # left padding
    kseg[1, :200] = 0  # a prompt starting after the first key blocks
    kseg[2] = 0        # a row that sees nothing: zeros
    slot = np.array([150, 300, 10], np.int32)
    for i in range(b):
        kseg[i, slot[i] + 1:] = 0
    want = _xla(q, np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2), np.ones((b, 1), np.int32), kseg,
                slot)
    got = decode_attention(q, k, v, np.ones((b, 1), np.int32), kseg, slot, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    assert np.all(np.asarray(got)[2] == 0)


def test_dispatch_routes_without_falling_back(caplog):
    """`flash` on the CPU is the kernel in the interpreter; `splash` for a TPU (interpreted)
    takes a static offset, and logs once why it cannot take a traced one."""
    name, q, k, v, qseg, kseg, offset = _shapes()[1]
    q_slots = offset[:, None] + np.arange(q.shape[1])[None]
    kv_slots = np.broadcast_to(np.arange(k.shape[1]), kseg.shape)
    kw = dict(q_segment_ids=qseg, kv_segment_ids=kseg, q_slots=q_slots, kv_slots=kv_slots)
    A._warn_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        got = A.attention(q, k, v, impl="flash", **kw)
    assert not caplog.records
    np.testing.assert_allclose(np.asarray(got), np.asarray(_xla(q, k, v, qseg, kseg, offset)),
                               atol=2e-5)
    rng = np.random.RandomState(2)
    q, k, v = (rng.randn(*x.shape[:-1], 128).astype(np.float32) for x in (q, k, v))
    with caplog.at_level(logging.WARNING, logger=A.__name__), A.for_platform("tpu",
                                                                              interpret=True):
        for _ in range(2):
            A.attention(q, k, v, impl="splash", q_offset=None, **kw)
        got = A.attention(q, k, v, impl="splash", q_offset=13, **kw)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "static query offset" in msgs[0], msgs
    np.testing.assert_allclose(np.asarray(got), np.asarray(_xla(q, k, v, qseg, kseg, offset)),
                               atol=2e-5)
    assert A.default_impl("gpu") is A.AttentionImpl.CUDNN


def _model(impl, **overrides):
    cfg = Qwen3Config.preset("tiny").replace(**overrides)
    model = Qwen3(cfg, dtype=jnp.float32, param_dtype=jnp.float32, attention_impl=impl,
                  rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)  # larger weights: peaked distributions
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4 if x.ndim >= 2 else x, state))


@pytest.mark.slow
def test_model_with_flash_samples_and_scores_like_xla():
    """The whole model on the GPU kernel (interpreted): left-padded prefill, cached decode
    (greedy tokens and log-probs) and the reward kernel's windows equal the xla model's."""
    prompts = [[5, 9, 200, 31, 7], [100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    outs = {}
    for impl in ("xla", "flash"):
        sampler = Sampler(_model(impl), pad_id=0)
        outs[impl] = sampler.sample(prompts, max_new_tokens=6, temperature=0.0)
    np.testing.assert_array_equal(outs["flash"].tokens, outs["xla"].tokens)
    np.testing.assert_allclose(outs["flash"].logprobs, outs["xla"].logprobs, atol=1e-4)

    seq = list(range(3, 60))
    contexts = [[Context(10), Context(25), Context(57)]]
    config = RewardConfig(batch_size=1, contexts_per_step=2, cache_windows=2, min_bucket=16)
    got = reference_logprobs(_model("flash"), [seq], [[7, 8, 9, 10]], contexts, config=config)
    want = naive_reference_logprobs(_model("xla"), [seq], [[7, 8, 9, 10]], contexts)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)


@pytest.mark.slow
def test_reward_kernel_on_tpu_kernels_equals_naive(caplog):
    """The reward kernel routed as on a TPU (splash, interpreted), its prefill in 3 chunks:
    each chunk's offset is static (chunks unrolled), so splash takes the prefill too, with no
    fallback logged, and the LPs equal the naive xla computation."""
    A._warn_once.cache_clear()
    seq = list(range(3, 43))
    contexts = [[Context(10), Context(25), Context(40)]]
    config = RewardConfig(batch_size=1, contexts_per_step=2, cache_windows=2, min_bucket=16,
                          prefill_chunk=16)
    with caplog.at_level(logging.WARNING, logger="opera_jax.model.attention"), \
            A.for_platform("tpu", interpret=True):
        got = reference_logprobs(_model("splash", head_dim=128), [seq], [[7, 8, 9, 10]],
                                 contexts, config=config)
    jax.clear_caches()  # traces made for the TPU route
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    want = naive_reference_logprobs(_model("xla", head_dim=128), [seq], [[7, 8, 9, 10]],
                                    contexts)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
