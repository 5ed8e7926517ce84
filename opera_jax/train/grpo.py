"""GRPO with the OPERA reward (docs/METHOD.md §3).

    python -m opera_jax.train --config=configs/grpo_tiny.py
    grpo.train(parse(config))            # the same from Python (a GRPORun)

One RL step, in the loop's three labelled sections:
  rollout  `rollout.n` responses to each of `rollout.num_prompts` prompts, sampled from the
           training weights themselves (the sampler is handed the state's arrays; no copy).
  reward   the weighted terms of `reward.terms` (reward/terms.py; by default the OPERA reward
           alone): `reward.score_token_ids` on the sampled ids, scored by the policy that
           sampled them (published) or, with `reward.scorer: reference`, by the frozen
           reference; `math` rows get the verifiable reward. With `grpo.dynamic_sampling`
           (DAPO) groups of equal rewards are dropped and refilled from further prompts
           (`collect_batch`). Then per-group advantages (grpo_loss).
  update   old and reference log-probs, then `grpo.num_minibatches` optimizer steps (1 PPO
           epoch) over strided mini-batches of the R = prompts · n rows, each the sum of
           `grpo.grad_accum` micro-batch gradients weighted so that the mini-batch loss is
           exactly `grpo_loss` over the whole mini-batch (token-mean by default).

Sampling (`rollout.engine`, default on): the continuous-batching engine over a paged KV cache
(sampling/engine.py), each prompt prefilled once for its n rows; `rollout.engine=False` runs
the fixed-batch sampler. Both draw row r's tokens from the same random stream, so they give
the same responses up to float rounding of the logits.
Old log-probs (`grpo.old_logprobs`): the sampler returns, for every sampled token, the
float32 log-prob at temperature 1 before top-k / top-p, i.e. the quantity the loss
differentiates, at any sampling temperature. Taking it saves a forward pass over the batch
(a third of what the update's forward + backward costs), and it is exact up to rounding when
the sampler computes like the update: in float32 (tiny model: |Δ| ≤ 2e-5 per token,
tests/test_grpo_rollout.py), where `auto` takes it and the first mini-batch of the single PPO epoch is on-policy (ratio 1). In
bf16 compute the one-token-at-a-time decode against a bf16 KV cache rounds differently from the
training forward, more so for long sequences and real models, and a spurious ratio ≠ 1 would
clip tokens of an on-policy batch; `auto` therefore recomputes them with the training forward
(one no-grad pass). Even that is not bit-equal to the forward inside the gradient in bf16
(different fusions); on the tiny model both leave an rms log-ratio below 1e-3.
`sampler` / `recompute` force either.
Remat: `model.remat` rematerialises each layer in the update's backward pass.

Learning rate: `grpo.optim.warmup_frac` of the optimizer updates warm up linearly from 0, then
`grpo.optim.schedule`; the schedule advances per update (num_minibatches per RL step).
Reference model (KL term; the scorer with `reward.scorer: reference`): loaded from its own
source — `reference.checkpoint` (Orbax params), `reference.hf_dir`, or else the policy's initial
source — in the compute dtype, never stored in the run's checkpoints. With LoRA (`lora.rank`)
the state's params are the adapters over a frozen base, and the reference is that base
itself, without adapters: no second copy.
Checkpoints hold params, optimizer state, step, RNG, the prompt iterator's position and the
config; rerunning the same command resumes; SIGTERM saves after the current step and raises
`checkpoint.Preempted` (the command line exits with `PREEMPTED_EXIT`).
What the reward cannot see is logged next to it every step (rollout/diagnostics.py): the
truncation rate, repeated 4-grams and paragraphs, whether the think block closed, and on
prompts with a ground truth (the toy domain) the accuracy of the training and validation
answers; the end of the run prints the validation reward next to that accuracy.
The RL loop is synchronous by nature (rollout needs the new weights), so every step ends with
one explicit device_get of its metrics.
Several processes (jax.distributed): every process reads the same global prompt batch and runs
the same host-side logic (sampling bookkeeping, reward, advantages) on all rows; the device
computations take global arrays on the mesh spanning all processes, and their results come back
to every process (`sharding.to_host`). Only process 0 writes metrics; checkpoints are collective.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opera_jax import sharding as sh
from opera_jax.checkpoint import Checkpointer, Preempted, catch_sigterm
from opera_jax.config import build
from opera_jax.config.runs import GRPORun, to_json
from opera_jax.config.sections import Loss, OldLogprobs, Optim, Reference
from opera_jax.data.pipeline import PROMPT_FIELDS, TokenizePrompt, prompt_batches
from opera_jax.data.sources import open_rows
from opera_jax.locks import WorkdirLock
from opera_jax.model import lora as lora_lib
from opera_jax.reward import RewardConfig, Scorer
from opera_jax.reward.terms import Scored, Terms
from opera_jax.rollout import stats as rollout_stats
from opera_jax.rollout.batch import Rollout, sample_rollout
from opera_jax.rollout.dynamic_sampling import collect_batch
from opera_jax.sampling import Sampler
from opera_jax.tokenizer import special_token_ids
from opera_jax.train import plots
from opera_jax.train import state as state_lib
from opera_jax.train.grpo_loss import group_advantages, grpo_loss
from opera_jax.train.metrics import MetricsWriter
from opera_jax.train.periodic import Every, end_step

log = logging.getLogger(__name__)

# Traces of the jitted step functions (a test checks that new rollouts do not retrace).
TRACE_COUNT: collections.Counter = collections.Counter()


def _split(x, parts: int):
    """[R, ...] -> [parts, R / parts, ...]; part i takes rows i, i + parts, … so every part
    keeps the batch axis's sharding (no data moves between devices)."""
    return x.reshape(-1, parts, *x.shape[1:]).swapaxes(0, 1)


def make_update_step(graphdef, tx, schedule, *, num_minibatches: int, grad_accum: int,
                     chunk_size: int, loss_config: Loss):
    """The pure GRPO update: `update(state, batch, frozen) -> (state, metrics)`.

    Args:
      graphdef: the Qwen3 graph (static); params come from the state (LoRA: the adapters,
        over the frozen base `frozen`; else `frozen` is None).
      tx / schedule: from `state.make_optimizer` (counting optimizer updates).
      num_minibatches: M optimizer updates per call; grad_accum: A micro-batches each.
      chunk_size: log-prob chunk.
      loss_config: the `loss` section.
    Returns:
      The step. batch: tokens (int32 [R, T], right-padded), mask, old_logprobs, optionally
      ref_logprobs (float32 [R, T], aligned to the predicting position), advantages ([R]).
      Metrics are float32 scalars over the whole RL step: the loss terms token-weighted over
      its micro-batches, grad_norm the mean pre-clipping norm of its updates, lr the first's.
    """
    def micro_loss(params, mb, weight, frozen):
        model = nnx.merge(graphdef, lora_lib.combine(frozen, params))
        hidden = model(mb["tokens"], return_hidden=True)  # causal; see make_logprob_fn
        logp, entropy = model.logprobs(hidden, jnp.roll(mb["tokens"], -1, axis=1),
                                       chunk_size=chunk_size, return_entropy=True)
        loss, metrics = grpo_loss(logp, mb["old_logprobs"], mb.get("ref_logprobs"),
                                  mb["advantages"], mb["mask"], loss_config)
        n = jnp.sum(mb["mask"])
        metrics = {**metrics, "loss": jax.lax.stop_gradient(loss),
                   "entropy": jnp.sum(jax.lax.stop_gradient(entropy) * mb["mask"])
                   / jnp.maximum(n, 1.0)}
        return loss * weight, (metrics, n)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def minibatch(state: state_lib.TrainState, mb, frozen):  # leaves [A, b, ...]
        # Weight of each micro-batch in the mini-batch's aggregate: its share of the tokens
        # (token-mean) or of the non-empty sequences (seq-mean); float32 sums.
        if loss_config.aggregation == "token_mean":  # an Aggregation (a str enum)
            units = jnp.sum(mb["mask"], axis=(1, 2))
        else:
            units = jnp.sum(jnp.any(mb["mask"] > 0, axis=-1), axis=1).astype(jnp.float32)
        weights = units / jnp.maximum(jnp.sum(units), 1.0)

        def micro(grads, xs):
            x, w = xs
            g, (metrics, n) = grad_fn(state.params, x, w, frozen)
            return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), (metrics, n)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        grads, (metrics, counts) = jax.lax.scan(micro, zeros, (mb, weights))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state)
        return new, (metrics, counts, optax.tree.norm(grads), schedule(state.step))

    def update(state: state_lib.TrainState, batch: dict, frozen: dict | None = None):
        TRACE_COUNT["update"] += 1
        split = jax.tree.map(
            lambda x: _split(x, num_minibatches * grad_accum).reshape(
                num_minibatches, grad_accum, -1, *x.shape[1:]), batch)
        state, (metrics, counts, grad_norm, lr) = jax.lax.scan(
            lambda s, mb: minibatch(s, mb, frozen), state, split)
        total = jnp.sum(counts)  # [M, A] -> response tokens of the RL step
        out = {k: jnp.sum(v * counts) / jnp.maximum(total, 1.0) for k, v in metrics.items()}
        out.update(grad_norm=jnp.mean(grad_norm), lr=lr[0], loss_tokens=total)
        return state, out

    return update


def make_logprob_fn(graphdef, *, micro_batches: int, chunk_size: int):
    """`logprobs(params, tokens) -> float32 [R, T]`, no gradient, in `micro_batches` passes;
    entry t is log p(tokens[t + 1] | tokens[..t]).

    Rows are right-padded, so plain causal attention (no segment mask) leaves every real
    token's value unchanged, and fused causal kernels (cuDNN) apply; padding is masked later.
    """
    def logprobs(params, tokens):
        TRACE_COUNT["logprobs"] += 1

        def one(toks):
            model = nnx.merge(graphdef, params)  # in the map's trace (nnx.remat needs that)
            hidden = model(toks, return_hidden=True)
            return model.logprobs(hidden, jnp.roll(toks, -1, axis=1), chunk_size=chunk_size)

        lp = jax.lax.map(one, _split(tokens, micro_batches))
        return lp.swapaxes(0, 1).reshape(tokens.shape)

    return logprobs


@functools.lru_cache(maxsize=4)
def cached_update(graphdef, optim: Optim, total_updates: int, num_minibatches: int,
                  grad_accum: int, chunk_size: int, loss_config: Loss, mesh):
    """(tx, update step) for these settings, cached so repeated runs in one process (tests,
    benchmarks) hand jax the same function and reuse its compilation. The mesh is part of the
    key because the model's activation constraints are traced under `activation_mesh(mesh)`."""
    del mesh  # only a cache key
    tx, schedule = state_lib.make_optimizer(optim, total_updates)
    return tx, make_update_step(graphdef, tx, schedule, num_minibatches=num_minibatches,
                                grad_accum=grad_accum, chunk_size=chunk_size,
                                loss_config=loss_config)


@functools.lru_cache(maxsize=8)
def cached_logprobs(graphdef, micro_batches: int, chunk_size: int, mesh):
    """The jitted `make_logprob_fn` (policy or reference graph), cached like `cached_update`."""
    del mesh  # only a cache key
    return jax.jit(make_logprob_fn(graphdef, micro_batches=micro_batches, chunk_size=chunk_size))


def check_config(run: GRPORun, mesh) -> None:
    """Fails early, with the numbers, on settings the loop or the mesh cannot run."""
    rows = run.rollout.num_prompts * run.rollout.n
    parts = run.grpo.num_minibatches * run.grpo.grad_accum
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % parts or (rows // parts) % shards:
        raise ValueError(f"{rows} responses per step (rollout.num_prompts x rollout.n) must "
                         f"split into grpo.num_minibatches x grpo.grad_accum = {parts} micro-"
                         f"batches whose size is a multiple of the data x fsdp mesh size {shards}")
    if run.grpo.dynamic_sampling and (run.rollout.n < 2 or run.grpo.max_sampling_rounds < 1):
        raise ValueError(f"grpo.dynamic_sampling needs rollout.n >= 2 (a group of one has no "
                         f"spread) and grpo.max_sampling_rounds >= 1; got {run.rollout.n}, "
                         f"{run.grpo.max_sampling_rounds}")


def loss_config(run: GRPORun) -> Loss:
    """The `loss` section with token_sum_norm's constant resolved (the response limit)."""
    if run.loss.norm_constant is None:
        return dataclasses.replace(run.loss, norm_constant=run.rollout.max_new_tokens)
    return run.loss


def reward_config(run: GRPORun, group_size: int) -> RewardConfig:
    """The `reward` section with the group size of the rows it scores."""
    return dataclasses.replace(run.reward, group_size=group_size)


def reference_model(run: GRPORun):
    """The `model` section of the frozen reference: `reference.hf_dir`, else
    `reference.checkpoint` (the architecture from `model`), else the policy's own start."""
    ref = run.reference
    if ref.hf_dir is not None:
        return dataclasses.replace(run.model, hf_dir=ref.hf_dir, checkpoint=None)
    if ref.checkpoint is not None:
        return dataclasses.replace(run.model, checkpoint=ref.checkpoint, checkpoint_step=None)
    return run.model


def load_reference(run: GRPORun, mesh):
    """(graphdef, params) of the frozen reference, kept in the compute dtype.

    Loaded like the policy (in `param_dtype`, so a random preset draws the same weights), then
    cast once: the model casts every weight to the compute dtype at use anyway, so the values
    are unchanged and a bf16 run holds half the memory.
    """
    model = reference_model(run)
    params = build.load_params(model, mesh)
    graphdef, target = build.abstract_params(dataclasses.replace(model,
                                                                 param_dtype=model.dtype), mesh)
    cast = jax.jit(lambda p: jax.tree.map(lambda x, t: x.astype(t.dtype), p, target),
                   out_shardings=jax.tree.map(lambda t: t.sharding, target), donate_argnums=0)
    return graphdef, cast(params)


def step_seed(rng_data: np.ndarray, step: int, sampling_round: int = 0) -> int:
    """The sampling seed of RL step `step` (and of its extra rollouts under dynamic sampling),
    from the state's (checkpointed) RNG."""
    entropy = [*map(int, rng_data.ravel()), step] + ([sampling_round] if sampling_round else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def training_rewards(rewards: np.ndarray, *, randomize: bool, seed: int) -> np.ndarray:
    """The rewards the advantages are computed from: the scored ones, or with `randomize` (the
    `grpo.random_rewards` control) the same values permuted at random across the step's
    batch, so they keep their mean and variance and lose any relation to their response."""
    if not randomize:
        return rewards
    return np.random.default_rng(seed).permutation(rewards)


def _upload(x: np.ndarray, mesh, names):
    sharding = sh.named_sharding(mesh, names, x.shape)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def score_rollout(terms: Terms, policy, reference, tokenizer, ro: Rollout, *,
                  max_len: int) -> Scored:
    """The reward terms of a rollout's responses (reward/terms.py)."""
    return terms.score(policy, tokenizer, prompt_ids=ro.prompt_ids, response_ids=ro.response_ids,
                       reference_ids=ro.reference_ids, group_ids=ro.group_ids,
                       task_types=ro.task_types, rows=ro.rows, max_len=max_len,
                       reference_model=reference)


def validate(sampler, policy, reference, tokenizer, rows: list[dict], run: GRPORun, *,
             seq_len: int, stats: dict) -> dict[str, float]:
    """Reward of `validation.n` rollouts per held-out prompt (greedy when
    `validation.temperature` is 0), scored exactly like training; a fixed seed keeps the
    steps comparable. `stats`: keyword arguments of `rollout.stats.response_stats`."""
    v, r = run.validation, run.rollout
    ro = sample_rollout(sampler, rows, n=v.n, seq_len=seq_len, max_new_tokens=r.max_new_tokens,
                        temperature=v.temperature, top_p=r.top_p, top_k=r.top_k, seed=run.seed,
                        prompts_per_call=r.prompts_per_call or r.num_prompts,
                        slots=r.sampler_slots())
    scored = score_rollout(Terms(reward_config(run, v.n)), policy, reference, tokenizer, ro,
                           max_len=r.max_new_tokens)
    return {**rollout_stats.reward_metrics(scored, ro, "val_reward/"),
            **rollout_stats.response_stats(ro, tokenizer, prefix="val_response/", **stats)}


def _prompt_rows(spec: str, run: GRPORun, tokenizer) -> list[dict]:
    """Tokenised prompt rows of a (small) source, dropping over-long ones; none is an error."""
    rows = open_rows(spec, required=PROMPT_FIELDS, on_bad_row=run.data.on_bad_row,
                     seed=run.data.seed, tfds_data_dir=run.data.tfds_data_dir)
    tokenize = TokenizePrompt(tokenizer, max_prompt_len=run.rollout.max_prompt_len,
                              enable_thinking=run.data.enable_thinking,
                              special_tokens_in_text=run.data.special_tokens_in_text)
    out = [x for x in map(tokenize, list(rows)[:run.validation.num_prompts]) if x is not None]
    if not out:
        raise ValueError(f"no validation prompt of {spec} fits rollout.max_prompt_len="
                         f"{run.rollout.max_prompt_len} tokens")
    return out


def train(run: GRPORun, *, stop_after: int | None = None):
    """Runs (or resumes) GRPO; returns the final TrainState.

    Args:
      run: the typed config (configs/grpo_tiny.py documents a setup).
      stop_after: stop (with a checkpoint) after this RL step, as a preemption would but
        without raising; the schedule still spans `grpo.steps`. For tests and time slices.
    Raises:
      Preempted: SIGTERM or a preemption notice arrived; the state was saved first.
    """
    if not isinstance(run, GRPORun):
        raise TypeError(f"grpo.train needs a GRPORun; got a {type(run).__name__} (run a config "
                        f"through `python -m opera_jax.train`, which picks its stage)")
    with WorkdirLock(run.workdir, what="GRPO workdir"):
        return _train(run, stop_after)


def _train(run: GRPORun, stop_after: int | None):
    # ---- setup ----
    workdir = os.path.abspath(run.workdir)
    total = run.grpo.steps
    last = total if stop_after is None else min(stop_after, total)
    n, minibatches = run.rollout.n, run.grpo.num_minibatches
    seq_len = run.rollout.max_prompt_len + run.rollout.max_new_tokens
    scoring = reward_config(run, n)
    terms = Terms(scoring)  # user reward functions are imported here, before any work
    old_mode = run.grpo.old_logprobs
    if old_mode is OldLogprobs.AUTO:  # see the module docstring
        old_mode = (OldLogprobs.SAMPLER if jnp.dtype(run.model.dtype.value) == jnp.float32
                    else OldLogprobs.RECOMPUTE)

    # ---- mesh ----
    mesh = build.make_mesh(run.mesh)
    check_config(run, mesh)

    # ---- data ----
    records = open_rows(run.data.path, required=PROMPT_FIELDS, on_bad_row=run.data.on_bad_row,
                        seed=run.data.seed, tfds_data_dir=run.data.tfds_data_dir)
    tokenizer = build.load_model_tokenizer(run.model)
    special = special_token_ids(tokenizer)
    data_iter = iter(prompt_batches(
        records, tokenizer, batch_size=run.rollout.num_prompts, seed=run.data.seed,
        max_prompt_len=run.rollout.max_prompt_len, enable_thinking=run.data.enable_thinking,
        num_threads=run.data.num_threads, per_host=False, source=run.data.path,
        special_tokens_in_text=run.data.special_tokens_in_text))
    val_rows = [] if run.validation.every is None else _prompt_rows(run.validation.path, run,
                                                                    tokenizer)
    log.info("%d prompt rows from %s, %d validation prompts", len(records), run.data.path,
             len(val_rows))

    # ---- model / optimizer / reference ----
    # Every weight trains, or LoRA adapters over the frozen base `trained.frozen`.
    trained = build.policy(run.model, run.lora, mesh, seed=run.seed)
    graphdef, frozen = trained.graphdef, trained.frozen
    tx, update = cached_update(graphdef, run.grpo.optim, total * minibatches, minibatches,
                               run.grpo.grad_accum, run.grpo.chunk_size, loss_config(run), mesh)
    micro = minibatches * run.grpo.grad_accum
    policy_logprobs = cached_logprobs(graphdef, micro, run.grpo.chunk_size, mesh)
    abstract = state_lib.abstract_state(trained.abstract, tx, mesh)
    state_sharding = state_lib.shardings_of(abstract)
    frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
    reference = ref_params = ref_logprobs = None
    if run.loss.kl_coef > 0 or (terms.has_opera and scoring.scorer is Scorer.REFERENCE):
        if frozen is not None and run.reference == Reference():  # LoRA: the base itself
            ref_graphdef, ref_params = trained.base_graphdef, frozen
        else:
            ref_graphdef, ref_params = load_reference(run, mesh)
        reference = nnx.merge(ref_graphdef, ref_params)
        ref_logprobs = cached_logprobs(ref_graphdef, micro, run.grpo.chunk_size, mesh)

    # ---- restore ----
    # Order: (1) the abstract state above fixes shapes, dtypes and shardings without
    # allocating; (2) the newest readable checkpoint's arrays load straight into those shards
    # (an unreadable one is set aside, the next older tried); (3) the prompt iterator is
    # repositioned to the saved batch; (4) the saved config is only compared. Without a
    # checkpoint: params from the model section (or fresh adapters), fresh optimizer. The
    # reference and LoRA's frozen base were loaded above from their own sources either way.
    saved_config = to_json(run)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.checkpoint.keep,
                        async_save=run.checkpoint.async_save)

    def fresh():
        return state_lib.init_state(trained.init(), tx, abstract, seed=run.seed)

    state, start = ckpt.restore_or_init(abstract, fresh, data_iter=data_iter,
                                        config=saved_config)
    rng_data = np.asarray(sh.to_host(state.rng))

    # ---- loop ----
    update_fn = jax.jit(update, in_shardings=(state_sharding, None, frozen_sharding),
                        out_shardings=(state_sharding, None), donate_argnums=0)
    # Rollout reads the training arrays: set_params re-wraps them each step, no copy.
    sampler = Sampler.for_tokenizer(trained.model(state.params), tokenizer, mesh=mesh,
                                    stop_strings=False)
    stats = dict(think_close_id=special["think_close"], keywords=scoring.keywords)
    arch = build.architecture(run.model)
    peak = (run.grpo.peak_flops or 0.0) * mesh.size
    passes = int(old_mode is OldLogprobs.RECOMPUTE) + int(run.loss.kl_coef > 0)
    r = run.rollout
    sample_kwargs = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                         top_p=r.top_p, top_k=r.top_k, prompts_per_call=r.prompts_per_call,
                         slots=r.sampler_slots())
    writer = MetricsWriter(workdir, total_steps=total, initial_step=start, log=run.log,
                           config=saved_config)
    log_due = Every(run.grpo.log_every, last_step=last)
    ckpt_due = Every(run.checkpoint.every, last_step=last)
    val_due = Every(run.validation.every, last_step=last if val_rows else None)
    preempted = False

    def run_validation():
        sampler.set_params(nnx.state(policy := trained.model(state.params)))
        return validate(sampler, policy, reference, tokenizer, val_rows, run, seq_len=seq_len,
                        stats=stats)

    try:
        with sh.activation_mesh(mesh), catch_sigterm():
            if start == 0 and val_rows:  # the starting point of the validation curve
                writer.write(0, run_validation())
            for step in range(start + 1, last + 1):
                with jax.profiler.StepTraceAnnotation("grpo", step_num=step):
                    sampler.set_params(nnx.state(policy := trained.model(state.params)))
                    seconds = {"rollout": 0.0, "reward": 0.0}

                    def sample_and_score(rows, sampling_round):
                        # ---- rollout ----
                        t0 = time.perf_counter()
                        ro = sample_rollout(sampler, rows, n=n, seq_len=seq_len,
                                            seed=step_seed(rng_data, step, sampling_round),
                                            **sample_kwargs)
                        # ---- reward ----
                        t1 = time.perf_counter()
                        scored = score_rollout(terms, policy, reference, tokenizer, ro,
                                               max_len=r.max_new_tokens)
                        seconds["rollout"] += t1 - t0
                        seconds["reward"] += time.perf_counter() - t1
                        return ro, scored

                    ro, scored, sampling = collect_batch(
                        sample_and_score, data_iter, num_prompts=r.num_prompts,
                        dynamic=run.grpo.dynamic_sampling,
                        max_rounds=run.grpo.max_sampling_rounds)
                    advantages = group_advantages(
                        training_rewards(scored.reward, randomize=run.grpo.random_rewards,
                                         seed=step_seed(rng_data, step) + 1), ro.group_ids,
                        std_normalize=run.loss.std_normalize)
                    # ---- update ----
                    t2 = time.perf_counter()
                    host = {"tokens": ro.tokens, "mask": ro.mask}
                    if old_mode is OldLogprobs.SAMPLER:
                        host["old_logprobs"] = ro.old_logprobs
                    batch = {k: _upload(v, mesh, ("batch", "seq")) for k, v in host.items()}
                    batch["advantages"] = _upload(advantages, mesh, ("batch",))
                    if old_mode is OldLogprobs.RECOMPUTE:
                        batch["old_logprobs"] = policy_logprobs(trained.params(state.params),
                                                                batch["tokens"])
                    if run.loss.kl_coef > 0:
                        batch["ref_logprobs"] = ref_logprobs(ref_params, batch["tokens"])
                    jax.block_until_ready(batch)  # only to time the log-prob passes
                    t3 = time.perf_counter()
                    state, metrics = update_fn(state, batch, frozen)
                    metrics = sh.to_host(metrics)  # the step's one sync; NaN checked below
                    t4 = time.perf_counter()
                metrics.update(rollout_stats.reward_metrics(scored, ro, "reward/"),
                               **rollout_stats.response_stats(ro, tokenizer, **stats),
                               **sampling)
                metrics.update(rollout_stats.step_timing(
                    ro, rollout_s=seconds["rollout"], reward_s=seconds["reward"],
                    logprob_s=t3 - t2, update_s=t4 - t2, arch=arch, peak=peak, passes=passes))
                metrics["reward/adv_nonzero_frac"] = float(np.mean(advantages != 0))
                if val_due(step):
                    metrics.update(run_validation())
                if end_step(step, state, ckpt=ckpt, writer=writer, metrics=lambda: metrics,
                            log_due=log_due, ckpt_due=ckpt_due, config=saved_config,
                            data_iter=data_iter):
                    preempted = True
                    break
    finally:
        ckpt.close()  # waits for the last asynchronous save (and reports a failed one)
        writer.close()
    if preempted:
        raise Preempted(f"GRPO stopped at step {step} of {total} on SIGTERM / preemption; "
                        f"state saved in {workdir}/checkpoints — rerun to resume")
    if jax.process_index() == 0:
        plots.plot_rewards(workdir)
        for line in plots.run_summary(workdir):
            log.warning("%s", line)
    return state
