"""The SFT loss: target weights by hand; packed == unpacked == a per-example reference."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opera_jax import load_pretrained
from opera_jax.data.packing import TokenizeSFT, batch_examples
from opera_jax.data.toy_domain import examples as toy_examples
from opera_jax.tokenizer import load_tokenizer
from opera_jax.train.sft_loss import target_weights, token_mean_nll


def test_target_weights_by_hand():
    batch = {"segment_ids": jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]]),
             "loss_mask": jnp.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])}
    # Entry t weighs predicting token t+1: row 0 token 3 starts segment 2 (its loss_mask of 1
    # must not count: its input token 2 belongs to segment 1); padding never counts.
    np.testing.assert_array_equal(target_weights(batch), [[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]])


@pytest.fixture(scope="module")
def sharp_model(hf_tiny):
    """The random tiny checkpoint with larger weights, so predictions and attention are far
    from uniform and a wrong mask or a leak between packed examples changes the loss visibly."""
    model, _ = load_pretrained(hf_tiny[0])
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda p: p * 8.0 if p.ndim >= 2 else p * 3.0, params)
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def examples():
    tok = load_tokenizer(None)
    tokenize = TokenizeSFT(tok, eos_id=1021, seq_len=256)
    return [tokenize(r) for r in toy_examples(3, seed=5)]


def reference_loss(model, exs):
    """Each example as its own row of the plain causal forward (no segment ids; right padding
    cannot affect earlier tokens), full float32 logits, float64 log-softmax in numpy; token
    mean over all response targets of all examples."""
    n = max(len(ex["tokens"]) for ex in exs)
    tokens = np.stack([np.pad(ex["tokens"], (0, n - len(ex["tokens"]))) for ex in exs])
    logits = np.asarray(jax.jit(model)(jnp.asarray(tokens)), np.float64)  # [E, n, V]
    total, count = 0.0, 0
    for i, ex in enumerate(exs):
        m = len(ex["tokens"])
        z = logits[i, :m - 1]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        picked = logp[np.arange(m - 1), ex["tokens"][1:]]
        w = ex["loss_mask"][1:]
        total -= float((picked * w).sum())
        count += int(w.sum())
    return total / count


def batch_of(exs, **kw):
    ds = grain.MapDataset.source(exs).to_iter_dataset()
    (batch,) = list(batch_examples(ds, pad_id=1019, **kw))
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_packed_and_unpacked_batches_give_the_reference_loss(sharp_model, examples):
    lengths = [len(ex["tokens"]) for ex in examples]
    assert sum(lengths) <= 768  # all three share one packed row
    packed = batch_of(examples, seq_len=768, batch_size=1, packing=True)
    np.testing.assert_array_equal(np.asarray(packed["segment_ids"]).max(), 3)
    unpacked = batch_of(examples, seq_len=256, batch_size=3, packing=False)
    loss = jax.jit(lambda b: token_mean_nll(sharp_model, b, chunk_size=64))
    want = reference_loss(sharp_model, examples)
    assert abs(want - np.log(1024)) > 0.5  # the sharpened model is far from uniform
    np.testing.assert_allclose(float(loss(packed)), want, rtol=2e-5)
    np.testing.assert_allclose(float(loss(unpacked)), want, rtol=2e-5)

    # The same packed row read as one sequence (attention across examples) is a different
    # loss: the reference above would catch a packing leak.
    leaky = {**packed, "segment_ids": (packed["segment_ids"] > 0).astype(jnp.int32),
             "positions": jnp.arange(768, dtype=jnp.int32)[None]}
    leaky_loss = float(loss(leaky))
    assert abs(leaky_loss - want) > 1e-2
