"""One decode step's attention against the dense KV cache, as a Pallas TPU kernel.

The sampler's cache is one [B, K, S, H] buffer per layer with left-padded prompts (segment 0 on
the pads) and a shared write index. jax's TPU decode kernels (`paged_attention`,
`ragged_paged_attention`) want page-major [K, pages, page, H] buffers and a valid prefix
[0, length) per row, which this layout is not (the pads sit at the start): reshaping into pages
would copy the cache every step, and a length mask would let real tokens see the pads. So the
dense cached decode gets its own kernel; the paged engine fits the library kernels as they are.

Grid (B, K, S / block): the G query heads of a KV head (padded to 8 rows) against one key
block per step, online softmax in VMEM scratch, float32 statistics. Key blocks past the row's
query slot are neither computed nor fetched (the index map repeats the last needed block, so
the pipeline issues no new copy): a step reads the written part of the cache only.
Mask as attention.py: kv_segment_ids[b, s] == q_segment_ids[b] != 0 and s <= q_slot[b].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NEG = -1e30
_LANES = 128


def block_size(s: int) -> int | None:
    """The key block for S cache slots: the largest of 512, 256, 128 dividing S; None if none."""
    return next((b for b in (512, 256, 128) if s % b == 0), None)


def _kernel(slot_ref, qseg_ref, q_ref, k_ref, v_ref, seg_ref, o_ref, m_sc, l_sc, acc_sc, *,
            block: int, scale: float):
    b, j = pl.program_id(0), pl.program_id(2)
    slot = slot_ref[b]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j * block <= slot)
    def _step():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]  # [G8, H], [block, H], [block, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [G8, block]
        pos = j * block + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        seg = seg_ref[...]  # [1, block]
        mask = (seg == qseg_ref[b]) & (seg != 0) & (pos <= slot)
        s = jnp.where(mask, s, _NEG)
        m_prev = m_sc[...]  # [G8, 128], lanes equal
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new[:, :1]), 0.0)
        corr = jnp.exp(m_prev - m_new)
        l_sc[...] = l_sc[...] * corr + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * corr[:, :1] + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        l = l_sc[...][:, :1]
        o_ref[...] = (acc_sc[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def decode_attention(q, k, v, q_segment_ids, kv_segment_ids, q_slot, *,
                     interpret: bool = False):
    """Attention of one new token per row against the cache.

    Args:
      q: [B, 1, N, H]; k, v: [B, K, S, H] (the cache buffers, S a multiple of 128).
      q_segment_ids: int [B, 1]; kv_segment_ids: int [B, S].
      q_slot: int32 [B], the query's slot (the cache's end before this step).
      interpret: run in the Pallas interpreter (CPU tests).
    Returns:
      [B, 1, N, H]; a row that sees no key gives zeros.
    """
    b, _, n, h = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = n // kh
    g8 = max(8, -(-g // 8) * 8)
    block = block_size(s)
    rows = q.reshape(b, kh, g, h)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, g8 - g), (0, 0)))
    seg = kv_segment_ids.astype(jnp.int32).reshape(b, 1, s)
    last = lambda bi, j, slot: jnp.minimum(j, slot[bi] // block)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(b, kh, s // block),
        in_specs=[
            pl.BlockSpec((None, None, g8, h), lambda bi, hi, j, slot, qs: (bi, hi, 0, 0)),
            pl.BlockSpec((None, None, block, h),
                         lambda bi, hi, j, slot, qs: (bi, hi, last(bi, j, slot), 0)),
            pl.BlockSpec((None, None, block, h),
                         lambda bi, hi, j, slot, qs: (bi, hi, last(bi, j, slot), 0)),
            pl.BlockSpec((None, 1, block), lambda bi, hi, j, slot, qs: (bi, 0, last(bi, j, slot))),
        ],
        out_specs=pl.BlockSpec((None, None, g8, h), lambda bi, hi, j, slot, qs: (bi, hi, 0, 0)),
        scratch_shapes=[pltpu.VMEM((g8, _LANES), jnp.float32),
                        pltpu.VMEM((g8, _LANES), jnp.float32),
                        pltpu.VMEM((g8, h), jnp.float32)])
    out = pl.pallas_call(
        functools.partial(_kernel, block=block, scale=h ** -0.5), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, kh, g8, h), q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name="opera_decode_tpu",
    )(q_slot.astype(jnp.int32), q_segment_ids.reshape(b).astype(jnp.int32), rows, k, v, seg)
    return out[:, :, :g].reshape(b, 1, n, h)
