"""Random reward-benchmark inputs shared by bench_reward_cpu.py and bench_reward_gpu.py."""

import numpy as np

from opera_jax.reward import Context


def make_inputs(rng, *, batch, prompt, response, segments, reference, vocab):
    """Random prompt + response ids, reference ids and contexts [full, initial, K cuts]."""
    sequences, references, contexts = [], [], []
    for _ in range(batch):
        sequences.append(rng.integers(0, vocab, prompt + response).tolist())
        references.append(rng.integers(0, vocab, reference).tolist())
        cuts = np.sort(rng.choice(np.arange(2, response), segments - 1, replace=False))
        ctx = [Context(prompt + response), Context(prompt + 1)]
        ctx += [Context(prompt + int(c)) for c in cuts] + [Context(prompt + response - 1)]
        contexts.append(ctx)
    return sequences, references, contexts
