"""Logits parity with the PyTorch reference (transformers Qwen3ForCausalLM, float32, CPU)."""

import numpy as np
import jax.numpy as jnp
import pytest
import torch

from conftest import make_hf_qwen3
from opera_jax import load_pretrained
from opera_jax.model import KVCache

TOL = 1e-4


def _torch_logits(model, ids, mask=None, positions=None):
    kwargs = {}
    if mask is not None:
        kwargs["attention_mask"] = torch.tensor(mask)
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(torch.tensor(ids), **kwargs).logits.numpy()


@pytest.mark.parametrize("fixture", ["hf_tiny", "hf_tiny_untied"])
def test_logits_match_transformers(fixture, request):
    path, ref = request.getfixturevalue(fixture)
    model, _ = load_pretrained(path)
    ids = np.random.RandomState(0).randint(0, 1024, (3, 29))
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    want = _torch_logits(ref, ids)
    assert got.shape == want.shape == (3, 29, 1024)
    assert np.abs(got - want).max() <= TOL


def test_untied_head_differs_from_embedding(hf_tiny_untied):
    path, ref = hf_tiny_untied
    model, _ = load_pretrained(path)
    np.testing.assert_allclose(np.asarray(model.lm_head[...]),
                               ref.lm_head.weight.detach().numpy().T, atol=0)
    assert not np.allclose(np.asarray(model.lm_head[...]).T, np.asarray(model.embed_tokens[...]))


def test_left_padded_batch(hf_tiny):
    path, ref = hf_tiny
    model, _ = load_pretrained(path)
    rng = np.random.RandomState(1)
    lengths = [21, 9, 15]
    t = max(lengths)
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for b, n in enumerate(lengths):
        ids[b, t - n:] = rng.randint(0, 1019, n)
        mask[b, t - n:] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    want = _torch_logits(ref, ids, mask, positions)
    got = np.asarray(model(jnp.asarray(ids, jnp.int32), segment_ids=jnp.asarray(mask, jnp.int32)))
    for b, n in enumerate(lengths):
        assert np.abs(got[b, t - n:] - want[b, t - n:]).max() <= TOL
        # each row also equals the same prompt run alone, unpadded
        alone = _torch_logits(ref, ids[b:b + 1, t - n:])[0]
        assert np.abs(got[b, t - n:] - alone).max() <= TOL


def test_sharded_safetensors_checkpoint(tmp_path):
    ref = make_hf_qwen3(tmp_path, tie=False, seed=3, max_shard_size="100KB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    model, _ = load_pretrained(tmp_path)
    ids = np.random.RandomState(2).randint(0, 1024, (2, 13))
    assert np.abs(np.asarray(model(jnp.asarray(ids, jnp.int32))) - _torch_logits(ref, ids)).max() <= TOL


def test_kv_cache_incremental_equals_full_forward(hf_tiny):
    path, ref = hf_tiny
    model, _ = load_pretrained(path)
    ids = np.random.RandomState(4).randint(0, 1024, (2, 12))
    want = _torch_logits(ref, ids)
    cache = KVCache.init(model.config, 2, 16)
    outs = []
    for lo, hi in [(0, 5), (5, 6), (6, 12)]:
        out, cache = model(jnp.asarray(ids[:, lo:hi], jnp.int32), cache=cache)
        outs.append(np.asarray(out))
    assert int(cache.end) == 12
    assert np.abs(np.concatenate(outs, axis=1) - want).max() <= TOL


def test_bfloat16_load_is_close(hf_tiny):
    path, ref = hf_tiny
    model, _ = load_pretrained(path, dtype="bfloat16")
    assert model.embed_tokens[...].dtype == jnp.bfloat16
    ids = np.random.RandomState(5).randint(0, 1024, (1, 16))
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    want = _torch_logits(ref, ids)
    # bf16 has 8 mantissa bits: agree to a few percent of the logit scale, and on the argmax
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9


def test_remat_gives_the_same_gradients(hf_tiny):
    import jax
    from flax import nnx

    ids = jnp.asarray(np.random.RandomState(6).randint(0, 1024, (2, 9)), jnp.int32)
    grads = []
    for remat in (False, True):
        model, _ = load_pretrained(hf_tiny[0], remat=remat)
        graphdef, params = nnx.split(model)

        def loss(params):
            m = nnx.merge(graphdef, params)
            return -m.logprobs(m(ids[:, :-1], return_hidden=True), ids[:, 1:]).mean()

        grads.append(jax.jit(jax.grad(loss))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    # and the gradient is not trivially zero
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 1e-3
