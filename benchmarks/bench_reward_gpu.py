"""Reward kernel vs the naive path (one forward per context) on a GPU, Qwen3-0.6B shape.

    python benchmarks/bench_reward_gpu.py                       # 0.6B, bf16, y 4096, K 32, a 1024
    python benchmarks/bench_reward_gpu.py --dtype=float32
    python benchmarks/bench_reward_gpu.py --preset=tiny --response=512 --segments=16 \\
        --reference=128 --prompt=64 --check_response=256       # CPU smoke test

Random weights (the architecture sets the cost, not the values), random token ids, the K
paragraph cuts spread over the response at random.
1. Check: kernel == naive in float32 ("highest" matmul precision) on a smaller shape
   (--check_*), max |diff| printed and asserted <= --tol. Stops before timing if it fails.
2. Time, in --dtype, at the full shape: the kernel, then the naive path with contexts sorted
   by length (--naive_rows per call: the fairest batching of one-forward-per-context), then in
   sample order (a call mixes a response's short and long contexts, padded to the longest).
   Each after one warm-up call (compilation excluded); median of --repeats. Also prints
   max |diff| at the full shape and dtype.
Self-contained apart from opera_jax; needs no checkpoint and no network.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from opera_jax.model import Qwen3, Qwen3Config
from opera_jax.reward import RewardConfig, naive_reference_logprobs, reference_logprobs
from reward_inputs import make_inputs  # benchmarks/ is the script's folder

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "qwen3-0.6b", "Qwen3Config preset")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "timing dtype")
flags.DEFINE_integer("batch", 8, "responses")
flags.DEFINE_integer("prompt", 256, "prompt tokens per response")
flags.DEFINE_integer("response", 4096, "response tokens")
flags.DEFINE_integer("segments", 32, "K, paragraph cuts per response")
flags.DEFINE_integer("reference", 1024, "reference answer tokens")
flags.DEFINE_integer("repeats", 3, "timed calls per path")
flags.DEFINE_integer("contexts_per_step", 8, "RewardConfig.contexts_per_step")
flags.DEFINE_integer("cache_windows", 4, "RewardConfig.cache_windows")
flags.DEFINE_integer("naive_rows", 8, "contexts per call of the naive path")
flags.DEFINE_integer("check_batch", 2, "responses of the float32 check")
flags.DEFINE_integer("check_response", 1024, "response tokens of the check")
flags.DEFINE_integer("check_segments", 8, "K of the check")
flags.DEFINE_integer("check_reference", 256, "reference tokens of the check")
flags.DEFINE_float("tol", 1e-4, "max |kernel - naive| the check accepts")
flags.DEFINE_bool("naive", True, "also time the naive path (--nonaive: the kernel only)")
flags.DEFINE_bool("unsorted", True, "also time the naive path in sample order (each call "
                  "padded to the longest context of its response, as the issue's cost model)")


def build_model(cfg, dtype, seed=0):
    return Qwen3(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def max_diff(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def timed(fn, repeats):
    fn()  # warm-up: compiles every bucket shape
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = Qwen3Config.preset(FLAGS.preset)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    config = RewardConfig(batch_size=FLAGS.batch, contexts_per_step=FLAGS.contexts_per_step,
                          cache_windows=FLAGS.cache_windows)
    rng = np.random.default_rng(0)

    # 1. Equality in float32, full matmul precision.
    with jax.default_matmul_precision("highest"):
        model = build_model(cfg, jnp.float32)
        check = make_inputs(rng, batch=FLAGS.check_batch, prompt=FLAGS.prompt,
                            response=FLAGS.check_response, segments=FLAGS.check_segments,
                            reference=FLAGS.check_reference, vocab=cfg.vocab_size)
        diff = max_diff(reference_logprobs(model, *check, config=config),
                        naive_reference_logprobs(model, *check, rows_per_call=FLAGS.naive_rows,
                                                 sort_by_length=True))
        del model
    n_check = sum(len(c) for c in check[2])
    print(f"check (float32, {n_check} contexts, response {FLAGS.check_response}, "
          f"K {FLAGS.check_segments}, reference {FLAGS.check_reference}): "
          f"max |kernel - naive| = {diff:.2e}")
    if not diff <= FLAGS.tol:
        raise SystemExit(f"kernel != naive: {diff:.2e} > {FLAGS.tol:.0e}; not timing")

    # 2. Timing at the full shape.
    model = build_model(cfg, jnp.dtype(FLAGS.dtype))
    inputs = make_inputs(rng, batch=FLAGS.batch, prompt=FLAGS.prompt, response=FLAGS.response,
                         segments=FLAGS.segments, reference=FLAGS.reference, vocab=cfg.vocab_size)
    n_ctx = sum(len(c) for c in inputs[2])
    results = {}
    kernel_out = None

    def kernel():
        nonlocal kernel_out
        kernel_out = reference_logprobs(model, *inputs, config=config)

    results["kernel"] = timed(kernel, FLAGS.repeats)
    if FLAGS.naive:
        naive_out = None

        def naive():
            nonlocal naive_out
            naive_out = naive_reference_logprobs(model, *inputs, rows_per_call=FLAGS.naive_rows,
                                                 sort_by_length=True)

        results["naive (sorted by length)"] = timed(naive, FLAGS.repeats)
        print(f"full shape, {FLAGS.dtype}: max |kernel - naive| = "
              f"{max_diff(kernel_out, naive_out):.2e}")
        if FLAGS.unsorted:
            results["naive (sample order)"] = timed(
                lambda: naive_reference_logprobs(model, *inputs, rows_per_call=FLAGS.naive_rows),
                FLAGS.repeats)

    print(f"\n{FLAGS.preset}, {FLAGS.dtype}: batch {FLAGS.batch}, prompt {FLAGS.prompt}, "
          f"response {FLAGS.response}, K {FLAGS.segments}, reference {FLAGS.reference} "
          f"({n_ctx} contexts); median of {FLAGS.repeats}")
    print("| path | median s | min s | contexts/s | kernel speed-up (median) |")
    print("|---|---|---|---|---|")
    t_kernel = results["kernel"][0]
    for name, (med, low) in results.items():
        print(f"| {name} | {med:.3f} | {low:.3f} | {n_ctx / med:.1f} | {med / t_kernel:.2f}x |")


if __name__ == "__main__":
    app.run(main)
