"""SFT training tokens/s of the tiny preset on the CPU: the real loop (data, packing, jitted
step, metrics), configs/sft_tiny.py (`setups.sft_tiny`) on the embedded toy domain.

    python benchmarks/bench_sft_cpu.py [--steps=40] [--log_every=10] [--dtypes=float32,bfloat16]

tokens/s counts non-padding tokens (prompt and response) per wall-clock second over the log
intervals after the first (which holds the compilation): the mean, and the best interval (the
CPU is shared, so contention only ever slows an interval down). The loop syncs with the device
only at log steps. "fill" is the share of the [B, T] rows holding real tokens.
"""

import os
import statistics
import tempfile

import jax
from absl import app, flags

from opera_jax import cli
from opera_jax.config.runs import parse
from opera_jax.config.setups import sft_tiny
from opera_jax.train.metrics import read_metrics
from opera_jax.train.sft import train

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 40, "SFT steps per run")
flags.DEFINE_integer("log_every", 5, "steps per timed interval")
flags.DEFINE_integer("batch", 8, "rows per step")
flags.DEFINE_integer("seq", 256, "tokens per row")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "compute dtypes")
flags.DEFINE_enum("packing", "both", ["on", "off", "both"], "first-fit packing")


def bench() -> None:
    packings = {"on": [True], "off": [False], "both": [True, False]}[FLAGS.packing]
    batch, seq, steps = FLAGS.batch, FLAGS.seq, FLAGS.steps
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, tiny "
          f"preset, batch {batch} x seq {seq}, {steps} steps")
    loss_hdr = f"loss @{FLAGS.log_every}→@{steps}"
    print(f"{'compute':>9} {'packing':>8} {'tokens/s':>10} {'best':>8} {'ms/step':>8} "
          f"{'best':>6} {'fill':>5} {loss_hdr:>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in FLAGS.dtypes:
            for packing in packings:
                c = sft_tiny()
                c.workdir = os.path.join(tmp, f"{dtype}-{packing}")
                c.model.dtype = dtype
                c.sft.packing = packing
                c.sft.seq_len = seq
                c.sft.batch_size = batch
                c.sft.steps = steps
                c.sft.log_every = FLAGS.log_every
                c.checkpoint.every = None  # the final checkpoint only
                train(parse(c))
                rows = read_metrics(c.workdir)
                timed = rows[1:]  # the first interval includes compilation
                tps = statistics.mean(r["tokens_per_s"] for r in timed)
                sps = statistics.mean(r["steps_per_s"] for r in timed)
                best = max(timed, key=lambda r: r["steps_per_s"])
                fill = tps / sps / (batch * seq)
                print(f"{dtype:>9} {str(packing):>8} {tps:>10,.0f} {best['tokens_per_s']:>8,.0f} "
                      f"{1e3 / sps:>8.1f} {1e3 / best['steps_per_s']:>6.1f} {fill:>5.2f} "
                      f"{rows[0]['loss']:>10.3f}→{rows[-1]['loss']:.3f}", flush=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run_main(bench)


if __name__ == "__main__":
    app.run(main)
