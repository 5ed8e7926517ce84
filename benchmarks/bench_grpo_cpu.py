"""Seconds per GRPO step on the CPU, split into rollout / reward / update: the real loop
(configs/grpo_tiny.py: tiny preset, 8 prompts × 4 responses, 2 updates per step).

    python benchmarks/bench_grpo_cpu.py                        # random init, 64 new tokens
    python benchmarks/bench_grpo_cpu.py --sft-steps 300 --new-tokens 192   # from a tiny SFT

From random weights the responses are noise without think blocks, so the reward scores only
c_full and c_0 (K = 0): a lower bound on its cost. `--sft-steps` first trains the tiny SFT on
the toy domain (configs/sft_tiny.py, ~35 s) and starts GRPO from it: the responses then have
think blocks of several paragraphs, and the reward does its real work (K + 2 contexts each).

The same run (same seeds, so the same shapes) is repeated `--reps` times in one process; all but
the first are compile-free (the reward kernel compiles once per length / context-count bucket,
which a single run would keep paying for as new buckets appear). Printed: per-section median
and mean seconds over the timed runs' steps, the reward's share of the step, generated tokens/s.
"update" includes the no-grad log-prob passes (reference; old log-probs when recomputed).
"""

import argparse
import os
import statistics
import tempfile

import jax

from opera_jax.train import sft
from opera_jax.train.cli import load_config_file
from opera_jax.train.grpo import train
from opera_jax.train.metrics import read_metrics

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs")
CONFIG = os.path.join(CONFIGS, "grpo_tiny.py")
SFT_CONFIG = os.path.join(CONFIGS, "sft_tiny.py")
SECTIONS = ("rollout", "reward", "update", "logprob", "step")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--reps", type=int, default=2, help="runs; the first one compiles")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sft-steps", type=int, default=0, help="0 = start from random weights")
    args = p.parse_args()
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, tiny "
          f"preset ({args.dtype}), {args.prompts} prompts x {args.n} responses, "
          f"{args.new_tokens} new tokens, {args.steps} steps x {args.reps} runs, "
          f"init: {f'{args.sft_steps}-step SFT' if args.sft_steps else 'random'}")
    timed = []
    with tempfile.TemporaryDirectory() as tmp:
        init = ""
        if args.sft_steps:
            init = os.path.join(tmp, "sft")
            c = load_config_file(SFT_CONFIG)
            c.workdir, c.data.path = init, os.path.join(init, "toy.jsonl")
            c.data.write_toy_rows, c.model.dtype = 2000, args.dtype
            c.sft.steps, c.sft.log_every, c.checkpoint.every = args.sft_steps, 50, 0
            sft.train(c)
        for rep in range(args.reps):
            c = load_config_file(CONFIG)
            c.workdir = os.path.join(tmp, f"run{rep}")
            c.data.path = os.path.join(tmp, "prompts.jsonl")
            c.init.checkpoint = init
            c.model.dtype = args.dtype
            c.rollout.num_prompts, c.rollout.n = args.prompts, args.n
            c.rollout.max_new_tokens = args.new_tokens
            c.grpo.steps = args.steps
            c.validation.every = 0
            c.checkpoint.every = 0  # the final checkpoint only
            train(c)
            rows = [r for r in read_metrics(c.workdir) if "time/step_s" in r]
            if rep or args.reps == 1:
                timed += rows if args.reps > 1 else rows[1:]
    print(f"\n{'section':>8} {'median s':>9} {'mean s':>8} {'share':>6}")
    step = statistics.median(r["time/step_s"] for r in timed)
    for name in SECTIONS:
        xs = [r[f"time/{name}_s"] for r in timed]
        print(f"{name:>8} {statistics.median(xs):>9.4f} {statistics.mean(xs):>8.4f} "
              f"{statistics.median(xs) / step:>6.1%}")
    share = [r["time/reward_share"] for r in timed]
    print(f"\nreward share of the step: median {statistics.median(share):.1%} "
          f"(min {min(share):.1%}, max {max(share):.1%}) over {len(timed)} steps")
    print(f"generated tokens/s: {statistics.median(r['tokens_per_s'] for r in timed):,.0f} "
          f"(rollout alone {statistics.median(r['throughput/rollout_tokens_per_s'] for r in timed):,.0f}); "
          f"mean response {statistics.mean(r['response/len'] for r in timed):.1f} tokens, "
          f"think block {statistics.mean(r['response/think_len'] for r in timed):.1f}, "
          f"guiding words {statistics.mean(r['response/guiding_words'] for r in timed):.2f}")


if __name__ == "__main__":
    main()
