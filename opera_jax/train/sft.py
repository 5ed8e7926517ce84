"""Supervised fine-tuning of the student on cold-start trajectories (OPERA method §4).

    python -m opera_jax.train.sft --config=configs/sft_tiny.py --config.sft.steps=20

Each JSONL row (`prompt`, `thinking`, `output`) becomes the chat prompt followed by
"<think>\\n{thinking}\\n</think>\\n\\n{output}<|im_end|>"; the loss is the token-mean NLL of the
response tokens only (train/sft_loss.py). Rows are packed into [B, T] with segment ids.

The loop reads top to bottom: setup → mesh → data → model / optimizer → restore → loop.
The state's RNG is carried and checkpointed for the later stages; the SFT step draws nothing.
The step is one pure jitted function over an explicit TrainState, buffers donated; gradient
accumulation is a scan over micro-batches whose summed NLL gradient is divided once by the
global batch's response-token count, so accumulating does not change the loss being optimised.
Rerunning the same command resumes from the newest checkpoint, including the data position.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from opera_jax import sharding as sh
from opera_jax.data import toy_domain
from opera_jax.data.jsonl import SFT_FIELDS, write_jsonl
from opera_jax.data.pipeline import sft_batches
from opera_jax.data.records import open_rows
from opera_jax.tokenizer import special_token_ids
from opera_jax.train import state as state_lib
from opera_jax.train.checkpoint import Checkpointer, catch_sigterm, end_step
from opera_jax.train.metrics import MetricsWriter, Throughput
from opera_jax.train.periodic import Every
from opera_jax.train.sft_loss import nll_sum

log = logging.getLogger(__name__)


def make_train_step(graphdef, tx, schedule, *, grad_accum: int, chunk_size: int):
    """The pure SFT step: `train_step(state, batch) -> (state, metrics)`.

    Args:
      graphdef: the Qwen3 graph (static); params come from the state.
      tx / schedule: from `state.make_optimizer`.
      grad_accum: A, micro-batches per step; B must be divisible by A.
      chunk_size: log-prob chunk.
    Returns:
      The step function; batch arrays are int32 [B, T]; metrics are float32 scalars.
    """
    def loss_sum(params, batch):
        return nll_sum(nnx.merge(graphdef, params), batch, chunk_size=chunk_size)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def train_step(state: state_lib.TrainState, batch: dict):
        # [B, T] -> [A, B/A, T]: micro-batch i takes rows i, i + A, …, so every micro-batch
        # keeps the batch axis's sharding (no data moves between devices).
        micro = jax.tree.map(
            lambda x: x.reshape(-1, grad_accum, x.shape[-1]).swapaxes(0, 1), batch)

        def accumulate(carry, mb):
            grads, total, count = carry
            (nll, n), g = grad_fn(state.params, mb)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, total + nll, count + n), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, total, count), _ = jax.lax.scan(accumulate, init, micro)
        # Token mean over the whole global batch (float32: a sum over B·T tokens).
        inv = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * inv, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total * inv, "grad_norm": optax.tree.norm(grads),
                   "lr": schedule(state.step), "loss_tokens": count}
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    return train_step


@functools.lru_cache(maxsize=4)
def cached_step(graphdef, optim_items: tuple, total_steps: int, grad_accum: int,
                chunk_size: int, mesh):
    """(tx, schedule, train_step) for these settings.

    Cached so that repeated runs in one process (tests, notebooks, benchmarks) hand jax the same
    step function and reuse its compilation. The mesh is part of the key because the model's
    activation constraints are traced under `activation_mesh(mesh)`.
    """
    del mesh  # only a cache key
    tx, schedule = state_lib.make_optimizer(ml_collections.ConfigDict(dict(optim_items)),
                                            total_steps)
    step = make_train_step(graphdef, tx, schedule, grad_accum=grad_accum, chunk_size=chunk_size)
    return tx, schedule, step


def check_config(config: ml_collections.ConfigDict, mesh) -> None:
    """Fails early, with the numbers, on batch shapes the mesh cannot split."""
    if config.stage != "sft":
        raise ValueError(f"config.stage is {config.stage!r}; this trainer runs 'sft'")
    b, a = config.sft.batch_size, config.sft.grad_accum
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % a or (b // a) % rows:
        raise ValueError(f"sft.batch_size {b} / sft.grad_accum {a} must be a whole multiple of "
                         f"the data x fsdp mesh size {rows}")
    if b % jax.process_count():
        raise ValueError(f"sft.batch_size {b} is not divisible by {jax.process_count()} hosts")


def train(config: ml_collections.ConfigDict, *, stop_after: int | None = None):
    """Runs (or resumes) SFT as configured; returns the final TrainState.

    Args:
      config: see configs/sft_tiny.py for every key.
      stop_after: stop (with a checkpoint) after this step, as a preemption would; the
        schedule still spans `sft.steps`. For tests and time-sliced jobs.
    """
    # ---- setup ----
    workdir = os.path.abspath(config.workdir)
    total = config.sft.steps
    last = total if stop_after is None else min(stop_after, total)

    # ---- mesh ----
    n = config.mesh.num_devices
    devices = jax.devices() if n < 0 else jax.devices()[:n]
    mesh = sh.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    check_config(config, mesh)
    batch_sharding = sh.named_sharding(mesh, ("batch", "seq"),
                                       (config.sft.batch_size, config.data.seq_len))

    # ---- data ----
    if config.data.write_toy_rows and not os.path.exists(config.data.path):
        write_jsonl(config.data.path, toy_domain.examples(config.data.write_toy_rows, seed=0))
    records = open_rows(config.data.path, required=SFT_FIELDS, on_error=config.data.on_bad_row)
    tokenizer = state_lib.model_tokenizer(config.model)
    ids = special_token_ids(tokenizer)
    data_iter = iter(sft_batches(
        records, tokenizer, eos_id=ids["eos"], pad_id=ids["pad"], seq_len=config.data.seq_len,
        global_batch_size=config.sft.batch_size, seed=config.data.seed,
        packing=config.data.packing, overlong=config.data.overlong,
        enable_thinking=config.data.enable_thinking, num_threads=config.data.num_threads))
    log.info("%d SFT rows from %s", len(records), config.data.path)

    # ---- model / optimizer ----
    graphdef, params_abstract = state_lib.abstract_params(config.model, mesh)
    tx, _, train_step = cached_step(graphdef, tuple(sorted(config.optim.items())), total,
                                    config.sft.grad_accum, config.sft.chunk_size, mesh)
    abstract = state_lib.abstract_state(params_abstract, tx, mesh)
    state_sharding = state_lib.shardings_of(abstract)

    # ---- restore ----
    # Order: (1) the abstract state above fixes shapes, dtypes and shardings without
    # allocating; (2) a checkpoint's arrays load straight into those shards; (3) the data
    # iterator is repositioned to the saved batch; (4) the saved config is only compared
    # (differences are logged). Without a checkpoint: load/initialise params, fresh optimizer.
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
                        async_save=config.checkpoint.async_save)
    state, start = ckpt.restore_or_init(
        abstract, lambda: state_lib.init_state(state_lib.load_params(config.model, mesh), tx,
                                               abstract, seed=config.seed),
        data_iter=data_iter, config=config)

    # ---- loop ----
    step_fn = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                      out_shardings=(state_sharding, None), donate_argnums=0)
    writer = MetricsWriter(workdir, total_steps=total, initial_step=start)
    log_due = Every(config.sft.log_every, last_step=last)
    ckpt_due = Every(config.checkpoint.every, last_step=last)
    meter = Throughput()
    global_shape = (config.sft.batch_size, config.data.seq_len)
    try:
        with sh.activation_mesh(mesh), catch_sigterm():
            for step in range(start + 1, last + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    local = next(data_iter)
                    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v,
                                                                       global_shape)
                             for k, v in local.items()}
                    state, metrics = step_fn(state, batch)
                meter.add(np.count_nonzero(local["segment_ids"]) * jax.process_count())
                # The only device->host sync is inside `metrics`, at log steps.
                if end_step(step, state, ckpt=ckpt, writer=writer,
                            metrics=lambda: {**jax.device_get(metrics), **meter.rate()},
                            log_due=log_due, ckpt_due=ckpt_due, config=config,
                            data_iter=data_iter):
                    break
    finally:
        ckpt.close()  # waits for the last asynchronous save
        writer.close()
    return state


if __name__ == "__main__":
    from opera_jax.train.cli import run

    run(train)
