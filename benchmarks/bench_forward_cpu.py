"""Forward tokens/s of the tiny preset on the CPU (jitted, float32, XLA attention).

    python benchmarks/bench_forward_cpu.py [--batch 8] [--seq 256] [--steps 20]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opera_jax import Qwen3Config, init_model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    cfg = Qwen3Config.preset(args.preset)
    model = init_model(cfg, seed=0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens, return_hidden=True)

    print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, "
          f"preset {args.preset}, seq {args.seq}")
    print(f"{'batch':>6} {'tokens/s':>12} {'ms/step':>9}")
    for b in args.batch:
        tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (b, args.seq)),
                             jnp.int32)
        forward(state, tokens).block_until_ready()  # compile
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = forward(state, tokens)
        out.block_until_ready()
        dt = (time.perf_counter() - t0) / args.steps
        print(f"{b:>6} {b * args.seq / dt:>12,.0f} {dt * 1e3:>9.2f}")


if __name__ == "__main__":
    main()
