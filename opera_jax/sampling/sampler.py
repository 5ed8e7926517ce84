"""`Sampler`: the host side of the jitted loop, on token ids.

It pads what would otherwise recompile into a few buckets — prompt length and prompt count to
two steps per octave (2^k or 3·2^(k-1): 16, 24, 32, 48, ...; at least 16 and 1; padding the
prefill costs as much as real tokens), decode capacity to a power of two (at least 16), stop lists
to multiples of 4 strings × 8 bytes — places the inputs on the mesh, runs `loop.prefill` and
`loop.decode`, and brings the result back as numpy (one explicit `sharding.to_host`: a
`device_get`, gathered to every process when the mesh spans several).

With `slots=S` the same call runs on the continuous-batching engine instead (engine.py: at most
S rows decode at once over a paged KV pool, prompts shared by their n rows and cached across
calls); same `Samples`, same rows, same random streams.

    sampler = Sampler(model, token_pieces=token_bytes(tok), eos_ids=[eos], pad_id=pad, mesh=mesh)
    out = sampler.sample([[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.6, n=4)
    out.tokens[r, :out.lengths[r]]   # row r = prompt r // 4, sample r % 4
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opera_jax.buckets import bucket_size
from opera_jax.model.paged import PagedAttention, bytes_per_token, default_attention
from opera_jax.sampling import filters, loop, stops
from opera_jax.sampling.engine import Engine
from opera_jax.sharding import named_sharding, state_shardings, to_host
from opera_jax.tokenizer import default_eos_ids, special_token_ids


@functools.lru_cache(maxsize=4)
def _token_pieces(tokenizer, vocab_size: int) -> tuple[bytes, ...]:
    return tuple(stops.token_bytes(tokenizer, vocab_size))


def _per_row(value, count: int, n: int, dtype) -> np.ndarray:
    """A scalar, one value per prompt or one per row -> array [count · n] (row order)."""
    arr = np.asarray(value, dtype)
    if arr.ndim == 1 and arr.shape == (count * n,):
        return arr
    return np.repeat(_per_prompt(arr, count, dtype), n)


def default_kv_memory() -> int:
    """Bytes for the engine's KV pool: half of the free memory of an accelerator, 1 GiB on
    the CPU."""
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(0.5 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    return 1 << 30


def _per_prompt(value, count: int, dtype) -> np.ndarray:
    """A scalar or one value per prompt -> array [count]."""
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        return np.full((count,), arr, dtype)
    if arr.shape != (count,):
        raise ValueError(f"expected a scalar or {count} values, got shape {arr.shape}")
    return arr


def _row_ids(row_seeds, rows: int) -> np.ndarray:
    """int32 [rows]: each row's random stream (`row_seeds`, or the row index)."""
    if row_seeds is None:
        return np.arange(rows, dtype=np.int32)
    given = np.asarray(row_seeds, np.int64)
    if given.shape != (rows,) or (given < 0).any() or (given >= 2**31).any():
        raise ValueError(f"row_seeds needs {rows} ints in [0, 2**31), got shape {given.shape}")
    return given.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Samples:
    """Sampler results on the host; row r is prompt r // n, sample r % n (see loop.SampleOutput)."""

    tokens: np.ndarray  # int32 [R, C]
    logprobs: np.ndarray  # float32 [R, C]
    lengths: np.ndarray  # int32 [R]
    finish_reason: np.ndarray  # int32 [R], loop.FinishReason
    stop_index: np.ndarray  # int32 [R], -1 if no stop string fired
    stop_start: np.ndarray  # int32 [R], byte offset in the generated text, -1 if none
    stop_end: np.ndarray  # int32 [R]
    num_samples: int
    # Per prompt (not per row), with prompt_logprobs=True: log p(prompt[j] | prompt[:j]) for
    # j = 1 .. len - 1, temperature 1, float32.
    prompt_logprobs: list[np.ndarray] | None = None

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, log-probs) of row r, up to its length."""
        return self.tokens[r, :self.lengths[r]], self.logprobs[r, :self.lengths[r]]


class Sampler:
    """Batched sampling from a Qwen3 on token ids.

    Args:
      model: a `Qwen3`.
      token_pieces: the bytes of every token id (`stops.token_bytes(tokenizer)`); needed for
        stop strings. At most `model.config.vocab_size` entries; missing ids get b"".
      eos_ids: token ids that end a row.
      pad_id: written after a row's end and into prompt padding.
      mesh: shard batch over data/fsdp and heads over tensor; None = one device.
      cache_dtype: KV cache dtype; default the model's compute dtype.
      kv_memory: bytes of the engine's paged KV pool (`sample(slots=...)`); default
        `default_kv_memory()`. page_size: tokens per page.
      paged_attention: the engine's decode attention kernel (default by platform).
      prefill_chunk: most tokens of one prompt per engine prefill call.
      prefix_cache: keep prompts' pages for later calls that share their prefix.
    """

    COMPACT_MIN_ROWS = 8  # `compact` never narrows the batch below this

    @classmethod
    def for_tokenizer(cls, model, tokenizer, *, mesh: Mesh | None = None,
                      stop_strings: bool = True, eos_ids: Sequence[int] | None = None,
                      **kwargs) -> "Sampler":
        """A sampler with the tokenizer's EOS ids (default `<|im_end|>` and its EOS) and pad
        id, and with `stop_strings` the bytes of every token (stop strings need them);
        `kwargs` are the constructor's (cache_dtype, kv_memory, page_size, …)."""
        pieces = _token_pieces(tokenizer, model.config.vocab_size) if stop_strings else None
        pad = special_token_ids(tokenizer)["pad"]
        return cls(model, token_pieces=pieces,
                   eos_ids=default_eos_ids(tokenizer) if eos_ids is None else eos_ids,
                   pad_id=0 if pad is None else pad, mesh=mesh, **kwargs)

    def __init__(self, model, *, token_pieces: Sequence[bytes | str] | None = None,
                 eos_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None,
                 cache_dtype=None, kv_memory: int | None = None, page_size: int = 16,
                 paged_attention: PagedAttention | None = None, prefill_chunk: int = 256,
                 prefix_cache: bool = True):
        self.config = model.config
        self.mesh = mesh
        self.compute_dtype = jnp.dtype(model.dtype).name
        self._engine: Engine | None = None
        self._engine_args = dict(kv_memory=kv_memory, page_size=page_size,
                                 attention=paged_attention or default_attention(),
                                 chunk=prefill_chunk, prefix_cache=prefix_cache)
        self.graphdef, params = nnx.split(model)
        self.set_params(params)
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        self.cache_dtype = jnp.dtype(cache_dtype or model.dtype).name
        vocab = self.config.vocab_size
        self.table = None
        if token_pieces is not None:
            pieces = list(token_pieces)[:vocab]
            self.table = stops.TokenTable.build(pieces + [b""] * (vocab - len(pieces)))
            self._token_bytes = self._put(self.table.bytes)
            self._token_len = self._put(self.table.lengths)
        else:
            self._token_bytes = self._put(np.zeros((vocab, 8), np.uint8))
            self._token_len = self._put(np.zeros((vocab,), np.int32))

    def set_params(self, params) -> None:
        """Samples from new weights (an `nnx.state` of the same model), e.g. after an RL step."""
        if self.mesh is not None:
            params = jax.device_put(params, state_shardings(params, self.mesh))
        self.params = params
        if self._engine is not None:
            self._engine.clear_prefix_cache()  # cached pages hold the old weights' KV

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine behind `sample(slots=...)` (its pool and prefix
        cache live as long as this Sampler)."""
        if self._engine is None:
            a = self._engine_args
            page_bytes = a["page_size"] * bytes_per_token(self.config, self.cache_dtype)
            self._engine = Engine(
                self.config, self.graphdef, compute_dtype=self.compute_dtype,
                cache_dtype=self.cache_dtype,
                num_pages=max(2, (a["kv_memory"] or default_kv_memory()) // page_bytes),
                page_size=a["page_size"], attention=a["attention"], chunk=a["chunk"],
                prefix_cache=a["prefix_cache"], mesh=self.mesh)
        return self._engine

    def default_slots(self, prompts: Sequence[Sequence[int]], max_new_tokens, n: int) -> int:
        """Slots for `sample(slots="auto")`: as many rows as the pool holds if each row keeps
        its share of the prompt plus half its max_new_tokens (rows stop early on average; a
        row that runs the pool out is preempted and rerun), a power of two in [8, 256] (64 on
        the CPU, where a step's cost grows with its rows anyway), at most the rows."""
        count = len(prompts)
        max_new = _per_row(max_new_tokens, count, n, np.int64)
        per_row = (sum(len(x) for x in prompts) / (count * n) + max_new.mean() / 2
                   + self.engine.page_size)
        fit = int(self.engine.num_pages * self.engine.page_size // per_row)
        cap = 64 if jax.default_backend() == "cpu" else 256
        slots = 1 << max(3, min(fit, cap).bit_length() - 1)
        return min(slots, max(8, -(-(count * n) // 8) * 8))

    def _put(self, x: np.ndarray, names=None) -> jax.Array:
        """Host array -> device, sharded by logical `names` (replicated when None)."""
        if self.mesh is None:
            return jax.device_put(x)
        names = names if names is not None else (None,) * x.ndim
        return jax.device_put(x, named_sharding(self.mesh, names, x.shape))

    def sample(self, prompts: Sequence[Sequence[int]], *, max_new_tokens, temperature=1.0,
               top_p=1.0, top_k=0, n: int = 1, stop: Sequence[str] = (), seed: int = 0,
               prompt_logprobs: bool = False,
               row_seeds: Sequence[int] | None = None, compact: bool = False,
               slots: int | str | None = None) -> Samples:
        """Samples n continuations of each prompt.

        Args:
          prompts: token ids, each non-empty.
          max_new_tokens: a scalar, one value per prompt or one per row (len(prompts) · n).
          temperature, top_p, top_k: a scalar or one value per prompt.
            temperature 0 = greedy; top_k 0 and top_p 1 = off.
          n: samples per prompt (the prompt is prefilled once).
          stop: stop strings (needs `token_pieces`).
          seed: same seed, prompts and knobs -> same samples, on any mesh.
          prompt_logprobs: also return the prompt tokens' log-probs (e.g. for perplexity over
            prompt + continuation).
          row_seeds: optional, one int in [0, 2**31) per row (len(prompts) · n, row order):
            row r draws from fold_in(fold_in(key(seed), row_seeds[r]), step) instead of
            row_id r, so a row's samples do not depend on which other prompts share the call.
          compact: when rows finish at very different steps (stop strings), pause the loop
            whenever at most half of the rows still run and go on with those only (a batch
            bucket half as wide; down to `COMPACT_MIN_ROWS`). Same samples, less work where
            a step's cost grows with its rows (CPUs; large batches anywhere); a few more
            compilations (one per batch bucket).
          slots: None = the fixed batch above. An int S (or "auto": `default_slots`) = the
            continuous-batching engine (engine.py): at most S rows decode at once, the others
            queue and take a slot as soon as one frees; prompts are prefilled once into a
            paged KV pool and their full pages cached for later calls. Same samples (row r
            draws from the same stream), whatever S; `compact` does not apply.
        Returns:
          Samples with len(prompts) · n rows.
        """
        count = len(prompts)
        if count == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("need at least one prompt, and every prompt needs a token")
        if stop and self.table is None:
            raise ValueError("stop strings need token_pieces (the bytes of every token)")
        max_new = _per_row(max_new_tokens, count, n, np.int32)
        temp = _per_prompt(temperature, count, np.float32)
        k = _per_prompt(top_k, count, np.int32)
        p = _per_prompt(top_p, count, np.float32)
        if (max_new < 0).any() or (temp < 0).any():
            raise ValueError("max_new_tokens and temperature must be >= 0")

        if slots is not None:
            return self._sample_engine(prompts, max_new=max_new, temp=temp, k=k, p=p, n=n,
                                       stop=stop, seed=seed, prompt_logprobs=prompt_logprobs,
                                       row_seeds=row_seeds, slots=slots)
        b = bucket_size(count, 1, 2)  # padding prompts: length 0, max_new_tokens 0 (finished at once)
        plen = bucket_size(max(len(x) for x in prompts), 16, 2)
        tokens = np.full((b, plen), self.pad_id, np.int32)
        lengths = np.zeros((b,), np.int32)
        for i, x in enumerate(prompts):
            tokens[i, plen - len(x):] = x
            lengths[i] = len(x)

        row_id = np.arange(b * n, dtype=np.int32)  # padding rows keep theirs: never drawn
        row_id[:count * n] = _row_ids(row_seeds, count * n)

        def rows(x, fill):  # per prompt [count] -> per row [b·n]
            return np.repeat(np.concatenate([x, np.full((b - count,), fill, x.dtype)]), n)

        # The mode depends on top-k / top-p only, so temperature (greedy or not) never
        # recompiles; per shape bucket at most six filter variants (none, sort, top-k in four
        # widths) × stops on/off get compiled. Top-k values sharing a width never recompile.
        cache_config = loop.CacheConfig(num_samples=n, capacity=bucket_size(int(max_new.max()), 16, 1),
                                        cache_dtype=self.cache_dtype, mesh=self.mesh,
                                        prompt_logprobs=prompt_logprobs)
        mode = filters.filter_mode(k, p)
        width = filters.topk_width(k) if mode is filters.FilterMode.TOPK else filters.TOPK_CAP
        config = loop.LoopConfig(cache=cache_config, mode=mode, topk_width=width,
                                 use_stops=bool(stop), pad_id=self.pad_id)
        row_params = loop.RowParams(
            temperature=self._put(rows(temp, 0.0), ("batch",)),
            top_k=self._put(rows(k, 0), ("batch",)),
            top_p=self._put(rows(p, 1.0), ("batch",)),
            max_new_tokens=self._put(np.concatenate(
                [max_new, np.zeros(((b - count) * n,), np.int32)]), ("batch",)),
            row_id=self._put(row_id, ("batch",)))
        stop_arrays = self._stop_arrays(stop)

        cache, logits, prompt_lp = loop.prefill(
            self.graphdef, self.params, self._put(tokens, ("batch", None)),
            self._put(lengths, ("batch",)), config=cache_config)
        decode_args = (cache, logits, self._put(np.repeat(lengths, n), ("batch",)), row_params,
                       stop_arrays, self._put(np.int32(seed)))
        if compact:
            out = self._decode_compacting(*decode_args, config=config)
        else:
            out = to_host(loop.decode(self.graphdef, self.params, *decode_args,
                                      config=config)[0])
        prompt_lp = to_host(prompt_lp)  # gathered across processes if needed
        if prompt_lp is not None:
            prompt_lp = [prompt_lp[i, plen - len(x):plen - 1] for i, x in enumerate(prompts)]
        keep = count * n
        return Samples(tokens=out.tokens[:keep], logprobs=out.logprobs[:keep],
                       lengths=out.lengths[:keep], finish_reason=out.finish_reason[:keep],
                       stop_index=out.stop_index[:keep], stop_start=out.stop_start[:keep],
                       stop_end=out.stop_end[:keep], num_samples=n,
                       prompt_logprobs=prompt_lp)

    def _stop_arrays(self, stop: Sequence[str]) -> loop.StopArrays:
        stop_rev, stop_len = stops.encode_stops(stop)
        eos = np.full((bucket_size(len(self.eos_ids), 4, 1),), -1, np.int32)
        eos[:len(self.eos_ids)] = self.eos_ids
        return loop.StopArrays(token_bytes=self._token_bytes, token_len=self._token_len,
                               stop_rev=self._put(stop_rev), stop_len=self._put(stop_len),
                               eos_ids=self._put(eos))

    def _sample_engine(self, prompts, *, max_new, temp, k, p, n, stop, seed, prompt_logprobs,
                       row_seeds, slots) -> Samples:
        """`sample(slots=...)`: the same rows through the continuous-batching engine."""
        count = len(prompts)
        if slots == "auto":
            slots = self.default_slots(prompts, max_new, n)
        slots = int(slots)
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        mode = filters.filter_mode(k, p)
        width = filters.topk_width(k) if mode is filters.FilterMode.TOPK else filters.TOPK_CAP
        rows = loop.RowParams(temperature=np.repeat(temp, n), top_k=np.repeat(k, n),
                              top_p=np.repeat(p, n), max_new_tokens=max_new,
                              row_id=_row_ids(row_seeds, count * n))
        out, prompt_lp = self.engine.run(
            self.params, prompts, n=n, rows=rows, capacity=bucket_size(int(max_new.max()), 16, 1),
            stop=self._stop_arrays(stop), seed=self._put(np.int32(seed)), slots=slots,
            mode=mode, topk_width=width, use_stops=bool(stop), pad_id=self.pad_id,
            prompt_logprobs=prompt_logprobs, put=self._put)
        return Samples(tokens=out.tokens, logprobs=out.logprobs, lengths=out.lengths,
                       finish_reason=out.finish_reason, stop_index=out.stop_index,
                       stop_start=out.stop_start, stop_end=out.stop_end, num_samples=n,
                       prompt_logprobs=prompt_lp)

    def _decode_compacting(self, cache, logits, prompt_lengths, rows, stop_arrays, seed, *,
                           config: loop.LoopConfig) -> loop.SampleOutput:
        """`loop.decode` in segments, keeping only the running rows between them (numpy out)."""
        r = logits.shape[0]
        shards = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        floor = max(self.COMPACT_MIN_ROWS, shards)

        def pause_at(width: int) -> jax.Array:  # pause at half the rows; narrow ones run out
            return self._put(np.int32(width // 2 if width > floor else 0))

        state = loop.start(self.graphdef, self.params, cache, logits, prompt_lengths, rows,
                           stop_arrays, seed, pause_at(r), config=config)
        where = np.arange(r)  # the original row of each row of `state` (-1: filler)
        final = None
        while True:
            out, step = to_host((state.out, state.step))  # one transfer per segment
            if final is None:
                final = jax.tree.map(np.copy, out)  # every field [r, ...]
            running = out.finish_reason == loop.FinishReason.RUNNING
            ended = ~running if running.any() and int(step) < config.cache.capacity else (
                np.ones_like(running))
            real = ended & (where >= 0)
            for dst, src in zip(jax.tree.leaves(final), jax.tree.leaves(out)):
                dst[where[real]] = src[real]
            if ended.all():
                return final
            keep = np.flatnonzero(running)
            width = max(bucket_size(len(keep), 1, 1), floor)
            filler = np.flatnonzero(~running)[0]  # a finished row: stays finished, ignored
            index = np.concatenate([keep, np.full((width - len(keep),), filler)])
            state, rows = loop.take_rows(state, rows, self._put(index.astype(np.int32)),
                                         mesh=self.mesh)
            where = np.concatenate([where[keep], np.full((width - len(keep),), -1)])
            state = loop.resume(self.graphdef, self.params, state, rows, stop_arrays, seed,
                                pause_at(width), config=config)
