"""Flash attention's algorithm in plain XLA loops: the planner's stand-in for the fused kernels.

The planner's GPU estimate compiles for CPU devices, where neither cuDNN nor Triton exists,
and the Pallas interpreter copies each kernel's inputs into its loop state (a decode step would
count a second KV cache). This function has the memory of a fused kernel instead: a loop over
key blocks with an online softmax, nothing of size [T, S] kept, and a custom VJP whose backward
recomputes the probabilities block by block from the saved log-sum-exp (residuals: q, k, v, the
output and the log-sum-exp, as a flash kernel saves). Same mask and layout as flash_gpu.py
(query rows t·G + g of a KV head; key slots are buffer indices); equal to the xla path in
float32 (tests). XLA's cost analysis counts a loop body once, so its FLOPs are one key block's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NEG = -1e30


def _block_mask(qseg, kseg_j, q_slot, j, block: int):
    """bool [B, 1, R, block] for key block j."""
    k_slot = j * block + jnp.arange(block, dtype=jnp.int32)
    seg = (qseg[:, :, None] == kseg_j[:, None, :]) & (kseg_j[:, None, :] != 0)
    return (seg & (k_slot[None, None, :] <= q_slot[:, :, None]))[:, None]


def _keys(x, j, block: int):
    return lax.dynamic_slice_in_dim(x, j * block, block, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q, k, v, qseg, kseg, q_slot, block):
    return _forward(q, k, v, qseg, kseg, q_slot, block)[0]


def _forward(q, k, v, qseg, kseg, q_slot, block):
    """q [B, K, R, H]; k, v [B, K, S, H] (S a multiple of block); qseg, q_slot [B, R]."""
    scale = q.shape[-1] ** -0.5

    def body(j, carry):
        acc, m, l = carry
        kj, vj = _keys(k, j, block), _keys(v, j, block)
        mask = _block_mask(qseg, lax.dynamic_slice_in_dim(kseg, j * block, block, 1), q_slot,
                           j, block)
        s = jnp.einsum("BKRH,BKSH->BKRS", q, kj, preferred_element_type=jnp.float32) * scale
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        acc = acc * corr[..., None] + jnp.einsum("BKRS,BKSH->BKRH", p.astype(vj.dtype), vj,
                                                 preferred_element_type=jnp.float32)
        return acc, m_new, l * corr + jnp.sum(p, axis=-1)

    stats = q.shape[:3]
    acc, m, l = lax.fori_loop(0, k.shape[2] // block, body,
                              (jnp.zeros(q.shape, jnp.float32), jnp.full(stats, _NEG, jnp.float32),
                               jnp.zeros(stats, jnp.float32)))
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    out = (acc / safe[..., None]).astype(q.dtype)
    return out, jnp.where(seen, m + jnp.log(safe), jnp.inf)


def _attend_fwd(q, k, v, qseg, kseg, q_slot, block):
    out, lse = _forward(q, k, v, qseg, kseg, q_slot, block)
    return out, (q, k, v, qseg, kseg, q_slot, out, lse)


def _attend_bwd(block, residuals, do):
    q, k, v, qseg, kseg, q_slot, out, lse = residuals
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)

    def body(j, carry):
        dq, dk, dv = carry
        kj, vj = _keys(k, j, block), _keys(v, j, block)
        mask = _block_mask(qseg, lax.dynamic_slice_in_dim(kseg, j * block, block, 1), q_slot,
                           j, block)
        s = jnp.einsum("BKRH,BKSH->BKRS", q, kj, preferred_element_type=jnp.float32) * scale
        p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
        dvj = jnp.einsum("BKRS,BKRH->BKSH", p.astype(do.dtype), do,
                         preferred_element_type=jnp.float32)
        dp = jnp.einsum("BKRH,BKSH->BKRS", do, vj, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("BKRS,BKSH->BKRH", ds.astype(kj.dtype), kj,
                             preferred_element_type=jnp.float32)
        dkj = jnp.einsum("BKRS,BKRH->BKSH", ds.astype(q.dtype), q,
                         preferred_element_type=jnp.float32)
        dk = lax.dynamic_update_slice_in_dim(dk, dkj.astype(dk.dtype), j * block, axis=2)
        dv = lax.dynamic_update_slice_in_dim(dv, dvj.astype(dv.dtype), j * block, axis=2)
        return dq, dk, dv

    dq, dk, dv = lax.fori_loop(0, k.shape[2] // block, body,
                               (jnp.zeros(q.shape, jnp.float32), jnp.zeros_like(k),
                                jnp.zeros_like(v)))
    return dq.astype(q.dtype), dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def blockwise_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, *,
                        block: int = 256):
    """flash_gpu.flash_attention's contract (same arguments, same result) in XLA loops."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    rows = jnp.transpose(q.reshape(b, t, kh, g, h), (0, 2, 1, 3, 4)).reshape(b, kh, t * g, h)
    qseg = jnp.repeat(q_segment_ids.astype(jnp.int32), g, axis=1)
    q_slot = (jnp.asarray(q_offset, jnp.int32).reshape(b, 1)
              + jnp.arange(t * g, dtype=jnp.int32)[None] // g)
    # A block that divides S where one exists (>= 16): padding would copy the key buffer.
    fits = [c for c in (block, block // 2, block // 4, block // 8, block // 16)
            if c >= 16 and s % c == 0]
    block = fits[0] if fits else min(block, s)
    pad = -s % block
    kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, H]
    kseg = kv_segment_ids.astype(jnp.int32)
    if pad:
        kt = jnp.pad(kt, ((0, 0), (0, 0), (0, pad), (0, 0)))
        vt = jnp.pad(vt, ((0, 0), (0, 0), (0, pad), (0, 0)))
        kseg = jnp.pad(kseg, ((0, 0), (0, pad)))
    out = _attend(rows, kt, vt, qseg, kseg, q_slot, block)
    out = out.reshape(b, kh, t, g, h)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, t, n, h)
