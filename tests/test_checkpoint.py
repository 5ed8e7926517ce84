"""Checkpoints: keep the last k, restore onto another mesh, data position and config saved."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from opera_jax import make_mesh
from opera_jax.data.pipeline import shuffled_source
from opera_jax.checkpoint import Checkpointer, config_diff
from opera_jax.train.state import TrainState, abstract_state, shardings_of


def small_state(mesh, step):
    """A TrainState over two parameters; values depend on `step`."""
    shard = NamedSharding(mesh, P("fsdp", "tensor"))
    rep = NamedSharding(mesh, P())
    params = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4) * step, shard),
              "layers": {0: {"b": jax.device_put(jnp.full((4,), float(step)), rep)}}}
    tx = optax.adam(0.1)
    abstract = abstract_state(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params), tx, mesh)
    opt = jax.jit(tx.init, out_shardings=shardings_of(abstract).opt_state)(params)
    opt = jax.tree.map(lambda x: x + step if x.dtype == jnp.float32 else x, opt)
    state = TrainState(step=jax.device_put(jnp.int32(step), rep), params=params, opt_state=opt,
                       rng=jax.device_put(jax.random.key_data(jax.random.key(step)), rep))
    return state, abstract


def test_save_keep_restore_onto_another_mesh(tmp_path, caplog):
    config = {"sft": {"steps": 4, "lr": 0.5}, "name": "x"}
    data = iter(shuffled_source(list(range(50)), seed=0, process_index=0,
                                process_count=1).to_iter_dataset())
    saving_mesh = make_mesh(1, 8, 1)
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    for step in range(1, 5):
        next(data)
        state, _ = small_state(saving_mesh, step)
        ckpt.save(step, state, config=config, data_iter=data)
    upcoming = [next(data) for _ in range(3)]  # what a resumed run must see next
    ckpt.close()

    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    mesh = make_mesh(2, 2, 2)  # another layout than the saved one
    _, abstract = small_state(mesh, 0)
    fresh = iter(shuffled_source(list(range(50)), seed=0, process_index=0,
                                 process_count=1).to_iter_dataset())
    changed = {"sft": {"steps": 8, "lr": 0.5}, "name": "x"}
    with caplog.at_level(logging.WARNING, logger="opera_jax.checkpoint"):
        restored, saved_config = ckpt.restore(4, abstract, data_iter=fresh, config=changed)
    ckpt.close()

    assert "sft.steps: 4 -> 8" in caplog.text
    assert saved_config == {"sft": {"steps": 4, "lr": 0.5}, "name": "x"}
    assert [next(fresh) for _ in range(3)] == upcoming
    want, _ = small_state(mesh, 4)
    assert int(restored.step) == 4
    np.testing.assert_array_equal(restored.params["w"], np.arange(32.0).reshape(8, 4) * 4)
    np.testing.assert_array_equal(restored.params["layers"][0]["b"], [4.0] * 4)
    np.testing.assert_array_equal(restored.rng, jax.random.key_data(jax.random.key(4)))
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, want.opt_state)
    # Every leaf lands in the target's sharding (fsdp x tensor on the new mesh).
    assert restored.params["w"].sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    assert jax.tree.all(jax.tree.map(lambda x, a: x.sharding == a.sharding, restored, abstract))


def test_config_diff_lists_dotted_keys():
    assert config_diff({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 5}, "e": 0}) == [
        "b.c: 2 -> 5", "b.d: 3 -> '<absent>'", "e: '<absent>' -> 0"]
