"""Temperature / top-k / top-p on hand-computed logits, against HF's warpers, and sampling
frequencies against the softmax (a chi-square goodness-of-fit test with a fixed seed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from opera_jax.sampling import filters
from opera_jax.sampling.filters import FilterMode

# Probabilities by token id; sorted descending: 1 (.4), 3 (.3), 4 (.15), 2 (.1), 0 (.05).
PROBS = np.array([0.05, 0.4, 0.1, 0.3, 0.15], np.float32)
LOGITS = np.log(PROBS)


def kept(temperature, top_k, top_p, mode):
    out = filters.filter_logits(jnp.asarray(LOGITS[None]), jnp.array([temperature], jnp.float32),
                                jnp.array([top_k], jnp.int32), jnp.array([top_p], jnp.float32),
                                mode=mode)
    return set(np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist())


@pytest.mark.parametrize("temperature,top_k,top_p,expected", [
    (1.0, 0, 1.0, {0, 1, 2, 3, 4}),
    (1.0, 2, 1.0, {1, 3}),
    (1.0, 1, 1.0, {1}),
    # before-mass .0 .4 .7 .85 .95: keep while < .75
    (1.0, 0, 0.75, {1, 3, 4}),
    (1.0, 0, 0.3, {1}),
    # top-3 renormalised: .47 .35 .18; before-mass .0 .47 .82: keep while < .6
    (1.0, 3, 0.6, {1, 3}),
    # T = 0.5 squares the probabilities: .561 .316 .079 .035 .009
    (0.5, 0, 0.6, {1, 3}),
    (0.5, 0, 0.5, {1}),
    (0.5, 0, 0.9, {1, 3, 4}),
])
def test_masks_on_hand_computed_logits(temperature, top_k, top_p, expected):
    modes = [FilterMode.SORT]
    if 1 <= top_k <= filters.TOPK_CAP:
        modes.append(FilterMode.TOPK)
    assert filters.filter_mode([top_k], [top_p]) in modes + [FilterMode.NONE]
    for mode in modes:
        assert kept(temperature, top_k, top_p, mode) == expected, mode


def test_filter_mode_choice():
    assert filters.filter_mode([0, 0], [1.0, 1.0]) is FilterMode.NONE
    assert filters.filter_mode([20, 1], [0.95, 1.0]) is FilterMode.TOPK
    assert filters.filter_mode([20, 0], [1.0, 1.0]) is FilterMode.SORT
    assert filters.filter_mode([0], [0.9]) is FilterMode.SORT
    assert filters.filter_mode([filters.TOPK_CAP + 1], [1.0]) is FilterMode.SORT


def test_matches_hf_warpers_per_row():
    """Random logits, one (temperature, top_k, top_p) per row, against HF's warper chain."""
    rng = np.random.default_rng(0)
    v = 300
    logits = rng.normal(size=(6, v)).astype(np.float32) * 3
    temp = np.array([1.0, 0.7, 1.3, 0.6, 1.0, 0.9], np.float32)
    top_k = np.array([0, 20, 5, 40, 64, 0], np.int32)
    top_p = np.array([0.9, 1.0, 0.5, 0.95, 0.8, 1.0], np.float32)
    ours = np.asarray(filters.filter_logits(jnp.asarray(logits), jnp.asarray(temp),
                                            jnp.asarray(top_k), jnp.asarray(top_p),
                                            mode=FilterMode.SORT))
    for i in range(len(logits)):
        x = torch.from_numpy(logits[i:i + 1])
        x = TemperatureLogitsWarper(float(temp[i]))(None, x)
        if top_k[i]:
            x = TopKLogitsWarper(int(top_k[i]))(None, x)
        if top_p[i] < 1:
            x = TopPLogitsWarper(float(top_p[i]))(None, x)
        ref = x[0].numpy()
        np.testing.assert_array_equal(np.isfinite(ours[i]), np.isfinite(ref), err_msg=f"row {i}")
        np.testing.assert_allclose(ours[i][np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)
    # TOPK mode gives the same masks where every row has 1 <= top_k <= TOPK_CAP.
    rows = top_k > 0
    topk = filters.filter_logits(jnp.asarray(logits[rows]), jnp.asarray(temp[rows]),
                                 jnp.asarray(top_k[rows]), jnp.asarray(top_p[rows]),
                                 mode=FilterMode.TOPK)
    np.testing.assert_array_equal(np.asarray(topk), ours[rows])


def test_topk_width_choice():
    assert filters.topk_width([20, 1]) == 32
    assert filters.topk_width([8]) == 8
    assert filters.topk_width([9, 3]) == 16
    assert filters.topk_width([filters.TOPK_CAP]) == filters.TOPK_CAP


def test_sampled_tokens_do_not_depend_on_the_topk_width():
    # 256 rows with top-k in 1..8: widths 8, 16, 32 and 64 draw the same tokens (the first w
    # random numbers of a key are the same whatever the count asked for).
    rng = np.random.default_rng(3)
    n = 256
    logits = jnp.asarray(rng.normal(size=(n, 1024)) * 2, jnp.float32)
    keys = jax.random.split(jax.random.key(7), n)
    args = (keys, logits, jnp.full((n,), 0.8, jnp.float32),
            jnp.asarray(rng.integers(1, 9, size=n), jnp.int32),
            jnp.asarray(rng.uniform(0.5, 1.0, size=n), jnp.float32))
    drawn = [np.asarray(filters.sample_tokens(*args, mode=FilterMode.TOPK, width=w))
             for w in filters.TOPK_WIDTHS]
    for d in drawn[1:]:
        np.testing.assert_array_equal(d, drawn[0])
    assert len(np.unique(drawn[0])) > 50  # really sampled, not a constant


def _draw(temperature, top_k, top_p, mode, n=20_000, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    full = lambda x, dt: jnp.full((n,), x, dt)  # noqa: E731
    toks = filters.sample_tokens(keys, jnp.broadcast_to(jnp.asarray(LOGITS), (n, len(LOGITS))),
                                 full(temperature, jnp.float32), full(top_k, jnp.int32),
                                 full(top_p, jnp.float32), mode=mode)
    return np.bincount(np.asarray(toks), minlength=len(LOGITS))


@pytest.mark.parametrize("temperature,top_k,top_p,mode", [
    (1.0, 0, 1.0, FilterMode.NONE),
    (0.7, 0, 1.0, FilterMode.NONE),
    (1.5, 3, 1.0, FilterMode.TOPK),
    (0.8, 0, 0.9, FilterMode.SORT),
])
def test_sampling_frequencies_match_softmax(temperature, top_k, top_p, mode):
    counts = _draw(temperature, top_k, top_p, mode)
    # Expected distribution computed independently in float64 numpy.
    z = LOGITS.astype(np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros(len(z), bool)
    keep[order[:top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if top_p < 1:
        before = np.cumsum(p[order]) - p[order]
        keep[order[before >= top_p]] = False
        p = np.where(keep, p, 0.0) / np.where(keep, p, 0.0).sum()
    assert counts[~keep].sum() == 0
    stat, pvalue = scipy.stats.chisquare(counts[keep], p[keep] * counts.sum())
    assert pvalue > 1e-3, (counts, p, stat)


def test_greedy_and_raw_logprob():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]))
    keys = jax.random.split(jax.random.key(0), 2)
    zero = jnp.zeros((2,), jnp.float32)
    toks = filters.sample_tokens(keys, logits, zero, jnp.array([2, 0]), jnp.array([1.0, 0.1]),
                                 mode=FilterMode.SORT)
    np.testing.assert_array_equal(np.asarray(toks), [1, 3])
    lp = filters.raw_logprob(logits, toks)
    np.testing.assert_allclose(np.asarray(lp), np.log([0.4, 0.4]), rtol=1e-6)
