"""The train state pytree, the optimizer from config, and the model's parameters, all sharded.

    TrainState(step, params, opt_state, rng)   # one pytree: jitted, donated, checkpointed

`params` is a plain nested dict of arrays (`nnx.to_pure_dict`): it merges back into the model
with `nnx.merge(graphdef, params)` and checkpoints without NNX types. Master weights and optimizer
moments are stored in `param_dtype` (float32 by default) while the model computes in `dtype`.

Everything is created in its final sharding: `abstract_state` gives shapes, dtypes and
shardings without allocating (the restore target); `init_state` builds the optimizer state
inside one jit whose `out_shardings` place each moment next to its parameter.
"""

from __future__ import annotations

import enum
import math

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from opera_jax.model import build
from opera_jax.model.config import Qwen3Config
from opera_jax.model.hf_io import load_hf_model
from opera_jax.tokenizer import load_tokenizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 [] — optimizer updates applied so far
    params: dict          # nested dict of [param_dtype] arrays (master weights)
    opt_state: optax.OptState
    rng: jax.Array        # uint32 key data (jax.random.key_data); wrap with wrap_key_data


class Schedule(str, enum.Enum):
    COSINE = "cosine"      # linear warm-up, then cosine from lr down to lr * final_lr_frac
    CONSTANT = "constant"  # linear warm-up, then lr


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate of the update with 0-based index s.

    Warm-up: lr · (s + 1) / warmup_steps for s < warmup_steps (the first update is not wasted
    on lr = 0). Cosine: lr_end + (lr − lr_end) · ½(1 + cos(π · p)) with
    p = (s − warmup_steps) / (total_steps − warmup_steps) clipped to [0, 1] and
    lr_end = lr · final_lr_frac.
    """
    kind = Schedule(optim.schedule)
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    lr_end = lr * float(optim.final_lr_frac)
    decay = max(1, total_steps - warmup)

    def schedule(s):
        s = jnp.asarray(s, jnp.float32)
        warm = lr * jnp.minimum(1.0, (s + 1.0) / max(warmup, 1))
        if kind is Schedule.CONSTANT:
            return warm
        p = jnp.clip((s - warmup) / decay, 0.0, 1.0)
        cos = lr_end + (lr - lr_end) * 0.5 * (1.0 + jnp.cos(math.pi * p))
        return jnp.where(s < warmup, warm, cos)

    return schedule


def decay_mask(params):
    """Weight decay on matrices only; norm scales (1-D) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
    """Global-norm clipping, then AdamW on the schedule.

    Args:
      optim: config with lr, warmup_steps, schedule, final_lr_frac, b1, b2, eps,
        weight_decay, clip_norm (<= 0: no clipping).
      total_steps: updates in the whole run (the cosine's length).
    Returns:
      (tx, schedule).
    """
    schedule = make_schedule(optim, total_steps)
    clip = (optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0
            else optax.identity())
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw), schedule


def model_spec(model: ml_collections.ConfigDict) -> tuple[Qwen3Config, dict]:
    """(architecture, Qwen3 keyword args) from the `model` config section."""
    arch = (Qwen3Config.from_hf_dir(model.hf_dir) if model.hf_dir
            else Qwen3Config.preset(model.preset))
    kwargs = dict(dtype=model.dtype, param_dtype=model.param_dtype, remat=model.remat,
                  attention_impl=model.attention_impl or None)
    return arch, kwargs


def abstract_params(model: ml_collections.ConfigDict, mesh: Mesh):
    """(graphdef, params as ShapeDtypeStructs carrying their shardings); nothing allocated."""
    arch, kwargs = model_spec(model)
    abstract = build.abstract_model(arch, **kwargs)
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = nnx.to_pure_dict(build.param_shardings(abstract, mesh))
    shapes = nnx.to_pure_dict(state)
    return graphdef, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def load_params(model: ml_collections.ConfigDict, mesh: Mesh) -> dict:
    """Initial parameters, created sharded: from `model.hf_dir` when set, else random
    (`model.preset`, `model.init_seed`)."""
    arch, kwargs = model_spec(model)
    if model.hf_dir:
        qwen = load_hf_model(model.hf_dir, mesh=mesh, **kwargs)
    else:
        qwen = build.init_model(arch, mesh=mesh, seed=model.init_seed, **kwargs)
    return nnx.to_pure_dict(nnx.state(qwen, nnx.Param))


def model_tokenizer(model: ml_collections.ConfigDict):
    """The checkpoint's tokenizer, or the embedded tiny one for a preset."""
    return load_tokenizer(model.hf_dir or None)


def abstract_state(params_abstract: dict, tx, mesh: Mesh) -> TrainState:
    """The TrainState as ShapeDtypeStructs with shardings: moments follow their parameter,
    scalars (step, counts, rng) are replicated."""
    replicated = NamedSharding(mesh, P())
    param_sh = jax.tree.map(lambda x: x.sharding, params_abstract)
    opt_shapes = jax.eval_shape(tx.init, params_abstract)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_sh,
                                   transform_non_params=lambda _: replicated)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                      params=params_abstract,
                      opt_state=jax.tree.map(sds, opt_shapes, opt_sh),
                      rng=jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated))


def shardings_of(abstract: TrainState) -> TrainState:
    """The sharding tree of an abstract (or concrete) state, for jit in/out_shardings."""
    return jax.tree.map(lambda x: x.sharding, abstract)


def init_state(params: dict, tx, abstract: TrainState, *, seed: int) -> TrainState:
    """A fresh TrainState around `params` (donated), each leaf born in its sharding."""
    def create(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(seed)))
    return jax.jit(create, out_shardings=shardings_of(abstract), donate_argnums=0)(params)
