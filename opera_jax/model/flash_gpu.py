"""Flash attention for NVIDIA GPUs in Pallas (Triton): any segment layout, a cache offset, GQA.

One kernel covers the call shapes cuDNN's fused path does not: packed rows (segment ids),
left-padded prompts, a prefill or reward pass against a KV cache (queries at slots
offset .. offset + T - 1 of the key buffer) and the dense cached decode (T = 1). The mask is
attention.py's: query t of row b sees key slot s iff

    q_segment_ids[b, t] == kv_segment_ids[b, s] != 0   and   s <= q_offset[b] + t

(key slots are buffer indices, as in the model). Grouped-query attention is native: the G query
heads of a KV head are rows of one block (row = t · G + g), so a decode step of G heads is one
block and keys are never repeated. Scores, softmax statistics and accumulation in float32;
keys past a query block's last visible slot are never read (causal skipping), so a prefill costs
half the full square. The backward pass (custom VJP) is two more kernels, dK/dV per key block and
dQ per query block, recomputing probabilities from the saved log-sum-exp: no [T, S] matrix is
ever stored.

`interpret=True` runs the same kernels in the Pallas interpreter on any platform (tests; the
planner's GPU estimate on CPU devices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_NEG = -1e30  # finite: exp(NEG - NEG) stays defined for rows that have seen no key yet


def _pad_to(x, axis: int, multiple: int, value=0):
    size = x.shape[axis]
    extra = -size % multiple
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad, constant_values=value)


def _mask(qseg, kseg, k_start, row_start, offset, *, block_k: int, groups: int):
    """bool [rows, block_k]: segment equality (nonzero) and key slot <= query slot."""
    rows = qseg.shape[0]
    q_slot = offset + (row_start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)) // groups
    k_slot = k_start + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    return (qseg[:, None] == kseg[None, :]) & (kseg[None, :] != 0) & (k_slot <= q_slot)


def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *,
                scale: float, block_q: int, block_k: int, groups: int, rows: int):
    i = pl.program_id(0)
    offset = off_ref[()]
    q = q_ref[...]
    qseg = qseg_ref[...]
    num_kb = k_ref.shape[0] // block_k

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * block_k, block_k)
        k, v, kseg = k_ref[keys, :], v_ref[keys, :], kseg_ref[keys]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        mask = _mask(qseg, kseg, j * block_k, i * block_q, offset, block_k=block_k,
                     groups=groups)
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        corr = jnp.exp(m - m_new)
        acc = acc * corr[:, None] + jnp.dot(p.astype(v.dtype), v,
                                            preferred_element_type=jnp.float32)
        return acc, m_new, l * corr + jnp.sum(p, axis=1)

    last_row = jnp.minimum((i + 1) * block_q, rows) - 1
    hi = jnp.minimum(num_kb, lax.div(offset + lax.div(last_row, groups), block_k) + 1)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), _NEG, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = lax.fori_loop(0, hi, body, init)
    seen = l > 0
    safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    # +inf for rows that see nothing: the backward's exp(s - lse) is then 0.
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe), jnp.inf)


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, scale: float, block_q: int, block_k: int, groups: int, rows: int):
    i = pl.program_id(0)
    offset = off_ref[()]
    q, do = q_ref[...], do_ref[...]
    qseg, lse, delta = qseg_ref[...], lse_ref[...], delta_ref[...]
    num_kb = k_ref.shape[0] // block_k

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k, v, kseg = k_ref[keys, :], v_ref[keys, :], kseg_ref[keys]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        mask = _mask(qseg, kseg, j * block_k, i * block_q, offset, block_k=block_k,
                     groups=groups)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    last_row = jnp.minimum((i + 1) * block_q, rows) - 1
    hi = jnp.minimum(num_kb, lax.div(offset + lax.div(last_row, groups), block_k) + 1)
    dq = lax.fori_loop(0, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(off_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref,
                 dk_ref, dv_ref, *, scale: float, block_q: int, block_k: int, groups: int):
    j = pl.program_id(0)
    offset = off_ref[()]
    k, v, kseg = k_ref[...], v_ref[...], kseg_ref[...]
    num_qb = q_ref.shape[0] // block_q

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        qseg, lse, delta = qseg_ref[rows], lse_ref[rows], delta_ref[rows]
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        mask = _mask(qseg, kseg, j * block_k, i * block_q, offset, block_k=block_k,
                     groups=groups)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [block_q, block_k]
        dv = dv + jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        dk = dk + jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    # Query rows before the first that can see this key block never contribute.
    lo = lax.div(jnp.maximum(j * block_k - offset, 0) * groups, block_q)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(jnp.minimum(lo, num_qb), num_qb, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(block_rows: int | None, full: int, h: int | None):
    """BlockSpec of a [B, K, rows, H] array (h given) or [B, rows] segment ids: a block of
    `block_rows` rows at the grid's first index, or all `full` rows (None)."""
    if h is not None:
        if block_rows is None:
            return pl.BlockSpec((None, None, full, h), lambda i, b, n: (b, n, 0, 0))
        return pl.BlockSpec((None, None, block_rows, h), lambda i, b, n: (b, n, i, 0))
    if block_rows is None:
        return pl.BlockSpec((None, full), lambda i, b, n: (b, 0))
    return pl.BlockSpec((None, block_rows), lambda i, b, n: (b, i))


def _stat_spec(block_rows: int | None, full: int):
    """BlockSpec of a float32 [B, K, rows] statistic (lse, delta)."""
    if block_rows is None:
        return pl.BlockSpec((None, None, full), lambda i, b, n: (b, n, 0))
    return pl.BlockSpec((None, None, block_rows), lambda i, b, n: (b, n, i))


_OFFSET_SPEC = pl.BlockSpec((None,), lambda i, b, n: (b,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _flash(q, k, v, qseg, kseg, offset, groups, block_q, block_k, rows, interpret):
    return _forward(q, k, v, qseg, kseg, offset, groups, block_q, block_k, rows, interpret)[0]


def _forward(q, k, v, qseg, kseg, offset, groups, block_q, block_k, rows, interpret):
    """q [B, K, R, H] (R padded to block_q), k/v [B, K, S, H] (S padded to block_k)."""
    b, kh, r, h = q.shape
    s = k.shape[2]
    kernel = functools.partial(_fwd_kernel, scale=h ** -0.5, block_q=block_q, block_k=block_k,
                               groups=groups, rows=rows)
    return pl.pallas_call(
        kernel, grid=(r // block_q, b, kh),
        in_specs=[_OFFSET_SPEC, _specs(block_q, r, h), _specs(None, s, h),
                  _specs(None, s, h), _specs(block_q, r, None),
                  _specs(None, s, None)],
        out_specs=[_specs(block_q, r, h), _stat_spec(block_q, r)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, kh, r), jnp.float32)],
        interpret=interpret, name="opera_flash_fwd")(offset, q, k, v, qseg, kseg)


def _flash_fwd(q, k, v, qseg, kseg, offset, groups, block_q, block_k, rows, interpret):
    out, lse = _forward(q, k, v, qseg, kseg, offset, groups, block_q, block_k, rows, interpret)
    return out, (q, k, v, qseg, kseg, offset, out, lse)


def _flash_bwd(groups, block_q, block_k, rows, interpret, residuals, do):
    q, k, v, qseg, kseg, offset, out, lse = residuals
    b, kh, r, h = q.shape
    s = k.shape[2]
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B, K, R]
    common = dict(scale=h ** -0.5, block_q=block_q, block_k=block_k, groups=groups)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, rows=rows, **common), grid=(r // block_q, b, kh),
        in_specs=[_OFFSET_SPEC, _specs(block_q, r, h), _specs(None, s, h),
                  _specs(None, s, h), _specs(block_q, r, None),
                  _specs(None, s, None), _specs(block_q, r, h),
                  _stat_spec(block_q, r), _stat_spec(block_q, r)],
        out_specs=_specs(block_q, r, h),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, name="opera_flash_dq")(offset, q, k, v, qseg, kseg, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, **common), grid=(s // block_k, b, kh),
        in_specs=[_OFFSET_SPEC, _specs(None, r, h), _specs(block_k, s, h),
                  _specs(block_k, s, h), _specs(None, r, None),
                  _specs(block_k, s, None), _specs(None, r, h),
                  _stat_spec(None, r), _stat_spec(None, r)],
        out_specs=[_specs(block_k, s, h), _specs(block_k, s, h)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret, name="opera_flash_dkdv")(offset, q, k, v, qseg, kseg, do, lse, delta)
    # Segment ids and the offset are integers: no cotangent.
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, *, block_q: int = 64,
                    block_k: int = 64, interpret: bool = False):
    """Masked grouped-query attention (see the module docstring for the mask).

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] (the whole key buffer).
      q_segment_ids: int [B, T]; kv_segment_ids: int [B, S] (0 = never attended).
      q_offset: int32 [B]: the key slot of query 0 (0 without a cache, the cache's end with
        one); query t sits at slot q_offset + t.
      block_q / block_k: rows (query positions x heads per KV head) and keys per block.
      interpret: run in the Pallas interpreter (CPU tests).
    Returns:
      [B, T, N, H] in q's dtype; a query that sees no key gives zeros (as the xla path).
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    # Rows t-major: row t·G + g is head (kv head, g) at query t.
    rows = jnp.transpose(q.reshape(b, t, kh, g, h), (0, 2, 1, 3, 4)).reshape(b, kh, t * g, h)
    block_q = min(block_q, max(16, pl.next_power_of_2(t * g)))
    block_k = min(block_k, max(16, pl.next_power_of_2(s)))
    rows = _pad_to(rows, 2, block_q)
    qseg = _pad_to(jnp.repeat(q_segment_ids.astype(jnp.int32), g, axis=1), 1, block_q)
    kt = _pad_to(jnp.swapaxes(k, 1, 2), 2, block_k)
    vt = _pad_to(jnp.swapaxes(v, 1, 2), 2, block_k)
    kseg = _pad_to(kv_segment_ids.astype(jnp.int32), 1, block_k)
    out = _flash(rows, kt, vt, qseg, kseg, jnp.asarray(q_offset, jnp.int32).reshape(b), g,
                 block_q, block_k, t * g, interpret)
    out = out[:, :, :t * g].reshape(b, kh, t, g, h)
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, t, n, h)
