"""GRPO advantages and the PPO-style policy loss (docs/METHOD.md §3), with its variants.

What is kept by default (the published GRPO), exactly:
  * advantage: per group of G responses to one prompt, A = (R − mean) / (std + eps) with the
    unbiased std; one scalar per response, applied to every response token. A group whose
    rewards are all equal, and a group of one (G = 1, std undefined), get A = 0.
  * policy term: ratio = exp(clamp(logπ − logπ_old, ±20)); the PPO clipped surrogate
    max(−A·ratio, −A·clip(ratio, 1 − ε_low, 1 + ε_high)); for A < 0 the dual clip caps it at
    −A·c (c = 3), so a huge ratio on a bad token cannot blow up the loss.
  * KL term: the "low-variance" k3 estimator to the frozen reference, as a loss term:
    d = clamp(logπ_ref − logπ, ±20); kl = clamp(exp(d) − d − 1, −10, 10); weight β = 0.001.
    No KL in the reward, no entropy bonus.
  * aggregation: token-mean — the sum over every response token of the mini-batch divided by
    the number of those tokens (long responses weigh more than short ones; the published run,
    with micro-batches of one sequence, averaged per sequence instead: `seq-mean-token-mean`
    is available as `aggregation="seq_mean"`).

The variants, each a setting of the `loss` section (and one of `grpo`):
  * Dr. GRPO: `std_normalize=False` (A = R − mean) and `aggregation=token_sum_norm`: the sum
    over every response token divided by (sequences · C), C a constant (`norm_constant`,
    default the response length limit), so no response is normalised by its own length.
  * DAPO: `clip_high` > `clip_low` (clip-higher, 0.28 vs 0.2), token-mean aggregation, and
    `grpo.dynamic_sampling` (train/grpo.py: groups of equal rewards dropped and refilled).
  * GSPO: `ratio=sequence`: s = exp(mean over the sequence's tokens of the clamped logπ −
    logπ_old), one ratio per sequence clipped per sequence; every token of the sequence carries
    the sequence's term, so `seq_mean` gives GSPO's mean over sequences.
  * KL: `kl_estimator` k1 = −d, k2 = d²/2 (neither clamped, as verl), k3 above; `kl_coef=0`
    drops the term (and the reference pass).
Everything here is float32: ratios and exp of log-prob differences are not safe in bf16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from opera_jax.config.sections import Aggregation, KLEstimator, Loss, Ratio


def group_advantages(rewards, group_ids, *, eps: float = 1e-6,
                     std_normalize: bool = True) -> np.ndarray:
    """Per-response GRPO advantages (host side, float32).

    Args:
      rewards: [R] rewards of R responses.
      group_ids: [R] the prompt (group) each response belongs to; any hashable ids.
      std_normalize: divide by the group's std (GRPO); False leaves r − mean (Dr. GRPO).
    Returns:
      [R] float32: (r − group mean) / (unbiased group std + eps), or r − group mean; 0 for
      groups of size 1 and for groups whose rewards are all equal.
    """
    rewards = np.asarray(rewards, np.float64)
    if not np.all(np.isfinite(rewards)):
        bad = int(np.flatnonzero(~np.isfinite(rewards))[0])
        raise ValueError(f"reward of response {bad} is {rewards[bad]}")
    out = np.zeros_like(rewards)
    ids = np.asarray(group_ids)
    for g in np.unique(ids):
        idx = np.flatnonzero(ids == g)
        if len(idx) < 2:
            continue
        r = rewards[idx]
        std = r.std(ddof=1)
        if std == 0.0:
            continue
        out[idx] = (r - r.mean()) / (std + eps) if std_normalize else r - r.mean()
    return out.astype(np.float32)


def low_var_kl(logp, ref_logp, *, clamp: float = 10.0):
    """k3 estimator of KL(π ‖ π_ref) per token: exp(d) − d − 1 with d = logπ_ref − logπ."""
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, -clamp, clamp)


def kl_estimate(logp, ref_logp, estimator: KLEstimator, *, clamp: float = 10.0):
    """Per-token estimate of KL(π ‖ π_ref) (module docstring), same shape as `logp`."""
    estimator = KLEstimator(estimator)
    if estimator is KLEstimator.K3:
        return low_var_kl(logp, ref_logp, clamp=clamp)
    d = ref_logp - logp
    return -d if estimator is KLEstimator.K1 else 0.5 * jnp.square(d)


def aggregate(x, mask, aggregation: Aggregation, norm_constant: int | None = None):
    """One number from per-token values x [B, T] on `mask` [B, T] (module docstring)."""
    if aggregation is Aggregation.TOKEN_MEAN:
        return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    has = (jnp.sum(mask, -1) > 0).astype(jnp.float32)  # [B] sequences with a response token
    if aggregation is Aggregation.TOKEN_SUM_NORM:
        if norm_constant is None:
            raise ValueError("aggregation token_sum_norm needs loss.norm_constant")
        return jnp.sum(x * mask) / (jnp.maximum(jnp.sum(has), 1.0) * norm_constant)
    per_seq = jnp.sum(x * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, config: Loss = Loss()):
    """The GRPO/OPERA loss over a mini-batch of responses.

    Args:
      logp: [B, T] float32 log π(token) under the current parameters (differentiated).
      old_logp: [B, T] log-probs under the rollout parameters (constants).
      ref_logp: [B, T] log-probs under the frozen reference, or None for no KL term.
      advantages: [B] one advantage per response.
      mask: [B, T] 1 on response tokens, 0 on prompt and padding.
      config: clip / ratio / KL / aggregation settings (`norm_constant` set for
        token_sum_norm).
    Returns:
      (loss scalar, metrics dict of scalars: pg_loss, kl, clip_frac, dual_clip_frac,
       ratio_mean, approx_kl_old).
    """
    mask = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    token_log_ratio = jnp.clip(logp - old_logp, -config.log_ratio_clamp, config.log_ratio_clamp)
    log_ratio = token_log_ratio
    if config.ratio is Ratio.SEQUENCE:  # GSPO: one ratio per sequence, on all its tokens
        n = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
        log_ratio = jnp.broadcast_to(jnp.sum(token_log_ratio * mask, -1, keepdims=True) / n,
                                     mask.shape)
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    clipped = jnp.maximum(pg1, pg2)
    pg = clipped
    dual = jnp.zeros_like(mask, bool)
    if config.dual_clip is not None and math.isfinite(config.dual_clip):  # inf: no cap either
        pg3 = -adv * config.dual_clip
        dual = (adv < 0) & (clipped > pg3)
        pg = jnp.where(adv < 0, jnp.minimum(clipped, pg3), clipped)
    pg_loss = aggregate(pg, mask, config.aggregation, config.norm_constant)
    loss = pg_loss
    kl = jnp.zeros(())
    if ref_logp is not None and config.kl_coef:
        kl = aggregate(kl_estimate(logp, ref_logp, config.kl_estimator, clamp=config.kl_clamp),
                       mask, config.aggregation, config.norm_constant)
        loss = loss + config.kl_coef * kl
    n = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {
        "pg_loss": pg_loss,
        "kl": kl,
        "clip_frac": jnp.sum((pg2 > pg1) * mask) / n,
        "dual_clip_frac": jnp.sum(dual * mask) / n,
        "ratio_mean": jnp.sum(ratio * mask) / n,
        "approx_kl_old": jnp.sum(0.5 * jnp.square(token_log_ratio) * mask) / n,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
