"""The train state pytree and the optimizer from config, all sharded.

    TrainState(step, params, opt_state, rng)   # one pytree: jitted, donated, checkpointed

`params` is a plain nested dict of arrays (`nnx.to_pure_dict`): it merges back into the model
with `nnx.merge(graphdef, params)` and checkpoints without NNX types. Master weights and optimizer
moments are stored in `param_dtype` (float32 by default) while the model computes in `dtype`.

Everything is created in its final sharding: `abstract_state` gives shapes, dtypes and
shardings without allocating (the restore target); `init_state` builds the optimizer state
inside one jit whose `out_shardings` place each moment next to its parameter.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from opera_jax.config.sections import Optim, Schedule


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 [] — optimizer updates applied so far
    params: dict          # nested dict of [param_dtype] arrays (master weights)
    opt_state: optax.OptState
    rng: jax.Array        # uint32 key data (jax.random.key_data); wrap with wrap_key_data


def make_schedule(optim: Optim, total_updates: int) -> optax.Schedule:
    """Learning rate of the update with 0-based index s (see `config.sections.Optim`).

    Warm-up lr · s / w for s < w = round(warmup_frac · total_updates), as the published run;
    then lr, or a cosine from lr down to lr · final_lr_frac at the last update.
    """
    warmup = round(optim.warmup_frac * total_updates)
    if optim.schedule is Schedule.CONSTANT:
        after = optax.constant_schedule(optim.lr)
    else:
        after = optax.cosine_decay_schedule(optim.lr, max(1, total_updates - warmup),
                                            alpha=optim.final_lr_frac)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def decay_mask(params):
    """Weight decay on matrices only; norm scales (1-D) are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: Optim, total_updates: int):
    """Global-norm clipping, then AdamW on the schedule.

    Args:
      optim: the section.
      total_updates: optimizer updates in the whole run (the schedule's length).
    Returns:
      (tx, schedule).
    """
    schedule = make_schedule(optim, total_updates)
    clip = (optax.identity() if optim.clip_norm is None
            else optax.clip_by_global_norm(optim.clip_norm))
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=decay_mask)
    return optax.chain(clip, adamw), schedule


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
