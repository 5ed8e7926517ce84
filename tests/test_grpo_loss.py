"""GRPO loss and advantages on hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.config.sections import Loss
from opera_jax.train.grpo_loss import group_advantages, grpo_loss, low_var_kl


def test_advantages_by_hand():
    # group a: rewards 1, 2, 3 -> mean 2, unbiased std 1 -> (-1, 0, 1)/(1+1e-6)
    adv = group_advantages([1.0, 2.0, 3.0, 0.5, 0.5, 7.0], ["a", "a", "a", "b", "b", "c"])
    np.testing.assert_allclose(adv[:3], np.array([-1, 0, 1]) / (1 + 1e-6), rtol=1e-6)
    assert adv[3] == adv[4] == 0.0  # identical rewards: 0, no NaN
    assert adv[5] == 0.0  # G = 1
    # ties inside a group: 0, 0, 1 -> mean 1/3, std sqrt(1/3)
    t = group_advantages([0.0, 0.0, 1.0], [0, 0, 0])
    s = math.sqrt(1 / 3)
    np.testing.assert_allclose(t, [(-1 / 3) / (s + 1e-6)] * 2 + [(2 / 3) / (s + 1e-6)], rtol=1e-6)
    with pytest.raises(ValueError, match="reward of response 1 is nan"):
        group_advantages([0.0, float("nan")], [0, 0])


def _loss(logp, old, adv, mask=None, ref=None, **cfg):
    logp = jnp.asarray(logp, jnp.float32)[None]
    old = jnp.asarray(old, jnp.float32)[None]
    mask = jnp.ones_like(logp) if mask is None else jnp.asarray(mask, jnp.float32)[None]
    ref = None if ref is None else jnp.asarray(ref, jnp.float32)[None]
    return grpo_loss(logp, old, ref, jnp.asarray([adv], jnp.float32), mask,
                     Loss(**cfg))


def test_clip_positive_advantage():
    # ratio e^0.5 = 1.6487 > 1.2: clipped -> loss = -A * 1.2 = -2.4 for A = 2
    loss, m = _loss([0.5], [0.0], 2.0, kl_coef=0.0)
    assert float(loss) == pytest.approx(-2.4, abs=1e-6)
    assert float(m["clip_frac"]) == 1.0
    # ratio e^-0.5 = 0.6065 < 0.8 with A > 0: unclipped (max picks -A*ratio) = -1.2131
    loss, m = _loss([-0.5], [0.0], 2.0, kl_coef=0.0)
    assert float(loss) == pytest.approx(-2 * math.exp(-0.5), abs=1e-6)
    assert float(m["clip_frac"]) == 0.0


def test_dual_clip_negative_advantage():
    # A = -1, ratio e^2 = 7.389: clipped surrogate = max(7.389, 1.2) = 7.389; dual clip caps at 3
    loss, m = _loss([2.0], [0.0], -1.0, kl_coef=0.0)
    assert float(loss) == pytest.approx(3.0, abs=1e-6)
    assert float(m["dual_clip_frac"]) == 1.0
    # A = -1, ratio e^0.1 = 1.105: inside the clip range, below the cap -> 1.105
    loss, _ = _loss([0.1], [0.0], -1.0, kl_coef=0.0)
    assert float(loss) == pytest.approx(math.exp(0.1), abs=1e-6)
    # log-ratio clamp: a difference of 50 counts as 20 (loss capped by the dual clip anyway)
    loss, m = _loss([50.0], [0.0], 1.0, kl_coef=0.0)
    assert float(loss) == pytest.approx(-1.2, abs=1e-6)


def test_low_var_kl_and_clamps():
    # d = ref - logp = 1: e - 1 - 1 = 0.71828
    assert float(low_var_kl(jnp.float32(0.0), jnp.float32(1.0))) == pytest.approx(math.e - 2, abs=1e-6)
    # d = 30 is clamped to 20 first, then exp(20) - 21 is clamped to 10
    assert float(low_var_kl(jnp.float32(0.0), jnp.float32(30.0))) == 10.0
    # d = -5: e^-5 + 5 - 1 = 4.0067
    assert float(low_var_kl(jnp.float32(5.0), jnp.float32(0.0))) == pytest.approx(math.exp(-5) + 4, abs=1e-6)
    # in the loss: ratio 1, A = 0 -> pg 0; kl (e-2) weighted by 0.5
    loss, m = _loss([0.0], [0.0], 0.0, ref=[1.0], kl_coef=0.5)
    assert float(loss) == pytest.approx(0.5 * (math.e - 2), abs=1e-6)
    assert float(m["kl"]) == pytest.approx(math.e - 2, abs=1e-6)


def test_token_mean_vs_seq_mean_with_masks():
    # two responses: 3 tokens of pg -1 (A=1, ratio 1) and 1 token of pg +2 (A=-2)
    logp = jnp.zeros((2, 4))
    mask = jnp.asarray([[1, 1, 1, 0], [0, 1, 0, 0]], jnp.float32)
    adv = jnp.asarray([1.0, -2.0])
    tok, _ = grpo_loss(logp, logp, None, adv, mask, Loss(kl_coef=0.0))
    assert float(tok) == pytest.approx((3 * -1 + 2) / 4)
    seq, _ = grpo_loss(logp, logp, None, adv, mask, Loss(kl_coef=0.0, aggregation="seq_mean"))
    assert float(seq) == pytest.approx((-1 + 2) / 2)
    # masked positions carry no gradient
    g = jax.grad(lambda lp: grpo_loss(lp, logp, None, adv, mask, Loss(kl_coef=0.0))[0])(logp)
    assert np.all(np.asarray(g)[np.asarray(mask) == 0] == 0)
    # d loss / d logp at ratio 1 for A = 1 is -A / n_tokens
    assert float(g[0, 0]) == pytest.approx(-1 / 4)


def test_bad_config():
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        Loss(dual_clip=1.0)
    with pytest.raises(ValueError, match="loss.aggregation='sum' is not one of: token_mean, "
                       "seq_mean"):
        Loss(aggregation="sum")
