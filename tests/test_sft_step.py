"""The jitted SFT step: sharded over 8 fake devices with 2 micro-batches == one device, one
batch; traced once across different batches."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from opera_jax import make_mesh
from opera_jax import sharding as sh
from opera_jax.data.pipeline import sft_batches
from opera_jax.data.toy_domain import examples
from opera_jax.cli import load_config_file
from opera_jax.config import build
from opera_jax.config.runs import parse
from opera_jax.config.sections import Dtype
from opera_jax.tokenizer import load_tokenizer
from opera_jax.train import state as state_lib
from opera_jax.train.sft import check_config, make_train_step

CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "sft_tiny.py")
B, T = 8, 256


@pytest.fixture(scope="module")
def config(hf_tiny):
    c = load_config_file(CONFIG)
    c.model.hf_dir = hf_tiny[0]
    c.model.dtype = "float32"
    return parse(c)


@pytest.fixture(scope="module")
def batches():
    it = iter(sft_batches(examples(64, seed=0), load_tokenizer(None), eos_id=1021, pad_id=1019,
                          seq_len=T, global_batch_size=B, seed=0, num_threads=0,
                          process_index=0, process_count=1))
    return [next(it) for _ in range(2)]


def run_steps(config, mesh, grad_accum, batches):
    """Two steps on `mesh`; returns (final params on host, metrics per step, trace count)."""
    graphdef, params_abstract = build.abstract_params(config.model, mesh)
    tx, schedule = state_lib.make_optimizer(config.sft.optim, total_updates=10)
    abstract = state_lib.abstract_state(params_abstract, tx, mesh)
    state = state_lib.init_state(build.load_params(config.model, mesh), tx, abstract, seed=0)
    fn = make_train_step(graphdef, tx, schedule, grad_accum=grad_accum, chunk_size=64)
    traces = []

    def counted(state, batch):
        traces.append(1)  # runs only while tracing
        return fn(state, batch)

    batch_sharding = sh.named_sharding(mesh, ("batch", "seq"), (B, T))
    sharding = state_lib.shardings_of(abstract)
    step = jax.jit(counted, in_shardings=(sharding, batch_sharding),
                   out_shardings=(sharding, None), donate_argnums=0)
    metrics = []
    with sh.activation_mesh(mesh):
        for b in batches:
            state, m = step(state, {k: jax.device_put(v, batch_sharding) for k, v in b.items()})
            metrics.append(jax.device_get(m))
    assert state.params["embed_tokens"].sharding == sharding.params["embed_tokens"]
    return jax.device_get(state.params), metrics, len(traces), int(state.step)


def test_sharded_accumulated_step_matches_single_device(config, batches):
    assert not np.array_equal(batches[0]["tokens"], batches[1]["tokens"])
    one = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    p1, m1, traces1, step1 = run_steps(config, one, 1, batches)
    p8, m8, traces8, step8 = run_steps(config, make_mesh(2, 2, 2), 2, batches)
    assert traces1 == traces8 == 1 and step1 == step8 == 2
    for a, b in zip(m1, m8):
        for key in ("loss", "grad_norm", "lr", "loss_tokens"):
            np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=key)
    assert m1[0]["loss_tokens"] == sum(
        int(((b["loss_mask"][:, 1:] > 0) & (b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1])
             ).sum()) for b in batches[:1])
    # Adam divides by sqrt(v): a coordinate with a near-zero gradient can move by a visible
    # share of lr (3e-3) from float32 summation order alone; 1 % of lr bounds that.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=3e-5), p1, p8)


def test_batch_the_mesh_cannot_split_is_refused(config):
    # micro-batch of 2 rows on 4 shards
    config = dataclasses.replace(config, sft=dataclasses.replace(config.sft, batch_size=8,
                                                                 grad_accum=4))
    with pytest.raises(ValueError, match="batch_size 8 / sft.grad_accum 4 .* mesh size 4"):
        check_config(config, make_mesh(2, 2, 2))


def test_bf16_compute_keeps_float32_master_weights_and_moments(config):
    model = dataclasses.replace(config.model, dtype=Dtype.BFLOAT16, param_dtype=Dtype.FLOAT32)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    graphdef, params = build.abstract_params(model, mesh)
    tx, _ = state_lib.make_optimizer(config.sft.optim, total_updates=10)
    abstract = state_lib.abstract_state(params, tx, mesh)
    adam = abstract.opt_state[1][0]
    leaves = jax.tree.leaves(abstract.params) + jax.tree.leaves((adam.mu, adam.nu))
    assert {x.dtype for x in leaves} == {np.dtype("float32")}
    model = nnx.merge(graphdef, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), params))
    assert model.dtype == np.dtype("bfloat16")
