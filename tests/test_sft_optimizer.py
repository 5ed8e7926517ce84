"""Learning-rate schedules and the first AdamW update, computed by hand."""

import math

import jax.numpy as jnp
import numpy as np

from opera_jax.config.sections import Optim, Schedule
from opera_jax.train.state import make_optimizer, make_schedule


def optim(**kw):
    base = dict(lr=1.0, schedule=Schedule.COSINE, warmup_frac=2 / 6, final_lr_frac=0.0,
                b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, clip_norm=None)
    return Optim(**{**base, **kw})


def test_warmup_from_zero_then_cosine():
    f = make_schedule(optim(final_lr_frac=0.2), total_updates=6)
    # warm-up s / 2 (as published: the first update has lr 0); then, counting from the end of
    # the warm-up, 0.2 + 0.8 * ½(1 + cos(π c / 4)), held at 0.2 past the last update
    want = [0.0, 0.5, 1.0, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)), 0.6,
            0.2 + 0.8 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.2, 0.2]
    np.testing.assert_allclose([float(f(s)) for s in range(8)], want, rtol=1e-6, atol=1e-7)


def test_warmup_then_constant():
    f = make_schedule(optim(schedule=Schedule.CONSTANT, warmup_frac=0.4, lr=2.0),
                      total_updates=10)  # 4 warm-up updates
    np.testing.assert_allclose([float(f(s)) for s in (0, 1, 3, 4, 9)], [0.0, 0.5, 1.5, 2.0, 2.0])
    f = make_schedule(optim(schedule=Schedule.CONSTANT, warmup_frac=0.0, lr=2.0),
                      total_updates=10)
    np.testing.assert_allclose([float(f(s)) for s in (0, 9)], [2.0, 2.0])


def test_first_update_is_clipped_adamw_with_decay_on_matrices_only():
    tx, _ = make_optimizer(optim(lr=0.1, warmup_frac=0.0, weight_decay=0.5, clip_norm=1.0),
                           total_updates=10)
    params = {"w": jnp.array([[1.0, -2.0]]), "norm": jnp.array([3.0])}
    grads = {"w": jnp.array([[3.0, -4.0]]), "norm": jnp.array([0.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    # Clipping scales g to [0.6, -0.8]; Adam's first bias-corrected step is g / |g| = sign(g);
    # decoupled decay adds 0.5·w for the matrix; lr at step 0 = 0.1. The 1-D norm has g = 0
    # and no decay, so it does not move.
    np.testing.assert_allclose(updates["w"], -0.1 * (np.array([[1.0, -1.0]])
                                                     + 0.5 * np.array([[1.0, -2.0]])), rtol=1e-6)
    np.testing.assert_array_equal(updates["norm"], [0.0])
