"""`Sampler`: the host side of the jitted loop, on token ids.

It pads what would otherwise recompile into a few buckets — prompt length and prompt count to
two steps per octave (2^k or 3·2^(k-1): 16, 24, 32, 48, ...; at least 16 and 1; padding the
prefill costs as much as real tokens), decode capacity to a power of two (at least 16), stop lists
to multiples of 4 strings × 8 bytes — places the inputs on the mesh, runs `loop.prefill` and
`loop.decode`, and brings the result back as numpy (one explicit `sharding.to_host`: a
`device_get`, gathered to every process when the mesh spans several).

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
from opera_jax.sampling import filters, loop, stops
from opera_jax.sharding import named_sharding, state_shardings, to_host
from opera_jax.tokenizer import default_eos_ids, special_token_ids


@functools.lru_cache(maxsize=4)
def _token_pieces(tokenizer, vocab_size: int) -> tuple[bytes, ...]:
    return tuple(stops.token_bytes(tokenizer, vocab_size))


def _per_prompt(value, count: int, dtype) -> np.ndarray:
    """A scalar or one value per prompt -> array [count]."""
    arr = np.asarray(value, dtype)
    if arr.ndim == 0:
        return np.full((count,), arr, dtype)
    if arr.shape != (count,):
        raise ValueError(f"expected a scalar or {count} values, got shape {arr.shape}")
    return arr


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
    """

    COMPACT_MIN_ROWS = 8  # `compact` never narrows the batch below this

    @classmethod
    def for_tokenizer(cls, model, tokenizer, *, mesh: Mesh | None = None,
                      stop_strings: bool = True, eos_ids: Sequence[int] | None = None,
                      cache_dtype=None) -> "Sampler":
        """A sampler with the tokenizer's EOS ids (default `<|im_end|>` and its EOS) and pad
        id, and with `stop_strings` the bytes of every token (stop strings need them)."""
        pieces = _token_pieces(tokenizer, model.config.vocab_size) if stop_strings else None
        pad = special_token_ids(tokenizer)["pad"]
        return cls(model, token_pieces=pieces,
                   eos_ids=default_eos_ids(tokenizer) if eos_ids is None else eos_ids,
                   pad_id=0 if pad is None else pad, mesh=mesh, cache_dtype=cache_dtype)

    def __init__(self, model, *, token_pieces: Sequence[bytes | str] | None = None,
                 eos_ids: Sequence[int] = (), pad_id: int = 0, mesh: Mesh | None = None,
                 cache_dtype=None):
        self.config = model.config
        self.mesh = mesh
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

    def _put(self, x: np.ndarray, names=None) -> jax.Array:
        """Host array -> device, sharded by logical `names` (replicated when None)."""
        if self.mesh is None:
            return jax.device_put(x)
        names = names if names is not None else (None,) * x.ndim
        return jax.device_put(x, named_sharding(self.mesh, names, x.shape))

    def sample(self, prompts: Sequence[Sequence[int]], *, max_new_tokens, temperature=1.0,
               top_p=1.0, top_k=0, n: int = 1, stop: Sequence[str] = (), seed: int = 0,
               prompt_logprobs: bool = False,
               row_seeds: Sequence[int] | None = None, compact: bool = False) -> Samples:
        """Samples n continuations of each prompt.

        Args:
          prompts: token ids, each non-empty.
          max_new_tokens, temperature, top_p, top_k: a scalar or one value per prompt.
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
        Returns:
          Samples with len(prompts) · n rows.
        """
        count = len(prompts)
        if count == 0 or any(len(p) == 0 for p in prompts):
            raise ValueError("need at least one prompt, and every prompt needs a token")
        if stop and self.table is None:
            raise ValueError("stop strings need token_pieces (the bytes of every token)")
        max_new = _per_prompt(max_new_tokens, count, np.int32)
        temp = _per_prompt(temperature, count, np.float32)
        k = _per_prompt(top_k, count, np.int32)
        p = _per_prompt(top_p, count, np.float32)
        if (max_new < 0).any() or (temp < 0).any():
            raise ValueError("max_new_tokens and temperature must be >= 0")

        b = bucket_size(count, 1, 2)  # padding prompts: length 0, max_new_tokens 0 (finished at once)
        plen = bucket_size(max(len(x) for x in prompts), 16, 2)
        tokens = np.full((b, plen), self.pad_id, np.int32)
        lengths = np.zeros((b,), np.int32)
        for i, x in enumerate(prompts):
            tokens[i, plen - len(x):] = x
            lengths[i] = len(x)

        row_id = np.arange(b * n, dtype=np.int32)  # padding rows keep theirs: never drawn
        if row_seeds is not None:
            given = np.asarray(row_seeds, np.int64)
            if given.shape != (count * n,) or (given < 0).any() or (given >= 2**31).any():
                raise ValueError(f"row_seeds needs {count * n} ints in [0, 2**31), got "
                                 f"shape {given.shape}")
            row_id[:count * n] = given

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
            max_new_tokens=self._put(rows(max_new, 0), ("batch",)),
            row_id=self._put(row_id, ("batch",)))
        stop_rev, stop_len = stops.encode_stops(stop)
        eos = np.full((bucket_size(len(self.eos_ids), 4, 1),), -1, np.int32)
        eos[:len(self.eos_ids)] = self.eos_ids
        stop_arrays = loop.StopArrays(token_bytes=self._token_bytes, token_len=self._token_len,
                                      stop_rev=self._put(stop_rev), stop_len=self._put(stop_len),
                                      eos_ids=self._put(eos))

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
