"""Creating a Qwen3 directly in its final sharding.

`abstract_model` gives shapes, dtypes and logical axes without allocating anything;
`init_model` draws random weights inside one jit whose `out_shardings` put every parameter on
its mesh shard, so no device ever holds an unsharded copy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from opera_jax import sharding as sh
from opera_jax.model.config import Qwen3Config
from opera_jax.model.qwen3 import Qwen3


def model_kwargs(*, dtype="float32", param_dtype=None, attention_impl=None, remat=False,
                 lora=None, quant=None) -> dict:
    """Normalised keyword arguments for `Qwen3(...)`; param_dtype defaults to dtype."""
    dtype = jnp.dtype(dtype)
    return dict(dtype=dtype, param_dtype=jnp.dtype(param_dtype or dtype),
                attention_impl=attention_impl, remat=remat, lora=lora, quant=quant)


def abstract_model(config: Qwen3Config, **kwargs) -> Qwen3:
    """A Qwen3 whose parameters are ShapeDtypeStructs (nothing allocated)."""
    return nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0), **model_kwargs(**kwargs)))


def param_shardings(model: Qwen3 | nnx.State, mesh: Mesh | None):
    """Sharding of every parameter of a model (or of a state split from one): by logical axes
    on `mesh`, or device 0 without one."""
    state = model if isinstance(model, nnx.State) else nnx.state(model)
    if mesh is None:
        dev = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: dev, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return sh.state_shardings(state, mesh)


def init_model(config: Qwen3Config, *, mesh: Mesh | None = None, seed: int = 0, **kwargs) -> Qwen3:
    """A randomly initialised Qwen3 (normal(0, 0.02) weights, unit norms), created sharded."""
    graphdef, create = _sharded_init(config, mesh, tuple(sorted(model_kwargs(**kwargs).items())))
    return nnx.merge(graphdef, create(jax.random.key(seed)))


@functools.lru_cache(maxsize=8)
def _sharded_init(config: Qwen3Config, mesh: Mesh | None, kwargs: tuple):
    """(graphdef, jitted key -> state), cached so repeated inits reuse one compilation."""
    kwargs = dict(kwargs)
    abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0), **kwargs))
    graphdef, _ = nnx.split(abstract)

    def create(key):
        # Adapters draw from their own stream, so the base weights do not depend on them.
        rngs = nnx.Rngs(params=key, lora=jax.random.fold_in(key, 1))
        return nnx.state(Qwen3(config, rngs=rngs, **kwargs))

    # Each parameter is born on its shard: out_shardings is a prefix tree of the state.
    return graphdef, jax.jit(create, out_shardings=param_shardings(abstract, mesh))


def init_adapters(config: Qwen3Config, *, mesh: Mesh | None, seed: int, **kwargs) -> dict:
    """Fresh LoRA adapters (kwargs hold `lora=`) as a pure dict, each born in its sharding.

    The whole model is constructed inside the jit, but only the adapters are returned, so
    XLA drops the base weights' initialisation: only the adapters are computed.
    """
    kwargs = model_kwargs(**kwargs)
    abstract = abstract_model(config, **kwargs)
    shardings = param_shardings(nnx.state(abstract, nnx.LoRAParam), mesh)

    def create(key):
        rngs = nnx.Rngs(params=key, lora=jax.random.fold_in(key, 1))
        return nnx.state(Qwen3(config, rngs=rngs, **kwargs), nnx.LoRAParam)

    state = jax.jit(create, out_shardings=shardings)(jax.random.key(seed))
    return nnx.to_pure_dict(state)
