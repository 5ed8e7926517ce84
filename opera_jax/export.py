"""`python -m opera_jax.export --checkpoint=RUN_DIR --out=HF_DIR [--step=N] [--dtype=bfloat16]`

A trainer's Orbax checkpoint as a Hugging Face directory. RUN_DIR is a trainer's workdir
(holding checkpoints/) or its checkpoints/ folder; the saved config names the architecture and
tokenizer (`config.build.load_run`), and only the parameters are read, straight into the
sharding of the devices at hand; a LoRA run's adapters are merged into its base (rebuilt from
the saved `model` section), so the export is a plain model. The output (config.json, safetensors sharded above
`--max_shard_gb`, generation_config.json, the tokenizer with its chat template) is written
into a fresh directory and renamed into place: a non-empty `--out` is refused unless
`--overwrite`, which replaces it whole.
"""

import time

import jax
from absl import app, flags

from opera_jax import cli
from opera_jax.config import build
from opera_jax.model.hf_io import export_hf

flags.DEFINE_string("checkpoint", None, "a trainer's run dir or its checkpoints/ folder",
                    required=True)
flags.DEFINE_string("out", None, "the output HF directory", required=True)
flags.DEFINE_integer("step", None, "the checkpoint step (default: the newest)")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "dtype of the written tensors (default: the parameters')")
flags.DEFINE_float("max_shard_gb", 4.0, "split the safetensors above this size")
flags.DEFINE_bool("overwrite", False, "replace a non-empty --out as a whole")
FLAGS = flags.FLAGS


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    def export():
        t0 = time.perf_counter()
        model, tokenizer, _, step = build.load_run(FLAGS.checkpoint, step=FLAGS.step)
        out = export_hf(model, FLAGS.out, tokenizer=tokenizer, dtype=FLAGS.dtype,
                        max_shard_bytes=int(FLAGS.max_shard_gb * (1 << 30)),
                        overwrite=FLAGS.overwrite)
        print(f"wrote step {step} of {FLAGS.checkpoint} to {out} in "
              f"{time.perf_counter() - t0:.1f} s ({jax.device_count()} "
              f"{jax.default_backend()} device(s))")

    cli.run_main(export)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
