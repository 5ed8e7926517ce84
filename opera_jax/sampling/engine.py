"""Continuous batching over a paged KV cache: the host side of the engine (engine_loop.py).

    sampler = Sampler(model, token_pieces=token_bytes(tok), eos_ids=[eos])
    out = sampler.sample(prompts, max_new_tokens=4096, n=16, temperature=1.0, slots=64)
    out.tokens[r, :out.lengths[r]]     # the same `Samples`, rows in the same order

A call with `slots=S` decodes at most S rows at once; the other rows wait in a queue. Each
prompt is prefilled once, in chunks of at most `chunk` tokens (several prompts per jitted
call), into pages of its own; its n rows then share those pages (copy on write for the partly
filled last one). The decode loop runs on device and refills a slot from the queue in the
step after its row finished (EOS, stop string, its max_new_tokens), returning to the host only
to prefill more prompts (when the queue runs low, or every `interleave_steps` steps while a
long prompt is being prefilled chunk by chunk), or when pages run out. Nothing recompiles for
new requests: shapes are fixed by (slots, rows bucket, output columns, pages per slot).

Rows are reproducible one by one: row r's token t is drawn from
fold_in(fold_in(key(seed), row_id[r]), t) whatever slot, step or batch it runs in; the same
streams as the fixed-batch sampler (loop.py), so both give the same samples.

Memory. The pool holds `num_pages` pages of `page_size` tokens (default 16), each token
2·L·K·H·bytes (K and V of every layer: 1 KiB for the tiny preset in float32, 112 KiB for
Qwen3-0.6B in bf16), plus one hidden vector (D values) per page. Pages in use follow the live
tokens: a row takes a page when its next token starts one and gives all of its pages back when
it finishes; a prompt's pages are held once for its n rows. When the pool runs short the
engine evicts cached prefixes, then preempts the youngest running row (it runs again from the
start later, with the same tokens).

Prefix cache (cold-start synthesis). After a prompt is prefilled its full pages stay in the
engine's prefix cache (prefix_cache.py) until memory is needed or `clear_prefix_cache()` (the
Sampler clears it on `set_params`). A later prompt that starts with the same tokens, e.g. a
synthesis job's next phase (context + kept text) or its B candidates at a branch point, reuses
those pages and prefills only the rest, in this call or any later call on the same `Sampler`.
Nothing to pass: the handle is the Sampler itself (its `engine`); `engine.last_stats` says how
many prompt tokens were reused and prefilled.

Meshes. On a mesh the parameters stay sharded as they are and the pool follows (GSPMD shards
its kv-head axis over `tensor`); slots are not split over `data` / `fsdp`: one engine serves
the whole mesh, and data-parallel engines (one per replica group) are left to the caller.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opera_jax.model.paged import PagedAttention, bytes_per_token
from opera_jax.sampling import engine_loop as el
from opera_jax.sampling.loop import RowParams, StopArrays
from opera_jax.sampling.prefix_cache import PrefixCache

_FOREVER = 2 ** 30


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _bucket(x: int, minimum: int) -> int:
    """The smallest 2^k or 3·2^(k-1) that is >= max(x, minimum) (as sampler.py)."""
    x = max(int(x), minimum)
    p = _pow2(x)
    return 3 * p // 4 if p >= 4 and 3 * p // 4 >= x else p


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """What one engine call did."""

    slots: int
    rows: int
    generated_tokens: int
    decode_steps: int  # loop iterations (every slot advances by at most one token in each)
    busy_slot_steps: int  # slot-steps with a running row
    segments: int  # decode-loop launches (host round trips)
    prefill_calls: int
    prefill_tokens: int  # prompt tokens run through the model
    reused_tokens: int  # prompt tokens found in the prefix cache instead
    preemptions: int
    page_size: int
    bytes_per_token: int
    peak_pages: int  # most pages in use at once (prompt entries and cached pages included)
    peak_live_tokens: int  # tokens held in those pages at that moment

    @property
    def ideal_steps(self) -> float:
        """Decode steps if every slot were busy at every step."""
        return self.generated_tokens / self.slots

    @property
    def peak_kv_bytes(self) -> int:
        return self.peak_pages * self.page_size * self.bytes_per_token


@dataclasses.dataclass
class _Job:
    """One prompt to prefill, and the rows that decode from it afterwards."""

    prompt: int
    tokens: np.ndarray
    rows: list[int]
    score: bool = True  # keep its prompt log-probs (False for a preempted row's rerun)
    entry: int = -1
    done: int = 0  # prompt tokens in the entry's pages so far
    hits: list = dataclasses.field(default_factory=list)  # prefix-cache nodes, not yet taken


class Engine:
    """Continuous-batching decode over a paged KV pool that lives across calls.

    Args:
      model_config: the model's `Qwen3Config`; graphdef: `nnx.split(model)[0]`.
      compute_dtype: the model's compute dtype; cache_dtype: dtype of the KV pages.
      num_pages: pages in the pool (page 0 is reserved).
      page_size: tokens per page (a power of two).
      attention: decode attention kernel and tiling (model/paged.py).
      chunk: most prompt tokens of one prompt per prefill call (a power of two >= page_size).
      prefill_tokens: token budget of one prefill call (prompts × chunk).
      prefix_cache: keep prompts' full pages for later prompts with the same prefix.
      interleave_steps: decode steps between two prefill calls while prompts are waiting.
      mesh: the mesh the parameters live on (the pool is replicated over it), or None.
    """

    def __init__(self, model_config, graphdef, *, compute_dtype, cache_dtype, num_pages: int,
                 page_size: int = 16, attention: PagedAttention = PagedAttention(),
                 chunk: int = 256, prefill_tokens: int = 2048, prefix_cache: bool = True,
                 interleave_steps: int = 16, mesh=None):
        if page_size & (page_size - 1) or chunk & (chunk - 1) or chunk < page_size:
            raise ValueError(f"page_size ({page_size}) and chunk ({chunk}) must be powers of "
                             "two with chunk >= page_size")
        self.config, self.graphdef = model_config, graphdef
        self.compute_dtype, self.cache_dtype = jnp.dtype(compute_dtype), jnp.dtype(cache_dtype)
        self.num_pages, self.page_size = int(num_pages), page_size
        self.attention, self.chunk, self.prefill_tokens = attention, chunk, prefill_tokens
        self.interleave_steps, self.mesh = interleave_steps, mesh
        self.cache = PrefixCache(page_size) if prefix_cache else None
        self.bytes_per_token = bytes_per_token(model_config, self.cache_dtype)
        self.pool: el.Pool | None = None  # allocated on first use
        self.last_stats: EngineStats | None = None

    # ---- pool ------------------------------------------------------------------------------

    def _pool(self) -> el.Pool:
        if self.pool is None:
            self.pool = self._commit(el.Pool.init(self.config, self.num_pages, self.page_size,
                                                  self.cache_dtype, self.compute_dtype))
        return self.pool

    def _commit(self, tree):
        """Fresh state placed like the jitted programs' outputs (committed to the device, or
        replicated on the mesh), so the first call does not compile a second variant."""
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0]) if self.mesh is None \
            else jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(tree, sharding)

    def pages_in_use(self) -> int:
        """Pages referenced now (between calls: the prefix cache's)."""
        return 0 if self.pool is None else int(jax.device_get(self.pool.alloc.in_use()))

    def clear_prefix_cache(self) -> None:
        """Gives back every cached page (call after changing the weights)."""
        if self.cache is not None and self.pool is not None and len(self.cache):
            self._release(self.cache.clear())

    def _release(self, page_ids: Sequence[int]) -> None:
        if page_ids:
            ids = np.zeros((_pow2(max(len(page_ids), 64)),), np.int32)
            ids[:len(page_ids)] = page_ids
            self.pool = el.release_pages(self.pool, jnp.asarray(ids))

    def _retain(self, page_ids: Sequence[int]) -> None:
        if page_ids:
            ids = np.zeros((_pow2(max(len(page_ids), 64)),), np.int32)
            ids[:len(page_ids)] = page_ids
            self.pool = el.retain_pages(self.pool, jnp.asarray(ids))

    def _top(self) -> int:
        return int(jax.device_get(self.pool.alloc.top))

    # ---- one call --------------------------------------------------------------------------

    def run(self, params, prompts: Sequence[Sequence[int]], *, n: int, rows: RowParams,
            capacity: int, stop: StopArrays, seed, slots: int, mode, topk_width: int,
            use_stops: bool, pad_id: int, prompt_logprobs: bool = False, put=jnp.asarray):
        """Samples every row of `prompts` × n with at most `slots` rows decoding at once.

        Args:
          params: the model's `nnx.state`.
          prompts: token ids (each non-empty). n: samples per prompt.
          rows: per-row knobs as numpy arrays [len(prompts) · n] (row r = prompt r // n).
          capacity: output columns C (>= every row's max_new_tokens).
          stop: device `StopArrays`; seed: device int32 [].
          slots: S. mode, topk_width, use_stops, pad_id: as loop.LoopConfig.
          prompt_logprobs: also return each prompt's log-probs.
          put: host array -> device array.
        Returns:
          (SampleOutput of numpy arrays [len(prompts) · n, ...], per-prompt float32 prompt
          log-probs (positions 1 .. len - 1) or None). `last_stats` describes the call.
        """
        p = self.page_size
        count, real = len(prompts), len(prompts) * n
        prompts = [np.asarray(x, np.int32) for x in prompts]
        longest = max(len(x) for x in prompts)
        max_new = np.asarray(rows.max_new_tokens, np.int32)
        r_pad = _bucket(real, 8)
        chunk = min(self.chunk, max(p, _pow2(longest)))
        high = max(slots, n)  # rows kept ready in the queue
        low = max(1, slots // 4)  # refill below this
        prompts_per_call = max(1, min(_pow2(-(-high // n)), _pow2(count),
                                      self.prefill_tokens // chunk))
        pages_per_slot = -(-(-(-(longest + capacity) // p)) // 16) * 16
        num_entries = slots + prompts_per_call
        dc = el.DecodeConfig(slots=slots, pages_per_slot=pages_per_slot, rows=r_pad,
                             capacity=capacity, mode=mode, topk_width=topk_width,
                             use_stops=use_stops, pad_id=pad_id, attention=self.attention)
        pc = el.PrefillConfig(prompts=prompts_per_call, chunk=chunk,
                              prompt_logprobs=prompt_logprobs, attention=self.attention)

        def padded(x, fill):
            out = np.full((r_pad,), fill, np.asarray(x).dtype)
            out[:real] = x
            return out

        row_id = np.arange(r_pad, dtype=np.int32)
        row_id[:real] = rows.row_id
        dev_rows = RowParams(temperature=put(padded(rows.temperature, 0.0)),
                             top_k=put(padded(rows.top_k, 0)), top_p=put(padded(rows.top_p, 1.0)),
                             max_new_tokens=put(padded(max_new, 0)), row_id=put(row_id))
        self._pool()
        entries = self._commit(el.Entries.init(num_entries, pages_per_slot,
                                               self.config.hidden_size, self.compute_dtype))
        state = self._commit(el.init_slots(self.config, dc, dev_rows.max_new_tokens,
                                           stop.stop_rev.shape[1]))

        pending = collections.deque(
            _Job(i, prompts[i], [i * n + j for j in range(n) if max_new[i * n + j] > 0])
            for i in range(count))
        prefilling: list[_Job] = []
        ready: collections.deque[int] = collections.deque()
        row_entry = np.zeros((r_pad,), np.int32)
        waiting_rows: dict[int, int] = {}  # entry -> its rows not yet in a slot
        free_entries = list(range(num_entries - 1, -1, -1))
        prompt_lp = [np.zeros((len(x),), np.float32) for x in prompts] if prompt_logprobs \
            else None
        reserve = min(slots, (self.num_pages - 1) // 8)  # pages kept for running rows' growth
        top, running, gen = self._top(), 0, np.zeros((slots,), np.int32)
        counters = collections.Counter()

        def release_entries(done_entries):
            nonlocal entries
            mask = np.zeros((num_entries,), bool)
            mask[list(done_entries)] = True
            self.pool, entries = el.release_entries(self.pool, entries, jnp.asarray(mask))
            free_entries.extend(done_entries)

        def prefill_once() -> bool:
            """One prefill call: the next chunk of up to `prompts_per_call` prompts."""
            nonlocal entries, top
            batch = prefilling[:prompts_per_call]
            while len(batch) < prompts_per_call and pending and free_entries:
                job = pending.popleft()
                if self.cache is not None:
                    job.hits = self.cache.match(job.tokens, max_pages=(len(job.tokens) - 1) // p,
                                                need_logprobs=prompt_logprobs and job.score)
                job.done = len(job.hits) * p
                if prompt_lp is not None and job.score:
                    for j, node in enumerate(job.hits):
                        prompt_lp[job.prompt][j * p:(j + 1) * p] = node.logprobs
                job.entry = free_entries.pop()
                prefilling.append(job)
                batch.append(job)
            if not batch:
                return False
            sizes = [min(chunk, len(job.tokens) - job.done) for job in batch]
            need = sum(-(-c // p) for c in sizes)
            if top < need + reserve and self.cache is not None:
                keep = [node for job in prefilling for node in job.hits]
                self._release(self.cache.evict(need + reserve - top, keep=keep))
                top = self._top()
            fits, total = 0, 0
            for c in sizes:  # the jobs that fit, in order (the others wait for pages)
                if top < total + -(-c // p) + (reserve if running else 0):
                    break
                fits, total = fits + 1, total + -(-c // p)
            if fits == 0:
                return False
            batch, sizes = batch[:fits], sizes[:fits]
            b = prompts_per_call
            tokens = np.full((b, chunk), pad_id, np.int32)
            entry = np.full((b,), num_entries, np.int32)
            start, cnt = np.zeros((b,), np.int32), np.zeros((b,), np.int32)
            final = np.zeros((b,), bool)
            reuse = np.zeros((b, pages_per_slot), np.int32)
            reuse_count = np.zeros((b,), np.int32)
            for i, (job, c) in enumerate(zip(batch, sizes)):
                tokens[i, :c] = job.tokens[job.done:job.done + c]
                entry[i], start[i], cnt[i] = job.entry, job.done, c
                final[i] = job.done + c == len(job.tokens)
                if job.hits:
                    reuse[i, :len(job.hits)] = [node.page for node in job.hits]
                    reuse_count[i] = len(job.hits)
                    counters["reused_tokens"] += len(job.hits) * p
            self.pool, entries, lp = el.prefill(
                self.graphdef, params, self.pool, entries, put(tokens), put(entry), put(start),
                put(cnt), put(final), put(reuse), put(reuse_count), config=pc)
            counters["prefill_calls"] += 1
            counters["prefill_tokens"] += int(sum(sizes))
            lp = None if lp is None else np.asarray(jax.device_get(lp))
            done_jobs = []
            for i, (job, c) in enumerate(zip(batch, sizes)):
                if lp is not None and job.score:
                    prompt_lp[job.prompt][job.done:job.done + c] = lp[i, :c]
                job.done += c
                job.hits = []
                if job.done == len(job.tokens):
                    done_jobs.append(job)
            if done_jobs:
                tables = np.asarray(jax.device_get(entries.table)) if self.cache is not None \
                    else None
                for job in done_jobs:
                    prefilling.remove(job)
                    if self.cache is not None:
                        full = len(job.tokens) // p
                        lps = prompt_lp[job.prompt] if prompt_lp is not None and job.score \
                            else None
                        self._retain(self.cache.insert(job.tokens, tables[job.entry, :full], lps))
                    for r in job.rows:
                        row_entry[r] = job.entry
                    ready.extend(job.rows)
                    waiting_rows[job.entry] = len(job.rows)
                empty = [job.entry for job in done_jobs if not job.rows]
                for e in empty:
                    del waiting_rows[e]
                if empty:
                    release_entries(empty)
            top = self._top()
            return True

        while pending or prefilling or ready or running:
            # Prefill until enough rows wait (one chunk call at a time while slots decode).
            while (pending or prefilling) and len(ready) < high:
                if not prefill_once():
                    if not (ready or running):
                        raise RuntimeError(
                            f"KV pool too small: {self.num_pages} pages of {p} tokens, "
                            f"{top} free; a prompt chunk of {chunk} tokens does not fit")
                    break
                if running:
                    break
            queue = np.zeros((r_pad,), np.int32)
            queued = list(ready)[:r_pad]
            queue[:len(queued)] = queued
            more = bool(pending or prefilling)
            low_water = low if more and len(queued) > low else 0
            max_steps = self.interleave_steps if (prefilling or (more and not low_water)) \
                else _FOREVER
            self.pool, state = el.decode(
                self.graphdef, params, self.pool, entries, state, dev_rows, put(row_entry),
                put(queue), put(np.int32(len(queued))), stop, seed, put(np.int32(low_water)),
                put(np.int32(max_steps)), put(np.int32(reserve)), config=dc)
            counters["segments"] += 1
            status, head, top, slot_rows, gen = jax.device_get(
                (state.status, state.head, self.pool.alloc.top, state.row, state.generated))
            top, running = int(top), int((slot_rows >= 0).sum())
            done_entries = []
            for _ in range(int(head)):
                e = int(row_entry[ready.popleft()])
                waiting_rows[e] -= 1
                if waiting_rows[e] == 0:
                    del waiting_rows[e]
                    done_entries.append(e)
            if done_entries:
                release_entries(done_entries)
                top = self._top()
            if status == el.Status.PAGES:
                keep = [node for job in prefilling for node in job.hits]
                freed = self.cache.evict(max(slots, len(self.cache) // 8), keep=keep) \
                    if self.cache is not None else []
                if freed:
                    self._release(freed)
                elif running:
                    # The youngest row loses least; it reruns later with the same tokens.
                    victim = int(np.argmin(np.where(slot_rows >= 0, gen, _FOREVER)))
                    r = int(slot_rows[victim])
                    mask = np.zeros((slots,), bool)
                    mask[victim] = True
                    self.pool, state = el.preempt(self.pool, state, jnp.asarray(mask),
                                                  pad_id=pad_id)
                    pending.appendleft(_Job(r // n, prompts[r // n], [r], score=False))
                    counters["preemptions"] += 1
                elif reserve:
                    reserve = 0
                else:
                    raise RuntimeError(
                        f"KV pool too small: {self.num_pages} pages of {p} tokens; "
                        f"{top} free and no row can start")
                top = self._top()

        out, steps, busy, peak_pages, peak_live = jax.device_get(
            (state.out, state.steps, state.busy, state.peak_pages, state.peak_live))
        out = jax.tree.map(lambda x: np.asarray(x)[:real], out)
        self.last_stats = EngineStats(
            slots=slots, rows=real, generated_tokens=int(out.lengths.sum()),
            decode_steps=int(steps), busy_slot_steps=int(busy), segments=counters["segments"],
            prefill_calls=counters["prefill_calls"], prefill_tokens=counters["prefill_tokens"],
            reused_tokens=counters["reused_tokens"], preemptions=counters["preemptions"],
            page_size=p, bytes_per_token=self.bytes_per_token, peak_pages=int(peak_pages),
            peak_live_tokens=int(peak_live))
        if prompt_lp is not None:
            prompt_lp = [x[1:] for x in prompt_lp]
        return out, prompt_lp
