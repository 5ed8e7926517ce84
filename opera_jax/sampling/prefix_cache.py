"""Host-side prefix cache: full KV pages of earlier prompts, found again by their tokens.

A tree with one node per cached page: the children of a node are keyed by the next page's P
tokens, so a node stands for the exact token prefix from the root to it (no hashing, no
collisions). A prompt reuses the longest chain of nodes matching its full pages; its KV there
is the same whatever came after (causal attention), so only the rest is prefilled.

The cache holds one reference to each of its pages (see pages.py); `evict` gives back the
least recently used leaves when the pool runs short, `clear` everything (new weights make
every cached page stale). Each node may also keep its tokens' prompt log-probs, so a call that
asks for them can reuse the node too.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np


@dataclasses.dataclass(eq=False)
class Node:
    page: int
    key: tuple[int, ...]
    parent: "Node | None"
    children: dict = dataclasses.field(default_factory=dict)
    # log p(token | the tokens before it) for the page's P tokens (0 for the prompt's first).
    logprobs: np.ndarray | None = None
    used: int = 0


class PrefixCache:
    """Pages keyed by token prefix (see the module docstring)."""

    def __init__(self, page_size: int):
        self.page_size = page_size
        self._root = Node(page=0, key=(), parent=None)
        self._clock = itertools.count(1)
        self._count = 0

    def __len__(self) -> int:
        """Pages held."""
        return self._count

    def _keys(self, tokens: Sequence[int], pages: int):
        p = self.page_size
        return [tuple(int(t) for t in tokens[j * p:(j + 1) * p]) for j in range(pages)]

    def match(self, tokens: Sequence[int], *, max_pages: int,
              need_logprobs: bool = False) -> list[Node]:
        """The longest chain of cached nodes for the full pages of `tokens` (at most
        `max_pages`; with `need_logprobs`, only nodes that kept their log-probs)."""
        node, out = self._root, []
        tick = next(self._clock)
        for key in self._keys(tokens, min(max_pages, len(tokens) // self.page_size)):
            node = node.children.get(key)
            if node is None or (need_logprobs and node.logprobs is None):
                break
            node.used = tick
            out.append(node)
        return out

    def insert(self, tokens: Sequence[int], pages: Sequence[int],
               logprobs: np.ndarray | None = None) -> list[int]:
        """Caches the full pages of a prefilled prompt.

        Args:
          tokens: the prompt; pages: its page ids, one per full page (len(tokens) // P at
            most are used); logprobs: optional float32 [len(tokens)] prompt log-probs.
        Returns:
          The pages that the cache now references (the caller adds one reference to each);
          pages whose prefix was already cached under another page are not taken.
        """
        node, taken = self._root, []
        tick = next(self._clock)
        p = self.page_size
        for j, key in enumerate(self._keys(tokens, min(len(pages), len(tokens) // p))):
            lp = None if logprobs is None else np.asarray(logprobs[j * p:(j + 1) * p],
                                                          np.float32)
            child = node.children.get(key)
            if child is None:
                child = Node(page=int(pages[j]), key=key, parent=node, logprobs=lp)
                node.children[key] = child
                taken.append(child.page)
                self._count += 1
            elif child.logprobs is None and lp is not None:
                child.logprobs = lp
            child.used = tick
            node = child
        return taken

    def evict(self, count: int, keep: Sequence[Node] = ()) -> list[int]:
        """Drops up to `count` least recently used leaves (never a node in `keep`); returns
        their pages (the caller releases one reference to each)."""
        keep_ids = {id(n) for n in keep}
        freed = []
        while len(freed) < count:
            leaves = [n for n in self._nodes() if not n.children and id(n) not in keep_ids]
            if not leaves:
                break
            leaves.sort(key=lambda n: n.used)
            for leaf in leaves[:count - len(freed)]:
                del leaf.parent.children[leaf.key]
                freed.append(leaf.page)
                self._count -= 1
        return freed

    def clear(self) -> list[int]:
        """Drops every node; returns their pages."""
        pages = [n.page for n in self._nodes()]
        self._root.children.clear()
        self._count = 0
        return pages

    def _nodes(self):
        stack = list(self._root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())
