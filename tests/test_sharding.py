"""Sharded model on 8 fake CPU devices (mesh data=2, fsdp=2, tensor=2) equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from opera_jax import load_pretrained, make_mesh
from opera_jax.sharding import activation_mesh, logical_to_spec


def test_make_mesh_sizes():
    mesh = make_mesh(2, -1, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(1, -1, 1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="needs 12 devices, 8 available"):
        make_mesh(3, 2, 2)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh(-1, -1, 1)


def test_logical_rules_drop_axes_that_do_not_divide():
    mesh = make_mesh(2, 2, 2)
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 4, 32), mesh) == P("fsdp", "tensor", None)
    # 3 kv heads cannot be split over tensor=2: replicated
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 3, 32), mesh) == P("fsdp", None, None)
    assert logical_to_spec(("batch", "seq"), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert logical_to_spec(("batch", "seq"), (2, 5), mesh) == P("data", None)
    with pytest.raises(KeyError, match="not in sharding.LOGICAL_RULES"):
        logical_to_spec(("nonsense",))


def test_sharded_logits_equal_single_device(hf_tiny):
    assert jax.device_count() == 8
    path, _ = hf_tiny
    single, _ = load_pretrained(path)
    mesh = make_mesh(2, 2, 2)
    sharded, _ = load_pretrained(path, mesh=mesh)

    q = sharded.layers[0].self_attn.q_proj[...]  # [D=64, N=4, H=32]
    assert q.sharding.spec == P("fsdp", "tensor", None)
    shard_shapes = {s.data.shape for s in q.addressable_shards}
    assert shard_shapes == {(32, 2, 32)}  # really split, not replicated
    assert sharded.embed_tokens[...].sharding.spec == P("tensor", "fsdp")
    assert {s.data.shape for s in sharded.embed_tokens[...].addressable_shards} == {(512, 32)}

    ids = np.random.RandomState(0).randint(0, 1024, (4, 24)).astype(np.int32)
    want = np.asarray(single(jnp.asarray(ids)))
    with activation_mesh(mesh):
        tokens = jax.device_put(ids, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
        got = jax.jit(lambda m, t: m(t))(sharded, tokens)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
