"""Choosing the next token from logits: greedy, temperature, top-k and top-p, per row.

Every knob is an array with one value per row, so new values never recompile; only the
static `FilterMode` decides which code runs. Order follows Hugging Face `generate`:
divide by the temperature, then keep the top-k logits, then the smallest set of the remaining
tokens whose probability (after top-k) reaches top-p; ties at a threshold are kept.

Temperature 0 means greedy: the argmax of the unfiltered logits (filters never change it).
The log-probability reported for a sampled token is NOT computed here from the filtered
distribution: the sampler reports the temperature-1 log-softmax of the raw logits
(`raw_logprob`), which is what the RL loss and the perplexity score need.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

# Largest top-k served by `lax.top_k` instead of a full sort over the vocabulary.
TOPK_CAP = 64
# Static `lax.top_k` widths: the smallest one >= every row's top-k is compiled (on the CPU,
# top 32 of 1,024 logits costs a quarter of top 64). With JAX's partitionable threefry, a
# key's first w random numbers are the same for any requested count >= w, so the sampled
# token does not depend on the width.
TOPK_WIDTHS = (8, 16, 32, TOPK_CAP)

_MASKED = -jnp.inf


class FilterMode(enum.Enum):
    """Which filtering code a compiled sampler contains (static; chosen from the values)."""

    NONE = "none"  # every row has top_k == 0 and top_p >= 1: plain softmax sampling
    TOPK = "topk"  # every row has 1 <= top_k <= TOPK_CAP: exact via lax.top_k(TOPK_CAP)
    SORT = "sort"  # anything else: one full descending sort of the vocabulary per row


def filter_mode(top_k, top_p) -> FilterMode:
    """The cheapest mode that is exact for these per-row values (host numbers)."""
    top_k = [int(k) for k in top_k]
    top_p = [float(p) for p in top_p]
    if all(k <= 0 for k in top_k) and all(p >= 1.0 for p in top_p):
        return FilterMode.NONE
    if all(1 <= k <= TOPK_CAP for k in top_k):
        return FilterMode.TOPK
    return FilterMode.SORT


def topk_width(top_k) -> int:
    """The `lax.top_k` width for TOPK mode: the smallest of TOPK_WIDTHS >= every top-k."""
    need = max(int(k) for k in top_k)
    return next(w for w in TOPK_WIDTHS if w >= need) if need <= TOPK_CAP else TOPK_CAP


def _threshold_from_sorted(sorted_logits, top_k, top_p):
    """Smallest kept logit per row, from logits sorted descending.

    Args:
      sorted_logits: float32 [B, C] temperature-scaled logits, descending (C <= V).
      top_k: int32 [B]; 0 means off. Must be <= C where it is on.
      top_p: float32 [B]; >= 1 means off.
    Returns:
      float32 [B]: keep tokens whose scaled logit is >= this.
    """
    c = sorted_logits.shape[-1]
    rank = jnp.arange(c, dtype=jnp.int32)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, c), c)[:, None]
    in_k = rank < k
    # Top-p on the distribution renormalised after top-k (HF order).
    z = jnp.where(in_k, sorted_logits, _MASKED)
    probs = jax.nn.softmax(z, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better-ranked tokens
    keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))
    keep = keep.at[:, 0].set(True)  # always keep the best token
    return jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1)


def filter_logits(logits, temperature, top_k, top_p, *, mode: FilterMode,
                  width: int = TOPK_CAP):
    """Temperature-scaled logits with tokens outside top-k / top-p set to -inf.

    Args:
      logits: float32 [B, V] raw logits.
      temperature: float32 [B]; rows with 0 are scaled by 1 (they decode greedily anyway).
      top_k: int32 [B]; top_p: float32 [B].
      mode: static; must be exact for the values (see `filter_mode`).
      width: static; TOPK mode looks at this many best logits (>= every top-k).
    Returns:
      float32 [B, V].
    """
    logits = logits.astype(jnp.float32)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    scaled = logits / t[:, None]
    if mode is FilterMode.NONE:
        return scaled
    if mode is FilterMode.TOPK:
        best = jax.lax.top_k(scaled, min(width, scaled.shape[-1]))[0]  # [B, width]
    else:
        best = -jnp.sort(-scaled, axis=-1)  # [B, V] descending
    threshold = _threshold_from_sorted(best, top_k.astype(jnp.int32),
                                       top_p.astype(jnp.float32))
    return jnp.where(scaled >= threshold[:, None], scaled, _MASKED)


def sample_tokens(keys, logits, temperature, top_k, top_p, *, mode: FilterMode,
                  width: int = TOPK_CAP):
    """One token per row.

    Args:
      keys: [B] typed PRNG keys, one per row (so a row's draw does not depend on the others).
      logits: float32 [B, V] raw logits.
      temperature, top_k, top_p: [B] per-row knobs (temperature 0 = greedy).
      mode: static filter mode.
      width: static; TOPK mode draws among this many best logits (>= every top-k).
    Returns:
      int32 [B] token ids.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        if mode is FilterMode.TOPK:
            # Every kept token is among the `width` best: draw among those candidates only
            # (the same distribution, with `width` random numbers per row instead of V).
            t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
            best, idx = jax.lax.top_k(logits.astype(jnp.float32) / t[:, None],
                                      min(width, logits.shape[-1]))  # [B, width]
            threshold = _threshold_from_sorted(best, top_k.astype(jnp.int32),
                                               top_p.astype(jnp.float32))
            candidates = jnp.where(best >= threshold[:, None], best, _MASKED)
            pick = jax.vmap(jax.random.categorical)(keys, candidates)
            drawn = jnp.take_along_axis(idx, pick[:, None], axis=-1)[:, 0]
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p, mode=mode)
            drawn = jax.vmap(jax.random.categorical)(keys, filtered)
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

    # An all-greedy batch skips the random numbers and the filters.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)


def raw_logprob(logits, tokens):
    """log softmax(logits)[token] at temperature 1, unfiltered, float32. logits [B, V]."""
    # float32: log-softmax over a 150k vocabulary in bf16 loses ~2 digits.
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
