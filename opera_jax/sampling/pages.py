"""The page allocator, on device: a stack of free pages and a reference count per page.

Pages are numbered 0 .. M-1; page 0 is the null page (see model/paged.py): never handed out,
never counted. A page is in use while some holder references it: a decode slot's page table, a
prompt entry, the host's prefix cache; each holder's reference is one count. `alloc` pops pages
(count 1), `retain` adds a reference, `release` drops references and pushes the pages that
reach 0 back on the stack. Every function takes a mask and is vectorised over its page list, so
the jitted decode loop can hand out and take back pages of many rows in one step.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class PageAlloc:
    free: jax.Array  # int32 [M]: free[0 : top] are the free pages (popped from the top)
    top: jax.Array  # int32 []
    refs: jax.Array  # int32 [M]

    @classmethod
    def init(cls, num_pages: int) -> "PageAlloc":
        # Popped from the top: pages 1, 2, 3, ... come out first.
        free = jnp.arange(num_pages - 1, -1, -1, dtype=jnp.int32)
        return cls(free=free, top=jnp.asarray(num_pages - 1, jnp.int32),
                   refs=jnp.zeros((num_pages,), jnp.int32))

    @property
    def num_pages(self) -> int:
        return self.free.shape[0]

    def in_use(self) -> jax.Array:
        """int32 []: pages referenced by anyone (the null page not counted)."""
        return self.num_pages - 1 - self.top


def alloc(a: PageAlloc, need: jax.Array) -> tuple[PageAlloc, jax.Array]:
    """One fresh page for every True entry of `need` (any shape), 0 elsewhere.

    The caller makes sure that `a.top >= need.sum()` (the engine checks before each step).
    """
    flat = need.reshape(-1)
    rank = jnp.cumsum(flat.astype(jnp.int32)) - 1
    pages = jnp.where(flat, a.free[jnp.clip(a.top - 1 - rank, 0, a.num_pages - 1)], 0)
    refs = a.refs.at[jnp.where(flat, pages, a.num_pages)].set(1, mode="drop")
    top = a.top - jnp.sum(flat.astype(jnp.int32))
    return a.replace(top=top, refs=refs), pages.reshape(need.shape)


def retain(a: PageAlloc, pages: jax.Array, mask: jax.Array) -> PageAlloc:
    """One more reference to each masked page (duplicates count once per occurrence)."""
    add = (mask & (pages != 0)).astype(jnp.int32).reshape(-1)
    return a.replace(refs=a.refs.at[pages.reshape(-1)].add(add))


def release(a: PageAlloc, pages: jax.Array, mask: jax.Array) -> PageAlloc:
    """Drops one reference per masked entry; pages left with none go back on the stack."""
    drop = (mask & (pages != 0)).astype(jnp.int32).reshape(-1)
    touched = jnp.zeros_like(a.refs).at[pages.reshape(-1)].add(drop)
    refs = a.refs - touched
    freed = (touched > 0) & (refs == 0)  # once per page, however often it was listed
    slot = a.top + jnp.cumsum(freed.astype(jnp.int32)) - 1
    ids = jnp.arange(a.num_pages, dtype=jnp.int32)
    free = a.free.at[jnp.where(freed, slot, a.num_pages)].set(ids, mode="drop")
    return a.replace(free=free, top=a.top + jnp.sum(freed.astype(jnp.int32)), refs=refs)
