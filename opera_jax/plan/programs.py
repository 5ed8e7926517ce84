"""Every jitted program a stage runs, as (function, abstract arguments), built from its run.

    stage = stage_programs(run, mesh, assumptions)
    stage.resident        # name -> abstract pytree living through the whole stage
    stage.programs        # [Program]: lower(*args).compile() gives the target's program

Nothing is allocated: parameters, optimizer state and batches are ShapeDtypeStructs carrying
the shardings the trainers give them, and each function is the one the trainer jits (the
same `make_update_step`, `loop.prefill`, reward `lp_kernel`, …), so a compile here is the
compile the run will do. Shapes come from the config the way the trainers derive them: the
sampler pads prompt length and count to its buckets and the decode capacity to a power of
two; the reward kernel packs worst-case inputs through its own `pack_inputs`.

What a config does not fix is an assumption, printed with the table (`Assumptions`): the
longest prompt and response (the configured maxima), the reference answer's length and the
number of paragraph cuts K of a response the reward scores.

Adding a program (e.g. a continuous-batching engine step) is one more `Program(...)` in the
stage's builder: name, jitted function, abstract arguments, and which resident buffers are
alive beside it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from opera_jax import sharding as sh
from opera_jax.buckets import bucket_size
from opera_jax.config import build
from opera_jax.config import sections as S
from opera_jax.config.runs import GRPORun, SFTRun
from opera_jax.reward import Scorer
from opera_jax.reward.contexts import Context
from opera_jax.reward.kernel import lp_kernel, pack_inputs
from opera_jax.sampling import filters, loop
from opera_jax.train import grpo, sft
from opera_jax.train import state as state_lib


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """What the config leaves open, at worst case unless stated."""

    reference_tokens: int = 1024   # the reference answer the reward scores
    segments: int = 32             # K, paragraph cuts per response (the reward's K + 2 contexts)


@dataclasses.dataclass
class Program:
    """One jitted program of the stage."""

    name: str
    shapes: str                     # the call shape in words, for the table
    fn: Callable                    # a jax.jit-wrapped function
    args: tuple                     # abstract positional arguments
    kwargs: dict = dataclasses.field(default_factory=dict)  # static keyword arguments
    live: tuple[str, ...] = ()      # resident buffers alive beside it, not among its arguments
    calls: int = 1                  # calls per stage step (for the time estimate)
    loop_trips: int = 1             # iterations of its outer loop that XLA's cost counts once


@dataclasses.dataclass
class Stage:
    name: str
    resident: dict[str, Any]        # name -> abstract pytree (ShapeDtypeStructs with shardings)
    programs: list[Program]
    notes: list[str]                # one line each: what the plan assumed or chose
    mesh: Mesh


def sds(shape, dtype, mesh: Mesh, names) -> jax.ShapeDtypeStruct:
    """An abstract array sharded by logical `names` (None: replicated)."""
    sharding = (NamedSharding(mesh, P()) if names is None
                else sh.named_sharding(mesh, names, shape))
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def plannable_model(model: S.Model, notes: list[str]) -> S.Model:
    """The model section with an `hf_dir` that is not on this machine replaced by its preset
    (the architecture is all the planner needs)."""
    if model.hf_dir is not None and not build.is_hf_dir(model.hf_dir):
        if model.preset is None:
            raise FileNotFoundError(f"model.hf_dir {model.hf_dir!r} has no config.json here and "
                                    f"model.preset is None: the planner needs one of them")
        notes.append(f"architecture: preset {model.preset} (model.hf_dir {model.hf_dir} is "
                     f"not on this machine)")
        model = dataclasses.replace(model, hf_dir=None)
    return dataclasses.replace(model, checkpoint=None)


def stage_programs(run, mesh: Mesh, assume: Assumptions = Assumptions()) -> Stage:
    """The programs of the run's stage (GRPO or SFT)."""
    if isinstance(run, GRPORun):
        return _grpo(run, mesh, assume)
    if isinstance(run, SFTRun):
        return _sft(run, mesh)
    raise ValueError(f"the planner covers the sft and grpo stages; this config is "
                     f"{type(run).__name__} (plan its stages from their own configs)")


def _sft(run: SFTRun, mesh: Mesh) -> Stage:
    notes: list[str] = []
    sft.check_config(run, mesh)
    model = plannable_model(run.model, notes)
    graphdef, params = build.abstract_params(model, mesh)
    tx, _, step = sft.cached_step(graphdef, run.sft.optim, run.sft.steps, run.sft.grad_accum,
                                  run.sft.chunk_size, mesh)
    state = state_lib.abstract_state(params, tx, mesh)
    shape = (run.sft.batch_size, run.sft.seq_len)
    batch = {k: sds(shape, jnp.int32, mesh, ("batch", "seq"))
             for k in ("tokens", "segment_ids", "positions", "loss_mask")}
    shardings = state_lib.shardings_of(state)
    fn = jax.jit(step, in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, batch)),
                 out_shardings=(shardings, None), donate_argnums=0)
    mb = run.sft.batch_size // run.sft.grad_accum
    programs = [Program("train_step", f"{run.sft.grad_accum} x [{mb}, {run.sft.seq_len}] "
                        f"packed, remat={model.remat}", fn, (state, batch),
                        loop_trips=run.sft.grad_accum)]
    return Stage("sft", {"params": state.params, "optimizer": state.opt_state}, programs,
                 notes, mesh)


def _grpo(run: GRPORun, mesh: Mesh, assume: Assumptions) -> Stage:
    notes: list[str] = []
    grpo.check_config(run, mesh)
    model = plannable_model(run.model, notes)
    r, g = run.rollout, run.grpo
    rows = r.num_prompts * r.n
    seq_len = r.max_prompt_len + r.max_new_tokens
    m, a = g.num_minibatches, g.grad_accum
    micro = m * a
    old_mode = g.old_logprobs
    if old_mode is S.OldLogprobs.AUTO:  # as grpo._train decides
        old_mode = (S.OldLogprobs.SAMPLER if jnp.dtype(model.dtype.value) == jnp.float32
                    else S.OldLogprobs.RECOMPUTE)

    # ---- state, reference ----
    graphdef, params = build.abstract_params(model, mesh)
    tx, update = grpo.cached_update(graphdef, g.optim, g.steps * m, m, a, g.chunk_size,
                                    run.loss, mesh)
    state = state_lib.abstract_state(params, tx, mesh)
    resident = {"params": state.params, "optimizer": state.opt_state}
    scoring = grpo.reward_config(run, r.n)
    ref_graphdef = ref_params = None
    if run.loss.kl_coef > 0 or scoring.scorer is Scorer.REFERENCE:
        ref_model = plannable_model(grpo.reference_model(run), [])
        ref_graphdef, ref_params = build.abstract_params(
            dataclasses.replace(ref_model, param_dtype=ref_model.dtype), mesh)
        resident["reference"] = ref_params
    ref = ("reference",) if ref_params is not None else ()

    # ---- rollout: the sampler at the configured call shape ----
    programs = []
    per_call = r.prompts_per_call or r.num_prompts
    calls = -(-r.num_prompts // per_call)
    programs += _sampler(graphdef, params, mesh, prompts=per_call, n=r.n,
                         prompt_len=r.max_prompt_len, new_tokens=r.max_new_tokens,
                         dtype=model.dtype.value, top_k=r.top_k, top_p=r.top_p,
                         live=("optimizer",) + ref, calls=calls, prefix="")
    if run.validation.every is not None:
        v = run.validation
        programs += _sampler(graphdef, params, mesh, prompts=min(per_call, v.num_prompts),
                             n=v.n, prompt_len=r.max_prompt_len, new_tokens=r.max_new_tokens,
                             dtype=model.dtype.value, top_k=r.top_k, top_p=r.top_p,
                             live=("optimizer",) + ref, calls=0, prefix="val_")

    # ---- reward: the LP kernel on the scorer's weights ----
    scorer_graphdef, scorer_params, scorer_live = graphdef, params, ("optimizer",) + ref
    if scoring.scorer is Scorer.REFERENCE:
        scorer_graphdef, scorer_params, scorer_live = ref_graphdef, ref_params, (
            "params", "optimizer")
    programs.append(_reward(scorer_graphdef, scorer_params, mesh, scoring,
                            seq_len=seq_len, prompt_len=r.max_prompt_len, assume=assume,
                            live=scorer_live, calls=-(-rows // scoring.batch_size)))

    # ---- update: no-grad log-prob passes, then the optimizer steps ----
    tokens = sds((rows, seq_len), jnp.int32, mesh, ("batch", "seq"))
    per_row = sds((rows, seq_len), jnp.float32, mesh, ("batch", "seq"))
    if old_mode is S.OldLogprobs.RECOMPUTE:
        fn = grpo.cached_logprobs(graphdef, micro, g.chunk_size, mesh)
        programs.append(Program("old_logprobs", f"{micro} x [{rows // micro}, {seq_len}] "
                                f"no grad", fn, (params, tokens),
                                live=("optimizer",) + ref, loop_trips=micro))
    if run.loss.kl_coef > 0:
        fn = grpo.cached_logprobs(ref_graphdef, micro, g.chunk_size, mesh)
        programs.append(Program("ref_logprobs", f"{micro} x [{rows // micro}, {seq_len}] "
                                f"no grad, reference", fn, (ref_params, tokens),
                                live=("params", "optimizer"), loop_trips=micro))
    batch = {"tokens": tokens, "mask": per_row, "old_logprobs": per_row,
             "advantages": sds((rows,), jnp.float32, mesh, ("batch",))}
    if run.loss.kl_coef > 0:
        batch["ref_logprobs"] = per_row
    shardings = state_lib.shardings_of(state)
    fn = jax.jit(update, in_shardings=(shardings, None), out_shardings=(shardings, None),
                 donate_argnums=0)
    programs.append(Program("update", f"{m} updates x {a} x [{rows // micro}, {seq_len}], "
                            f"remat={model.remat}", fn, (state, batch), live=ref,
                            loop_trips=micro))
    if r.engine:
        notes.append("rollout.engine is on: rollouts are planned as the "
                     "fixed-batch sampler in calls of rollout.prompts_per_call (engine=False "
                     "runs exactly that); the engine's paged pool takes half the free HBM when "
                     "it starts, which this plan does not cover")
    notes.append(f"old log-probs: {old_mode.value}; reward scorer: {scoring.scorer.value}; "
                 f"reward assumes a {assume.reference_tokens}-token reference and K = "
                 f"{_segments(scoring, assume)} cuts per response")
    return Stage("grpo", resident, programs, notes, mesh)


def _sampler(graphdef, params, mesh, *, prompts: int, n: int, prompt_len: int,
             new_tokens: int, dtype: str, top_k, top_p, live, calls: int,
             prefix: str) -> list[Program]:
    """Prefill and decode at the sampler's padded call shape (Sampler.sample's buckets)."""
    b = bucket_size(prompts, 1, 2)
    plen = bucket_size(prompt_len, 16, 2)
    capacity = bucket_size(new_tokens, 16, 1)
    cache_config = loop.CacheConfig(num_samples=n, capacity=capacity,
                                    cache_dtype=jnp.dtype(dtype).name, mesh=mesh)
    mode = filters.filter_mode([top_k or 0], [top_p])
    width = filters.topk_width([top_k]) if mode is filters.FilterMode.TOPK else filters.TOPK_CAP
    config = loop.LoopConfig(cache=cache_config, mode=mode, topk_width=width)
    tokens = sds((b, plen), jnp.int32, mesh, ("batch", None))
    lengths = sds((b,), jnp.int32, mesh, ("batch",))
    prefill = Program(f"{prefix}prefill", f"{b} prompts x {n} samples, prompt {plen}, cache "
                      f"{plen + capacity} slots", loop.prefill, (graphdef, params, tokens, lengths),
                      {"config": cache_config}, live=live, calls=calls)
    cache, logits, _ = jax.eval_shape(lambda *a: loop.prefill(*a, config=cache_config),
                                      graphdef, params, tokens, lengths)
    rows_n = b * n
    cache = cache.map_kv(lambda x: sds(x.shape, x.dtype, mesh, cache.LOGICAL_AXES)).replace(
        segment_ids=sds(cache.segment_ids.shape, jnp.int32, mesh, ("batch", "cache_seq")),
        end=sds((), jnp.int32, mesh, None))
    logits = sds(logits.shape, jnp.float32, mesh, ("batch", "act_vocab"))
    per_row = lambda dt: sds((rows_n,), dt, mesh, ("batch",))  # noqa: E731
    rows = loop.RowParams(temperature=per_row(jnp.float32), top_k=per_row(jnp.int32),
                          top_p=per_row(jnp.float32), max_new_tokens=per_row(jnp.int32),
                          row_id=per_row(jnp.int32))
    vocab = logits.shape[-1]
    stop = loop.StopArrays(token_bytes=sds((vocab, 8), jnp.uint8, mesh, None),
                           token_len=sds((vocab,), jnp.int32, mesh, None),
                           stop_rev=sds((4, 8), jnp.int32, mesh, None),
                           stop_len=sds((4,), jnp.int32, mesh, None),
                           eos_ids=sds((4,), jnp.int32, mesh, None))
    decode = Program(f"{prefix}decode", f"{rows_n} rows, {capacity} steps over "
                     f"{plen + capacity} slots", loop.decode,
                     (graphdef, params, cache, logits, per_row(jnp.int32), rows, stop,
                      sds((), jnp.int32, mesh, None)), {"config": config},
                     live=live, calls=calls, loop_trips=capacity)
    return [prefill, decode]


def _segments(scoring, assume: Assumptions) -> int:
    k = assume.segments
    return k if scoring.max_segments is None else min(k, scoring.max_segments)


def _reward(graphdef, params, mesh, scoring, *, seq_len: int, prompt_len: int,
            assume: Assumptions, live, calls: int) -> Program:
    """The LP kernel on one call of `reward.batch_size` responses of the longest length."""
    k = _segments(scoring, assume)
    sequences = [[1] * seq_len] * scoring.batch_size
    references = [[1] * assume.reference_tokens] * scoring.batch_size
    cuts = np.linspace(prompt_len + 1, seq_len, k + 2).astype(int)
    contexts = [[Context(int(c)) for c in cuts]] * scoring.batch_size
    shards = sh.batch_shards(mesh)
    packed, windows, _ = pack_inputs(sequences, references, contexts, scoring, shards=shards)
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))
            for x in packed]
    temperature = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    steps, per_step = packed[4].shape
    chunks, b, chunk = packed[0].shape
    return Program("reward", f"{b} responses x {chunks * chunk} tokens, {steps} x {per_step} "
                   f"contexts of {packed[2].shape[1]} reference tokens, windows {windows}",
                   lp_kernel, (graphdef, params, *args, temperature),
                   {"windows": windows, "logprob_chunk": scoring.logprob_chunk,
                    "shards": shards},
                   live=live, calls=calls, loop_trips=steps)
