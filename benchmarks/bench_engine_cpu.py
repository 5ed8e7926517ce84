"""Rollout-shaped sampling on the CPU, tiny preset: the engine (`slots=`) vs today's sampler.

    python benchmarks/bench_engine_cpu.py                  # 64 × 16, cap 512
    python benchmarks/bench_engine_cpu.py --prompts 8 --n 4 --cap 64  # quick

Workload (rollout_workload.py): 64 prompts × 16 samples, prompts of 32-127 tokens, response
lengths log-normal with median cap / 6 and 5 % at the cap, imposed as per-row max_new_tokens
(no EOS). Random-weight tiny Qwen3 (float32, 2 layers, vocab 1024), temperature 1, no
filters, one seed. Variants, each timed on its second call (the first compiles):
  fixed     today's `Sampler.sample`: all rows in one call (as the GRPO rollout), one
            [rows, prompt + cap] cache, every row waiting for the longest;
  compact   the same with `compact=True` (the batch halves whenever half its rows finished);
  engine S  `Sampler.sample(slots=S)` (prefix cache cleared before the timed call).
Reported: generated tokens per second of wall time (prefill included); decode steps (loop
iterations) against the ideal generated / S; KV bytes: the fixed sampler's cache, the
engine's pages in use at its peak and the bytes of the tokens they held then; and how many
rows are the same as the fixed sampler's (same seed: same streams).
Targets (issue): engine >= 3x the fixed sampler's tokens/s, decode steps <= 1.25x ideal,
peak KV <= 1.3x the live tokens' bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opera_jax  # noqa: E402
from opera_jax.model.paged import bytes_per_token  # noqa: E402
from opera_jax.sampling import Sampler  # noqa: E402
from rollout_workload import rollout  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--cap", type=int, default=512)
    parser.add_argument("--slots", type=int, nargs="+", default=[64])
    parser.add_argument("--kv-mib", type=int, default=256, help="engine pool size")
    parser.add_argument("--no-compact", action="store_true")
    args = parser.parse_args()

    cfg = opera_jax.Qwen3Config.preset("tiny")
    model = opera_jax.init_model(cfg, seed=0)
    w = rollout(prompts=args.prompts, n=args.n, cap=args.cap)
    bpt = bytes_per_token(cfg, "float32")
    print(f"jax {jax.__version__} on {jax.devices()}; cpu cores: {os.cpu_count()}")
    print(f"{args.prompts} prompts x {args.n}, cap {args.cap}: {w.generated_tokens:,} tokens, "
          f"mean {w.max_new.mean():.0f}, {(w.max_new >= args.cap).mean():.1%} at the cap")
    kw = dict(max_new_tokens=w.max_new, temperature=1.0, n=w.n, seed=1)
    rows = []

    fixed = Sampler(model, pad_id=0)
    variants = [("fixed", {})] + ([] if args.no_compact else [("compact", dict(compact=True))])
    ref = None
    for name, extra in variants:
        fixed.sample(w.prompts, **kw, **extra)  # compile
        out, secs = timed(lambda: fixed.sample(w.prompts, **kw, **extra))
        ref = out if ref is None else ref
        width = out.tokens.shape[1] + (-(-max(map(len, w.prompts)) // 16) * 16)
        kv = out.tokens.shape[0] * width * bpt  # its [rows, prompt bucket + capacity] cache
        rows.append((name, w.generated_tokens / secs, secs,
                     int(w.max_new.max()) if name == "fixed" else None, None, kv, None, None))
        print(rows[-1], flush=True)

    engine_sampler = Sampler(model, pad_id=0, kv_memory=args.kv_mib << 20)
    for s in args.slots:
        engine_sampler.sample(w.prompts, slots=s, **kw)  # compile
        engine_sampler.engine.clear_prefix_cache()
        out, secs = timed(lambda: engine_sampler.sample(w.prompts, slots=s, **kw))
        st = engine_sampler.engine.last_stats
        same = np.mean([np.array_equal(out.row(r)[0], ref.row(r)[0])
                        for r in range(len(out.lengths))])
        rows.append((f"engine S={s}", w.generated_tokens / secs, secs, st.decode_steps,
                     st.ideal_steps, st.peak_kv_bytes, st.peak_live_tokens * bpt, same))
        print(rows[-1], st, flush=True)

    print("\n| sampler | tokens/s | s per call | decode steps | / ideal | peak KV MiB | "
          "live tokens MiB | KV / live | rows = fixed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = rows[0][1]
    for name, tps, secs, steps, ideal, kv, live, same in rows:
        print(f"| {name} | {tps:,.0f} ({tps / base:.2f}x) | {secs:.1f} | "
              f"{steps if steps is not None else '-'} | "
              f"{f'{steps / ideal:.3f}' if ideal else '-'} | {kv / 2**20:,.1f} | "
              f"{f'{live / 2**20:,.1f}' if live else '-'} | "
              f"{f'{kv / live:.3f}' if live else '-'} | "
              f"{f'{same:.1%}' if same is not None else '-'} |")


if __name__ == "__main__":
    main()
