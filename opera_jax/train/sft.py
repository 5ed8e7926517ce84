"""Supervised fine-tuning of the student on cold-start trajectories (docs/METHOD.md §4).

    python -m opera_jax.train --config=configs/sft_tiny.py --config.sft.steps=20

Each JSONL row (`prompt`, `thinking`, `output`) becomes the chat prompt followed by
"<think>\\n{thinking}\\n</think>\\n\\n{output}<|im_end|>"; the loss is the token-mean NLL of the
response tokens only (train/sft_loss.py). Rows are packed into [B, T] with segment ids.

The loop reads top to bottom: setup → mesh → data → model / optimizer → restore → loop.
The state's RNG is carried and checkpointed for the later stages; the SFT step draws nothing.
The step is one pure jitted function over an explicit TrainState, buffers donated; gradient
accumulation is a scan over micro-batches whose summed NLL gradient is divided once by the
global batch's response-token count, so accumulating does not change the loss being optimised.
Rerunning the same command resumes from the newest readable checkpoint, including the data
position; SIGTERM saves after the current step and raises `checkpoint.Preempted`.
LoRA (`lora.rank`): the state's params are the adapters, the step reads the frozen base as a
separate argument (config/build.py `policy`); checkpoints hold the adapters and optimizer.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opera_jax import sharding as sh
from opera_jax.checkpoint import Checkpointer, Preempted, catch_sigterm
from opera_jax.config import build
from opera_jax.config.runs import SFTRun, to_json
from opera_jax.config.sections import Optim
from opera_jax.data.jsonl import SFT_FIELDS
from opera_jax.data.pipeline import sft_batches
from opera_jax.data.sources import open_rows
from opera_jax.locks import WorkdirLock
from opera_jax.model import lora as lora_lib
from opera_jax.tokenizer import special_token_ids
from opera_jax.train import state as state_lib
from opera_jax.train.metrics import MetricsWriter, Throughput
from opera_jax.train.periodic import Every, end_step
from opera_jax.train.sft_loss import nll_sum

log = logging.getLogger(__name__)


def make_train_step(graphdef, tx, schedule, *, grad_accum: int, chunk_size: int):
    """The pure SFT step: `train_step(state, batch, frozen) -> (state, metrics)`.

    Args:
      graphdef: the Qwen3 graph (static); params come from the state.
      tx / schedule: from `state.make_optimizer`.
      grad_accum: A, micro-batches per step; B must be divisible by A.
      chunk_size: log-prob chunk.
    Returns:
      The step function; batch arrays are int32 [B, T]; `frozen` is LoRA's frozen base (the
      state's params are then the adapters) or None; metrics are float32 scalars.
    """
    def loss_sum(params, batch, frozen):
        model = nnx.merge(graphdef, lora_lib.combine(frozen, params))
        return nll_sum(model, batch, chunk_size=chunk_size)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def train_step(state: state_lib.TrainState, batch: dict, frozen: dict | None = None):
        # [B, T] -> [A, B/A, T]: micro-batch i takes rows i, i + A, …, so every micro-batch
        # keeps the batch axis's sharding (no data moves between devices).
        micro = jax.tree.map(
            lambda x: x.reshape(-1, grad_accum, x.shape[-1]).swapaxes(0, 1), batch)

        def accumulate(carry, mb):
            grads, total, count = carry
            (nll, n), g = grad_fn(state.params, mb, frozen)
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
def cached_step(graphdef, optim: Optim, total_steps: int, grad_accum: int, chunk_size: int,
                mesh):
    """(tx, schedule, train_step) for these settings.

    Cached so that repeated runs in one process (tests, notebooks, benchmarks) hand jax the same
    step function and reuse its compilation. The mesh is part of the key because the model's
    activation constraints are traced under `activation_mesh(mesh)`.
    """
    del mesh  # only a cache key
    tx, schedule = state_lib.make_optimizer(optim, total_steps)
    step = make_train_step(graphdef, tx, schedule, grad_accum=grad_accum, chunk_size=chunk_size)
    return tx, schedule, step


def check_config(run: SFTRun, mesh) -> None:
    """Fails early, with the numbers, on batch shapes the mesh cannot split."""
    b, a = run.sft.batch_size, run.sft.grad_accum
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % a or (b // a) % rows:
        raise ValueError(f"sft.batch_size {b} / sft.grad_accum {a} must be a whole multiple of "
                         f"the data x fsdp mesh size {rows}")
    if b % jax.process_count():
        raise ValueError(f"sft.batch_size {b} is not divisible by {jax.process_count()} hosts")


def train(run: SFTRun, *, stop_after: int | None = None):
    """Runs (or resumes) SFT; returns the final TrainState.

    Args:
      run: the typed config (configs/sft_tiny.py documents a setup).
      stop_after: stop (with a checkpoint) after this step, as a preemption would but without
        raising; the schedule still spans `sft.steps`. For tests and time-sliced jobs.
    Raises:
      Preempted: SIGTERM or a preemption notice arrived; the state was saved first.
    """
    if not isinstance(run, SFTRun):
        raise TypeError(f"sft.train needs an SFTRun; got a {type(run).__name__} (run a config "
                        f"through `python -m opera_jax.train`, which picks its stage)")
    with WorkdirLock(run.workdir, what="SFT workdir"):
        return _train(run, stop_after)


def _train(run: SFTRun, stop_after: int | None):
    # ---- setup ----
    workdir = os.path.abspath(run.workdir)
    total = run.sft.steps
    last = total if stop_after is None else min(stop_after, total)

    # ---- mesh ----
    mesh = build.make_mesh(run.mesh)
    check_config(run, mesh)
    batch_sharding = sh.named_sharding(mesh, ("batch", "seq"),
                                       (run.sft.batch_size, run.sft.seq_len))

    # ---- data ----
    records = open_rows(run.data.path, required=SFT_FIELDS, on_bad_row=run.data.on_bad_row,
                        seed=run.data.seed, tfds_data_dir=run.data.tfds_data_dir)
    tokenizer = build.load_model_tokenizer(run.model)
    ids = special_token_ids(tokenizer)
    data_iter = iter(sft_batches(
        records, tokenizer, eos_id=ids["eos"], pad_id=ids["pad"], seq_len=run.sft.seq_len,
        global_batch_size=run.sft.batch_size, seed=run.data.seed, packing=run.sft.packing,
        overlong=run.sft.overlong.value, enable_thinking=run.data.enable_thinking,
        num_threads=run.data.num_threads, source=run.data.path,
        special_tokens_in_text=run.data.special_tokens_in_text))
    log.info("%d SFT rows from %s", len(records), run.data.path)

    # ---- model / optimizer ----
    # Every weight trains, or LoRA adapters over the frozen base in `trained.frozen`.
    trained = build.policy(run.model, run.lora, mesh, seed=run.seed)
    tx, _, train_step = cached_step(trained.graphdef, run.sft.optim, total, run.sft.grad_accum,
                                    run.sft.chunk_size, mesh)
    abstract = state_lib.abstract_state(trained.abstract, tx, mesh)
    state_sharding = state_lib.shardings_of(abstract)
    frozen_sharding = jax.tree.map(lambda x: x.sharding, trained.frozen)

    # ---- restore ----
    # Order: (1) the abstract state above fixes shapes, dtypes and shardings without
    # allocating; (2) the newest readable checkpoint's arrays load straight into those shards
    # (an unreadable one is set aside and the next older tried); (3) the data iterator is
    # repositioned to the saved batch; (4) the saved config is only compared (differences
    # are logged). Without a checkpoint: load/initialise params, fresh optimizer. The frozen
    # base of a LoRA run was loaded above from its own source; it is never checkpointed.
    saved_config = to_json(run)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.checkpoint.keep,
                        async_save=run.checkpoint.async_save)
    state, start = ckpt.restore_or_init(
        abstract, lambda: state_lib.init_state(trained.init(), tx, abstract, seed=run.seed),
        data_iter=data_iter, config=saved_config)

    # ---- loop ----
    step_fn = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding, frozen_sharding),
                      out_shardings=(state_sharding, None), donate_argnums=0)
    writer = MetricsWriter(workdir, total_steps=total, initial_step=start, log=run.log,
                           config=saved_config)
    log_due = Every(run.sft.log_every, last_step=last)
    ckpt_due = Every(run.checkpoint.every, last_step=last)
    meter = Throughput()
    global_shape = (run.sft.batch_size, run.sft.seq_len)
    preempted = False
    try:
        with sh.activation_mesh(mesh), catch_sigterm():
            for step in range(start + 1, last + 1):
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    local = next(data_iter)
                    batch = {k: jax.make_array_from_process_local_data(batch_sharding, v,
                                                                       global_shape)
                             for k, v in local.items()}
                    state, metrics = step_fn(state, batch, trained.frozen)
                meter.add(np.count_nonzero(local["segment_ids"]) * jax.process_count())
                # The only device->host sync is inside `metrics`, at log steps.
                if end_step(step, state, ckpt=ckpt, writer=writer,
                            metrics=lambda: {**jax.device_get(metrics), **meter.rate()},
                            log_due=log_due, ckpt_due=ckpt_due, config=saved_config,
                            data_iter=data_iter):
                    preempted = True
                    break
    finally:
        ckpt.close()  # waits for the last asynchronous save (and reports a failed one)
        writer.close()
    if preempted:
        raise Preempted(f"SFT stopped at step {step} of {total} on SIGTERM / preemption; "
                        f"state saved in {workdir}/checkpoints — rerun to resume")
    return state
