"""Reward kernel vs the naive path (one forward per context) on CPU, tiny Qwen3 preset.

    python benchmarks/bench_reward_cpu.py                 # batch 8, y 512, K 16, a 128
    python benchmarks/bench_reward_cpu.py --repeats=5 --prompt=64

Random-weight tiny model (float32), random token ids; the K paragraph cuts are spread over the
response at random. Checks that both paths give the same LP values (max |diff|), then times
each after one warm-up call (compilation excluded), in interleaved rounds, and prints a
table. "naive" is one plain forward per context, `batch` contexts per call, padded to the
longest of the call: in sample order (each call mixes short and long contexts) and sorted by
length (the fairest batching of the naive path).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from opera_jax.model import Qwen3, Qwen3Config  # noqa: E402
from opera_jax.reward import (RewardConfig, naive_reference_logprobs,  # noqa: E402
                              reference_logprobs)
from reward_inputs import make_inputs  # noqa: E402  (benchmarks/ is the script's folder)

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "responses (and naive rows per call)")
flags.DEFINE_integer("prompt", 64, "prompt tokens per response")
flags.DEFINE_integer("response", 512, "response tokens")
flags.DEFINE_integer("segments", 16, "K, paragraph cuts per response")
flags.DEFINE_integer("reference", 128, "reference answer tokens")
flags.DEFINE_integer("repeats", 5, "timed rounds")
flags.DEFINE_integer("contexts_per_step", 16, "RewardConfig.contexts_per_step")


def timed(fns: dict, repeats: int) -> dict:
    """Median and min seconds of each function; rounds interleave the functions so that load
    from other processes on the machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: compiles every bucket shape
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    cfg = Qwen3Config.preset("tiny")
    model = Qwen3(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    inputs = make_inputs(rng, batch=FLAGS.batch, prompt=FLAGS.prompt, response=FLAGS.response,
                         segments=FLAGS.segments, reference=FLAGS.reference, vocab=cfg.vocab_size)
    config = RewardConfig(batch_size=FLAGS.batch, contexts_per_step=FLAGS.contexts_per_step)
    n_ctx = sum(len(c) for c in inputs[2])

    def kernel():
        return reference_logprobs(model, *inputs, config=config)

    def naive(sort=False):
        return naive_reference_logprobs(model, *inputs, rows_per_call=FLAGS.batch,
                                        sort_by_length=sort)

    diff = max(float(np.abs(a - b).max()) for a, b in zip(kernel(), naive()))
    print(f"devices: {jax.devices()}  contexts: {n_ctx}  max |kernel - naive| = {diff:.2e}")
    assert diff <= 1e-5, diff

    t = timed({"naive, rows in sample order": naive,
               "naive, rows sorted by length": lambda: naive(sort=True),
               "kernel": kernel}, FLAGS.repeats)
    print(f"\nbatch {FLAGS.batch}, prompt {FLAGS.prompt}, response {FLAGS.response}, "
          f"K {FLAGS.segments}, reference {FLAGS.reference} (float32, tiny preset, "
          f"median of {FLAGS.repeats})")
    print("| path | median s | min s | contexts/s | kernel speed-up (median) |")
    print("|---|---|---|---|---|")
    t_kernel = t["kernel"][0]
    for name, (med, low) in t.items():
        print(f"| {name} | {med:.3f} | {low:.3f} | {n_ctx / med:.0f} | {med / t_kernel:.2f}x |")


if __name__ == "__main__":
    app.run(main)
