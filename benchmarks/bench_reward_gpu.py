"""Reward kernel vs the naive path (one forward per context) on a GPU, Qwen3-0.6B shape.

    python benchmarks/bench_reward_gpu.py                       # 0.6B, bf16, y 4096, K 32, a 1024
    python benchmarks/bench_reward_gpu.py --dtype float32
    python benchmarks/bench_reward_gpu.py --preset tiny --response 512 --segments 16 \\
        --reference 128 --prompt 64 --check-response 256       # CPU smoke test

Random weights (the architecture sets the cost, not the values), random token ids, the K
paragraph cuts spread over the response at random.
1. Check: kernel == naive in float32 ("highest" matmul precision) on a smaller shape
   (--check-*), max |diff| printed and asserted <= --tol. Stops before timing if it fails.
2. Time, in --dtype, at the full shape: the kernel, then the naive path with contexts sorted
   by length (--naive-rows per call: the fairest batching of one-forward-per-context), then in
   sample order (a call mixes a response's short and long contexts, padded to the longest).
   Each after one warm-up call (compilation excluded); median of --repeats. Also prints
   max |diff| at the full shape and dtype.
Self-contained apart from opera_jax; needs no checkpoint and no network.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opera_jax.model import Qwen3, Qwen3Config
from opera_jax.reward import RewardConfig, naive_reference_logprobs, reference_logprobs
from reward_inputs import make_inputs  # benchmarks/ is the script's folder


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-0.6b")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--response", type=int, default=4096)
    ap.add_argument("--segments", type=int, default=32)
    ap.add_argument("--reference", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contexts-per-step", type=int, default=8)
    ap.add_argument("--cache-windows", type=int, default=4)
    ap.add_argument("--naive-rows", type=int, default=8)
    ap.add_argument("--check-batch", type=int, default=2)
    ap.add_argument("--check-response", type=int, default=1024)
    ap.add_argument("--check-segments", type=int, default=8)
    ap.add_argument("--check-reference", type=int, default=256)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--skip-naive", action="store_true", help="time the kernel only")
    ap.add_argument("--skip-unsorted", action="store_true",
                    help="skip the naive path in sample order (each call padded to the "
                         "longest context of its response, as the issue's cost model)")
    args = ap.parse_args()

    cfg = Qwen3Config.preset(args.preset)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}")
    config = RewardConfig(batch_size=args.batch, contexts_per_step=args.contexts_per_step,
                          cache_windows=args.cache_windows)
    rng = np.random.default_rng(0)

    # 1. Equality in float32, full matmul precision.
    with jax.default_matmul_precision("highest"):
        model = build_model(cfg, jnp.float32)
        check = make_inputs(rng, batch=args.check_batch, prompt=args.prompt,
                            response=args.check_response, segments=args.check_segments,
                            reference=args.check_reference, vocab=cfg.vocab_size)
        diff = max_diff(reference_logprobs(model, *check, config=config),
                        naive_reference_logprobs(model, *check, rows_per_call=args.naive_rows,
                                                 sort_by_length=True))
        del model
    n_check = sum(len(c) for c in check[2])
    print(f"check (float32, {n_check} contexts, response {args.check_response}, "
          f"K {args.check_segments}, reference {args.check_reference}): "
          f"max |kernel - naive| = {diff:.2e}")
    if not diff <= args.tol:
        raise SystemExit(f"kernel != naive: {diff:.2e} > {args.tol:.0e}; not timing")

    # 2. Timing at the full shape.
    model = build_model(cfg, jnp.dtype(args.dtype))
    inputs = make_inputs(rng, batch=args.batch, prompt=args.prompt, response=args.response,
                         segments=args.segments, reference=args.reference, vocab=cfg.vocab_size)
    n_ctx = sum(len(c) for c in inputs[2])
    results = {}
    kernel_out = None

    def kernel():
        nonlocal kernel_out
        kernel_out = reference_logprobs(model, *inputs, config=config)

    results["kernel"] = timed(kernel, args.repeats)
    if not args.skip_naive:
        naive_out = None

        def naive():
            nonlocal naive_out
            naive_out = naive_reference_logprobs(model, *inputs, rows_per_call=args.naive_rows,
                                                 sort_by_length=True)

        results["naive (sorted by length)"] = timed(naive, args.repeats)
        print(f"full shape, {args.dtype}: max |kernel - naive| = "
              f"{max_diff(kernel_out, naive_out):.2e}")
        if not args.skip_unsorted:
            results["naive (sample order)"] = timed(
                lambda: naive_reference_logprobs(model, *inputs, rows_per_call=args.naive_rows),
                args.repeats)

    print(f"\n{args.preset}, {args.dtype}: batch {args.batch}, prompt {args.prompt}, "
          f"response {args.response}, K {args.segments}, reference {args.reference} "
          f"({n_ctx} contexts); median of {args.repeats}")
    print("| path | median s | min s | contexts/s | kernel speed-up (median) |")
    print("|---|---|---|---|---|")
    t_kernel = results["kernel"][0]
    for name, (med, low) in results.items():
        print(f"| {name} | {med:.3f} | {low:.3f} | {n_ctx / med:.1f} | {med / t_kernel:.2f}x |")


if __name__ == "__main__":
    main()
