"""Pallas splash attention (TPU) for every non-decode call shape the model makes.

Causal by slot at a static query offset (`CausalMask(offset=…)`: query t sees key slots
<= offset + t), with segment ids for packed rows, padding and the cache slots a reward pass
may not see. Grouped-query attention is splash's own (K key heads for N query heads, no
repeat). Lengths are padded to multiples of 128 (segment 0 on the padding, sliced off after).

Differs from the xla path only on query rows of segment 0 (padding), whose outputs are unused:
splash lets them attend to other segment-0 keys where xla returns zeros.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as sk, splash_attention_mask as sm)

_BLOCK = 128


def _pad(x, axis: int, multiple: int):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, t: int, s: int, q_offset: int, interpret: bool):
    """The splash kernel for one mask geometry (building its block maps is host work)."""
    mask = sm.MultiHeadMask([sm.CausalMask((t, s), offset=q_offset) for _ in range(heads)])
    return sk.make_splash_mha_single_device(mask, interpret=interpret)


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, q_offset: int = 0,
                     interpret: bool = False):
    """Splash attention, causal at `q_offset`, with segment ids.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H].
      q_segment_ids: int [B, T]; kv_segment_ids: int [B, S].
      q_offset: static slot of query 0.
      interpret: the Pallas interpreter (CPU tests).
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    qt = _pad(jnp.swapaxes(q * (h ** -0.5), 1, 2), 2, _BLOCK)  # [B, N, T', H], pre-scaled
    kt = _pad(jnp.swapaxes(k, 1, 2), 2, _BLOCK)  # [B, K, S', H]
    vt = _pad(jnp.swapaxes(v, 1, 2), 2, _BLOCK)
    seg = sk.SegmentIds(q=_pad(q_segment_ids.astype(jnp.int32), 1, _BLOCK),
                        kv=_pad(kv_segment_ids.astype(jnp.int32), 1, _BLOCK))
    kernel = _kernel(n, qt.shape[2], kt.shape[2], int(q_offset), interpret)
    out = jax.vmap(kernel)(qt, kt, vt, segment_ids=seg)
    return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)
