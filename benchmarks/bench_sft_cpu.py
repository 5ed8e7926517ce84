"""SFT training tokens/s of the tiny preset on the CPU: the real loop (data, packing, jitted
step, metrics), configs/sft_tiny.py on the embedded toy domain.

    python benchmarks/bench_sft_cpu.py [--steps 40] [--log-every 10] [--dtypes float32 bfloat16]

tokens/s counts non-padding tokens (prompt and response) per wall-clock second over the log
intervals after the first (which holds the compilation): the mean, and the best interval (the
CPU is shared, so contention only ever slows an interval down). The loop syncs with the device
only at log steps. "fill" is the share of the [B, T] rows holding real tokens.
"""

import argparse
import os
import statistics
import tempfile

import jax

from opera_jax.train.cli import load_config_file
from opera_jax.train.metrics import read_metrics
from opera_jax.train.sft import train

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                      "sft_tiny.py")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--packing", choices=["on", "off", "both"], default="both")
    args = p.parse_args()
    packings = {"on": [True], "off": [False], "both": [True, False]}[args.packing]
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, tiny "
          f"preset, batch {args.batch} x seq {args.seq}, {args.steps} steps")
    loss_hdr = f"loss @{args.log_every}→@{args.steps}"
    print(f"{'compute':>9} {'packing':>8} {'tokens/s':>10} {'best':>8} {'ms/step':>8} "
          f"{'best':>6} {'fill':>5} {loss_hdr:>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            for packing in packings:
                c = load_config_file(CONFIG)
                c.workdir = os.path.join(tmp, f"{dtype}-{packing}")
                c.data.path = os.path.join(tmp, "toy.jsonl")
                c.model.dtype = dtype
                c.data.packing = packing
                c.data.seq_len = args.seq
                c.sft.batch_size = args.batch
                c.sft.steps = args.steps
                c.sft.log_every = args.log_every
                c.checkpoint.every = 0  # the final checkpoint only
                train(c)
                rows = read_metrics(c.workdir)
                timed = rows[1:]  # the first interval includes compilation
                tps = statistics.mean(r["tokens_per_s"] for r in timed)
                sps = statistics.mean(r["steps_per_s"] for r in timed)
                best = max(timed, key=lambda r: r["steps_per_s"])
                fill = tps / sps / (args.batch * args.seq)
                print(f"{dtype:>9} {str(packing):>8} {tps:>10,.0f} {best['tokens_per_s']:>8,.0f} "
                      f"{1e3 / sps:>8.1f} {1e3 / best['steps_per_s']:>6.1f} {fill:>5.2f} "
                      f"{rows[0]['loss']:>10.3f}→{rows[-1]['loss']:.3f}", flush=True)


if __name__ == "__main__":
    main()
