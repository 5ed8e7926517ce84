"""Sizes padded up to a few buckets, so new lengths and counts rarely recompile a jitted call.

The sampler pads prompt lengths and counts to two buckets per octave (16, 24, 32, 48, …) and
its decode capacity to powers of two; the reward kernel pads lengths to `buckets_per_octave`.
"""

from __future__ import annotations

import math


def bucket_size(n: int, minimum: int = 1, per_octave: int = 16) -> int:
    """`n` padded up to a bucket: `minimum`, then `per_octave` buckets per octave (a power of
    two; 1 gives powers of two, 2 gives 2^k and 3·2^(k-1), 16 wastes ≤ 6.25 %)."""
    if per_octave < 1 or per_octave & (per_octave - 1):
        raise ValueError(f"buckets per octave must be a power of two, got {per_octave}")
    if n <= minimum:
        return minimum
    step = max(1, 2 ** (math.ceil(math.log2(n)) - per_octave.bit_length()))
    return round_up(n, step)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n."""
    return -(-n // multiple) * multiple
