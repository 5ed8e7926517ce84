"""Orbax training checkpoints → models and Hugging Face directories.

    python -m opera_jax.export --checkpoint RUN_DIR --out HF_DIR [--step N] [--dtype bfloat16]

RUN_DIR is a trainer's workdir (holding checkpoints/) or its checkpoints/ folder. The
checkpoint's saved config names the architecture (`model.hf_dir`'s config.json, or
`model.preset`) and the tokenizer; only the parameters are read, each array straight into the
sharding of the devices at hand, so a checkpoint written on 8 devices restores on 1 and the
other way round. The output has config.json, safetensors (sharded above `--max-shard-gb`),
generation_config.json and the tokenizer files with the chat template.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from opera_jax import sharding as sh
from opera_jax.model.hf_io import export_hf
from opera_jax.train import state as state_lib
from opera_jax.train.checkpoint import Checkpointer

log = logging.getLogger(__name__)


def checkpoint_dir(path: str) -> str:
    """The checkpoints/ folder of a run dir (or `path` itself when it is one)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def saved_config(ckpt_dir: str, step: int) -> ml_collections.ConfigDict:
    """The config a checkpoint was saved with."""
    mngr = ocp.CheckpointManager(ckpt_dir)
    try:
        raw = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    finally:
        mngr.close()
    return ml_collections.ConfigDict(raw)


def load_checkpoint(path: str, *, step: int | None = None, mesh: Mesh | None = None,
                    dtype: str | None = None):
    """Restores a training checkpoint's parameters as a model.

    Args:
      path: a run dir or its checkpoints/ folder.
      step: checkpoint step (None: the newest).
      mesh: devices to restore onto (None: all local devices, fsdp over them).
      dtype: compute dtype override (default: the run's `model.dtype`).
    Returns:
      (model, tokenizer, saved config, step).
    """
    ckpt_dir = checkpoint_dir(path)
    ckpt = Checkpointer(ckpt_dir, keep=None, async_save=False)
    try:
        step = ckpt.latest_step() if step is None or step < 0 else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir!r}")
        config = saved_config(ckpt_dir, step)
        model_cfg = ml_collections.ConfigDict(config.model.to_dict())
        if dtype:
            model_cfg.dtype = dtype
        mesh = mesh or sh.make_mesh(1, -1, 1)
        graphdef, abstract = state_lib.abstract_params(model_cfg, mesh)
        params = ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, params)
    return model, state_lib.model_tokenizer(model_cfg), config, step


def export_checkpoint(path: str, out_dir: str, *, step: int | None = None,
                      dtype: str | None = None, max_shard_bytes: int = 4 << 30) -> str:
    """Writes checkpoint `path` (newest step unless `step`) as a HF directory; returns it."""
    model, tokenizer, _, step = load_checkpoint(path, step=step)
    log.info("exporting step %d of %s to %s", step, path, out_dir)
    return export_hf(model, out_dir, tokenizer=tokenizer, dtype=dtype,
                     max_shard_bytes=max_shard_bytes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m opera_jax.export",
                                description="Export an opera_jax checkpoint to a HF directory.")
    p.add_argument("--checkpoint", required=True, help="a run dir or its checkpoints/ folder")
    p.add_argument("--out", required=True, help="output HF directory (created)")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step (default: newest)")
    p.add_argument("--dtype", default=None, help="dtype of the written tensors, e.g. bfloat16")
    p.add_argument("--max-shard-gb", type=float, default=4.0)
    args = p.parse_args(argv)
    from opera_jax import distributed

    distributed.initialize()  # no-op for a single process
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    out = export_checkpoint(args.checkpoint, args.out, step=args.step, dtype=args.dtype,
                            max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s "
          f"({jax.device_count()} {jax.default_backend()} device(s))")


if __name__ == "__main__":
    main()
