"""Forward tokens/s of the tiny preset on the CPU (jitted, float32, XLA attention).

    python benchmarks/bench_forward_cpu.py [--batch=1,8,32] [--seq=256] [--steps=20]
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from opera_jax import Qwen3Config, init_model

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "Qwen3Config preset")
flags.DEFINE_list("batch", ["1", "8", "32"], "batch sizes to time")
flags.DEFINE_integer("seq", 256, "tokens per row")
flags.DEFINE_integer("steps", 20, "timed forward calls per batch size")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = Qwen3Config.preset(FLAGS.preset)
    model = init_model(cfg, seed=0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens, return_hidden=True)

    print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, "
          f"preset {FLAGS.preset}, seq {FLAGS.seq}")
    print(f"{'batch':>6} {'tokens/s':>12} {'ms/step':>9}")
    for b in map(int, FLAGS.batch):
        tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (b, FLAGS.seq)),
                             jnp.int32)
        forward(state, tokens).block_until_ready()  # compile
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            out = forward(state, tokens)
        out.block_until_ready()
        dt = (time.perf_counter() - t0) / FLAGS.steps
        print(f"{b:>6} {b * FLAGS.seq / dt:>12,.0f} {dt * 1e3:>9.2f}")


if __name__ == "__main__":
    app.run(main)
