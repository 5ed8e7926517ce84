"""The chunked float32 log-prob helper against full log_softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.model.logprobs import token_logprobs


@pytest.mark.parametrize("t,chunk", [(13, 4), (8, 8), (5, 512)])
def test_token_logprobs_equal_log_softmax(t, chunk):
    rng = np.random.RandomState(0)
    hidden = rng.randn(2, t, 16).astype(np.float32)
    head = rng.randn(16, 50).astype(np.float32)
    targets = rng.randint(0, 50, (2, t))
    logits = hidden.astype(np.float64) @ head
    logp_full = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(logp_full, targets[..., None], -1)[..., 0]
    got, ent = token_logprobs(jnp.asarray(hidden), jnp.asarray(targets), jnp.asarray(head),
                              chunk_size=chunk, return_entropy=True)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    p = np.exp(logp_full)
    np.testing.assert_allclose(np.asarray(ent), -(p * logp_full).sum(-1), atol=1e-4)


def test_temperature_and_gradient():
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(1, 6, 8), jnp.float32)
    head = jnp.asarray(rng.randn(8, 20), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 20, (1, 6)))
    ref = lambda h: jnp.take_along_axis(jax.nn.log_softmax(h @ head / 0.7), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_logprobs(hidden, targets, head, chunk_size=4, temperature=0.7),
                               ref(hidden), atol=1e-5)
    g1 = jax.grad(lambda h: token_logprobs(h, targets, head, chunk_size=4).sum())(hidden)
    g2 = jax.grad(lambda h: jnp.take_along_axis(jax.nn.log_softmax(h @ head), targets[..., None], -1).sum())(hidden)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-5)


def test_model_logprobs_match_logits(hf_tiny):
    from opera_jax import load_pretrained

    model, _ = load_pretrained(hf_tiny[0])
    ids = jnp.asarray(np.random.RandomState(2).randint(0, 1024, (2, 10)), jnp.int32)
    logits = model(ids)
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1)[..., 0]
    got = model.logprobs(model(ids, return_hidden=True), ids, chunk_size=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
