"""Length buckets of the reward kernel: hand-computed sizes at two resolutions."""

import pytest

from opera_jax.reward import RewardConfig
from opera_jax.buckets import bucket_size


def test_bucket_sizes_by_hand():
    # 16 per octave: n in (64, 128] pads to a multiple of 4
    assert [bucket_size(n, 64) for n in (1, 64, 65, 100, 128, 129)] == [64, 64, 68, 100, 128, 136]
    # 2 per octave: 1.5x and 2x steps
    assert [bucket_size(n, 64, 2) for n in (65, 96, 97, 129, 200, 300)] == [96, 96, 128, 192, 256, 384]
    assert [bucket_size(n, 1, 1) for n in (3, 5, 9)] == [4, 8, 16]
    with pytest.raises(ValueError, match="power of two, got 3"):
        bucket_size(10, 1, 3)
    with pytest.raises(ValueError, match="buckets_per_octave must be a power of two, got 6"):
        RewardConfig(buckets_per_octave=6)
