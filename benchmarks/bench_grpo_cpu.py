"""Seconds per GRPO step on the CPU, split into rollout / reward / update: the real loop
(configs/grpo_tiny.py: tiny preset, 8 prompts × 4 responses, 2 updates per step).

    python benchmarks/bench_grpo_cpu.py                         # random init, 64 new tokens
    python benchmarks/bench_grpo_cpu.py --sft_steps=300 --new_tokens=192   # from a tiny SFT

From random weights the responses are noise without think blocks, so the reward scores only
c_full and c_0 (K = 0): a lower bound on its cost. `--sft_steps` first trains the tiny SFT on
the toy domain (configs/sft_tiny.py, ~35 s) and starts GRPO from it: the responses then have
think blocks of several paragraphs, and the reward does its real work (K + 2 contexts each).

The same run (same seeds, so the same shapes) is repeated `--reps` times in one process; all but
the first are compile-free (the reward kernel compiles once per length / context-count bucket,
which a single run would keep paying for as new buckets appear). Printed: per-section median
and mean seconds over the timed runs' steps, the reward's share of the step, generated tokens/s.
"update" includes the no-grad log-prob passes (reference; old log-probs when recomputed).
"""

import os
import statistics
import tempfile

import jax
from absl import app, flags

from opera_jax import cli
from opera_jax.config.runs import parse
from opera_jax.config.setups import grpo_tiny, sft_tiny
from opera_jax.train import grpo, sft
from opera_jax.train.metrics import read_metrics

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 12, "RL steps per run")
flags.DEFINE_integer("reps", 2, "runs; the first one compiles")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
flags.DEFINE_integer("prompts", 8, "prompts per RL step")
flags.DEFINE_integer("n", 4, "responses per prompt")
flags.DEFINE_integer("new_tokens", 64, "max new tokens per response")
flags.DEFINE_integer("sft_steps", 0, "SFT steps before GRPO; 0 = start from random weights")

SECTIONS = ("rollout", "reward", "update", "logprob", "step")


def bench() -> None:
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, tiny "
          f"preset ({FLAGS.dtype}), {FLAGS.prompts} prompts x {FLAGS.n} responses, "
          f"{FLAGS.new_tokens} new tokens, {FLAGS.steps} steps x {FLAGS.reps} runs, "
          f"init: {f'{FLAGS.sft_steps}-step SFT' if FLAGS.sft_steps else 'random'}")
    timed = []
    with tempfile.TemporaryDirectory() as tmp:
        init = None
        if FLAGS.sft_steps:
            init = os.path.join(tmp, "sft")
            c = sft_tiny()
            c.workdir, c.data.path, c.model.dtype = init, "toy:sft:2000", FLAGS.dtype
            c.sft.steps, c.sft.log_every, c.checkpoint.every = FLAGS.sft_steps, 50, None
            sft.train(parse(c))
        for rep in range(FLAGS.reps):
            c = grpo_tiny()
            c.workdir = os.path.join(tmp, f"run{rep}")
            c.model.checkpoint = init
            c.model.dtype = FLAGS.dtype
            c.rollout.num_prompts, c.rollout.n = FLAGS.prompts, FLAGS.n
            c.rollout.max_new_tokens = FLAGS.new_tokens
            c.grpo.steps = FLAGS.steps
            c.validation.every = None
            c.checkpoint.every = None  # the final checkpoint only
            grpo.train(parse(c))
            rows = [r for r in read_metrics(c.workdir) if "time/step_s" in r]
            if rep or FLAGS.reps == 1:
                timed += rows if FLAGS.reps > 1 else rows[1:]
    print(f"\n{'section':>8} {'median s':>9} {'mean s':>8} {'share':>6}")
    step = statistics.median(r["time/step_s"] for r in timed)
    for name in SECTIONS:
        xs = [r[f"time/{name}_s"] for r in timed]
        print(f"{name:>8} {statistics.median(xs):>9.4f} {statistics.mean(xs):>8.4f} "
              f"{statistics.median(xs) / step:>6.1%}")
    share = [r["time/reward_share"] for r in timed]
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    mean = lambda k: statistics.mean(r[k] for r in timed)  # noqa: E731
    print(f"\nreward share of the step: median {statistics.median(share):.1%} "
          f"(min {min(share):.1%}, max {max(share):.1%}) over {len(timed)} steps")
    print(f"generated tokens/s: {med('tokens_per_s'):,.0f} (rollout alone "
          f"{med('throughput/rollout_tokens_per_s'):,.0f}); mean response "
          f"{mean('response/len'):.1f} tokens, think block {mean('response/think_len'):.1f}, "
          f"guiding words {mean('response/guiding_words'):.2f}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run_main(bench)


if __name__ == "__main__":
    app.run(main)
