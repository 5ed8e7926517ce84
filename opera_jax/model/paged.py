"""Paged KV cache: fixed-size pages in one pool per layer, a page table per row.

Axis letters as in qwen3.py, plus: M pages in the pool, P tokens per page (the page size),
J pages per row (page-table width), W = J·P tokens a row can hold.

Layout. Each layer's keys and values are one [K, M, P, H] buffer, the layout the Pallas paged
attention kernels read (TPU and GPU). Row b's token at position x lives in page
`table[b, x // P]`, offset x % P; rows may share pages (a prompt's pages, read-only), and a
row's pages need not be contiguous or ordered. Page 0 is the null page: never handed out;
padding tokens and idle rows write there and nothing reads it unmasked.

Memory: 2·L·K·H·(bytes of the cache dtype) per token held, e.g. 1 KiB for the tiny preset in
float32 and 112 KiB for Qwen3-0.6B in bf16; with P = 16 a page of Qwen3-0.6B is 1.75 MiB.

`PagedKVCache` goes into `Qwen3.__call__(cache=...)` in place of a `KVCache`: the new tokens
of row b sit at positions starts[b] .. starts[b] + T - 1 (rotary positions too, unless given);
their keys and values are written into the row's pages, then every query attends causally to
its row's positions 0 .. its own. The pages must already be in the table (the sampling engine
allocates them, see sampling/pages.py).

Attention kernels (`PagedKernel`), one query per row (decode):
  * XLA  — any platform, the reference: rows sorted by length, tiles of `slot_tile` rows, a
           `fori_loop` over blocks of `page_block` pages up to the tile's longest row with an
           online softmax. Work follows the rows' own lengths (at tile granularity), not J·P;
           gathered blocks stay small (tile · block pages).
  * PALLAS_GPU / PALLAS_TPU — `jax.experimental.pallas.ops.{gpu,tpu}.paged_attention` (the TPU
           kernel reads the pages in bfloat16).
`default_attention()` picks per platform. Several queries per row (chunked prefill) always take
the XLA chunk path: the row's J pages are gathered once for all T queries.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import flax.struct
import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


class PagedKernel(str, enum.Enum):
    XLA = "xla"
    PALLAS_GPU = "pallas_gpu"
    PALLAS_TPU = "pallas_tpu"


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """Static choice of decode kernel and its tiling (hashable)."""

    kernel: PagedKernel = PagedKernel.XLA
    slot_tile: int = 8  # XLA: rows per tile (0 = all rows in one tile)
    page_block: int = 4  # XLA: pages per loop iteration; PALLAS_*: pages per compute block
    interpret: bool = False  # PALLAS_*: run the kernel in the Pallas interpreter (tests)


def default_attention(platform: str | None = None) -> PagedAttention:
    """TPU: the Pallas kernel. GPU: the XLA path in one tile of all rows and 32-page blocks
    (few, large loop iterations; `benchmarks/bench_engine_gpu.py` also times PALLAS_GPU).
    CPU: the XLA path in tiles of 8 rows and 4-page blocks (work follows each tile's rows)."""
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return PagedAttention(PagedKernel.PALLAS_TPU, page_block=8)
    if platform in ("gpu", "cuda", "rocm"):
        return PagedAttention(PagedKernel.XLA, slot_tile=0, page_block=32)
    return PagedAttention(PagedKernel.XLA, slot_tile=8, page_block=4)


def bytes_per_token(config, dtype) -> int:
    """KV bytes one cached token takes: k and v, every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * (
        jnp.dtype(dtype).itemsize)


def _page_of(table, pos, page_size):
    """Physical page and offset of positions pos [B, T] in rows' tables [B, J]."""
    j = jnp.clip(pos // page_size, 0, table.shape[1] - 1)
    return jnp.take_along_axis(table, j, axis=1), pos % page_size


def write(pages, new, table, starts, valid):
    """Writes new [B, T, K, H] at positions starts[b] + t; invalid tokens go to page 0.

    pages: [K, M, P, H]. Returns the updated pages (in place inside a jitted loop).
    """
    t = new.shape[1]
    pos = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    page, off = _page_of(table, pos, pages.shape[2])
    page = jnp.where(valid, page, 0)
    return pages.at[:, page, off].set(jnp.transpose(new, (2, 0, 1, 3)).astype(pages.dtype))


def chunk_attention(q, k_pages, v_pages, table, starts):
    """Causal attention of T queries per row over the row's pages (prefill chunks).

    Args:
      q: [B, T, N, H], query t of row b at position starts[b] + t.
      k_pages, v_pages: [K, M, P, H], the chunk's own keys already written.
      table: int32 [B, J]; starts: int32 [B].
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    kh, _, p, _ = k_pages.shape
    w = table.shape[1] * p
    k = k_pages[:, table].reshape(kh, b, w, h).astype(q.dtype)  # [K, B, W, H]
    v = v_pages[:, table].reshape(kh, b, w, h).astype(q.dtype)
    qg = jnp.transpose(q.reshape(b, t, kh, n // kh, h), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    # float32 scores and softmax, as the dense path (attention.xla_attention).
    scores = jnp.einsum("BKGTH,KBWH->BKGTW", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    qpos = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, T]
    mask = (jnp.arange(w, dtype=jnp.int32)[None, None, :] <= qpos[:, :, None])[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
    out = jnp.einsum("BKGTW,KBWH->BKGTH", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q.dtype)


def _tile_attention(q, k_pages, v_pages, table, lengths, page_block):
    """Online-softmax attention of one tile: q [R, K, G, H] (scaled), table [R, J],
    lengths [R] with lengths[0] the tile's longest. Returns float32 [R, K, G, H]."""
    r, kh, g, h = q.shape
    p = k_pages.shape[2]
    span = page_block * p

    def body(i, carry):
        m, l, o = carry
        idx = jax.lax.dynamic_slice_in_dim(table, i * page_block, page_block, axis=1)
        k = k_pages[:, idx].reshape(kh, r, span, h).astype(q.dtype)  # [K, R, span, H]
        v = v_pages[:, idx].reshape(kh, r, span, h).astype(q.dtype)
        s = jnp.einsum("RKGH,KRWH->RKGW", q, k, preferred_element_type=jnp.float32)
        pos = i * span + jnp.arange(span, dtype=jnp.int32)
        mask = (pos[None, :] < lengths[:, None])[:, None, None, :]
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _NEG), axis=-1))
        e = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("RKGW,KRWH->RKGH", e.astype(v.dtype), v,
                        preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(e, axis=-1), o * corr[..., None] + pv

    blocks = (lengths[0] + span - 1) // span
    init = (jnp.full((r, kh, g), _NEG, jnp.float32), jnp.zeros((r, kh, g), jnp.float32),
            jnp.zeros((r, kh, g, h), jnp.float32))
    _, l, o = jax.lax.fori_loop(0, blocks, body, init)
    return o / jnp.where(l > 0, l, 1.0)[..., None]


def decode_attention_xla(q, k_pages, v_pages, table, lengths, *, slot_tile: int = 8,
                         page_block: int = 4):
    """One query per row over its first `lengths[b]` positions.

    Args:
      q: [B, N, H]; k_pages, v_pages: [K, M, P, H]; table: int32 [B, J]; lengths: int32 [B].
      slot_tile, page_block: static tiling (see the module docstring).
    Returns:
      [B, N, H] in q's dtype.
    """
    b, n, h = q.shape
    kh = k_pages.shape[0]
    tile = slot_tile if slot_tile and b % slot_tile == 0 else b
    block = min(page_block, table.shape[1])
    if table.shape[1] % block:  # pad with null pages, never unmasked
        table = jnp.pad(table, ((0, 0), (0, block - table.shape[1] % block)))
    # Longest rows first: each tile loops up to its own longest row only.
    order = jnp.argsort(-lengths)
    qs = (q * (h ** -0.5)).reshape(b, kh, n // kh, h)[order]
    ts, ls = table[order], lengths[order]
    outs = [_tile_attention(qs[i:i + tile], k_pages, v_pages, ts[i:i + tile], ls[i:i + tile],
                            block) for i in range(0, b, tile)]
    out = jnp.concatenate(outs)[jnp.argsort(order)]  # back to row order
    return out.reshape(b, n, h).astype(q.dtype)


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def decode_attention_pallas(q, k_pages, v_pages, table, lengths, *, kernel: PagedKernel,
                            page_block: int, interpret: bool = False):
    """The Pallas paged-attention kernels (same contract as `decode_attention_xla`)."""
    h = q.shape[-1]
    qs = (q * (h ** -0.5)).astype(q.dtype)
    j = table.shape[1]
    if kernel is PagedKernel.PALLAS_TPU:
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention
        from jax.experimental.pallas import tpu as pltpu

        call = functools.partial(paged_attention, qs, k_pages, v_pages, lengths, table,
                                 pages_per_compute_block=_divisor_at_most(j, page_block))
        if interpret:
            with pltpu.force_tpu_interpret_mode():
                return call()
        return call()
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    # Triton wants power-of-two blocks: a power-of-two block of pages that divides J, and the
    # most sequence splits (<= 16, flash-decoding style) whose partitions hold whole blocks.
    block = 1 << (max(1, page_block).bit_length() - 1)
    while j % block:
        block //= 2
    splits = max(d for d in range(1, 17) if j % d == 0 and (j // d) % block == 0)
    return paged_attention(qs, k_pages, v_pages, table, lengths, k_splits=splits,
                           pages_per_compute_block=block, interpret=interpret)


@flax.struct.dataclass
class PagedLayer:
    """What one `Attention` layer gets from a `PagedKVCache`: its pages and the row layout."""

    k: jax.Array  # [K, M, P, H]
    v: jax.Array
    table: jax.Array  # int32 [B, J]
    starts: jax.Array  # int32 [B]
    valid: jax.Array  # bool [B, T]
    attention: PagedAttention = flax.struct.field(pytree_node=False)

    def attend(self, q, k_new, v_new):
        """Writes k_new, v_new [B, T, K, H] into the pages, then attends q [B, T, N, H].

        Returns ([B, T, N, H], (k pages, v pages)).
        """
        k = write(self.k, k_new, self.table, self.starts, self.valid)
        v = write(self.v, v_new, self.table, self.starts, self.valid)
        a = self.attention
        if q.shape[1] > 1:
            out = chunk_attention(q, k, v, self.table, self.starts)
        elif a.kernel is PagedKernel.XLA:
            out = decode_attention_xla(q[:, 0], k, v, self.table, self.starts + 1,
                                       slot_tile=a.slot_tile, page_block=a.page_block)[:, None]
        else:
            out = decode_attention_pallas(q[:, 0], k, v, self.table, self.starts + 1,
                                          kernel=a.kernel, page_block=a.page_block,
                                          interpret=a.interpret)[:, None]
        return out, (k, v)


@flax.struct.dataclass
class PagedKVCache:
    """The pools of every layer plus this call's row layout (see the module docstring)."""

    k: tuple[jax.Array, ...]  # L × [K, M, P, H]
    v: tuple[jax.Array, ...]
    table: jax.Array  # int32 [B, J] page table of each row
    starts: jax.Array  # int32 [B] tokens each row already has in the cache
    valid: jax.Array  # bool [B, T] which new tokens are real (the rest write page 0)
    attention: PagedAttention = flax.struct.field(pytree_node=False, default=PagedAttention())

    @property
    def end(self) -> jax.Array:
        """[B, 1]: the default rotary position of each row's first new token."""
        return self.starts[:, None]

    def layer(self, i: int, k: jax.Array, v: jax.Array) -> PagedLayer:
        return PagedLayer(k=k, v=v, table=self.table, starts=self.starts, valid=self.valid,
                          attention=self.attention)
