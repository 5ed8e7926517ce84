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

from opera_jax.buckets import bucket_size, round_up
from opera_jax.model.paged import PagedAttention, bytes_per_token
from opera_jax.sampling import engine_loop as el
from opera_jax.sampling.loop import RowParams, StopArrays
from opera_jax.sampling.prefix_cache import PrefixCache
from opera_jax.sharding import to_host

_FOREVER = 2 ** 30


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
        return 0 if self.pool is None else int(to_host(self.pool.alloc.in_use()))

    def clear_prefix_cache(self) -> None:
        """Gives back every cached page (call after changing the weights)."""
        if self.cache is not None and self.pool is not None and len(self.cache):
            self._release(self.cache.clear())

    def _release(self, page_ids: Sequence[int]) -> None:
        if page_ids:
            ids = np.zeros((bucket_size(len(page_ids), 64, 1),), np.int32)
            ids[:len(page_ids)] = page_ids
            self.pool = el.release_pages(self.pool, jnp.asarray(ids))

    def _retain(self, page_ids: Sequence[int]) -> None:
        if page_ids:
            ids = np.zeros((bucket_size(len(page_ids), 64, 1),), np.int32)
            ids[:len(page_ids)] = page_ids
            self.pool = el.retain_pages(self.pool, jnp.asarray(ids))

    def _top(self) -> int:
        return int(to_host(self.pool.alloc.top))

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
        self._pool()
        call = _Call(self, params, [np.asarray(x, np.int32) for x in prompts], n=n, rows=rows,
                     capacity=capacity, stop=stop, seed=seed, slots=slots, mode=mode,
                     topk_width=topk_width, use_stops=use_stops, pad_id=pad_id,
                     prompt_logprobs=prompt_logprobs, put=put)
        while call.pending or call.prefilling or call.ready or call.running:
            call.prefill()
            call.decode()
        return call.finish()


class _Call:
    """The host loop of one `Engine.run`: prompts wait in `pending`, are prefilled chunk by
    chunk (`prefilling`), and their rows then wait in `ready` for a slot; `decode` runs a
    segment and does the bookkeeping of what it admitted, and of running out of pages."""

    def __init__(self, engine: Engine, params, prompts: list[np.ndarray], *, n, rows, capacity,
                 stop, seed, slots, mode, topk_width, use_stops, pad_id, prompt_logprobs, put):
        self.e, self.params, self.prompts, self.n = engine, params, prompts, n
        self.stop, self.seed, self.slots, self.pad_id, self.put = stop, seed, slots, pad_id, put
        p = engine.page_size
        count, self.real = len(prompts), len(prompts) * n
        longest = max(len(x) for x in prompts)
        max_new = np.asarray(rows.max_new_tokens, np.int32)
        r_pad = bucket_size(self.real, 8, 2)
        self.chunk = min(engine.chunk, max(p, bucket_size(longest, 1, 1)))
        self.high = max(slots, n)  # rows kept ready in the queue
        self.low = max(1, slots // 4)  # a segment pauses for more below this
        self.prompts_per_call = max(1, min(bucket_size(-(-self.high // n), 1, 1),
                                           bucket_size(count, 1, 1),
                                           engine.prefill_tokens // self.chunk))
        self.pages_per_slot = round_up(-(-(longest + capacity) // p), 16)
        self.num_entries = slots + self.prompts_per_call
        self.dc = el.DecodeConfig(slots=slots, pages_per_slot=self.pages_per_slot, rows=r_pad,
                                  capacity=capacity, mode=mode, topk_width=topk_width,
                                  use_stops=use_stops, pad_id=pad_id, attention=engine.attention)
        self.pc = el.PrefillConfig(prompts=self.prompts_per_call, chunk=self.chunk,
                                   prompt_logprobs=prompt_logprobs, attention=engine.attention)

        def padded(x, fill):
            out = np.full((r_pad,), fill, np.asarray(x).dtype)
            out[:self.real] = x
            return out

        row_id = np.arange(r_pad, dtype=np.int32)
        row_id[:self.real] = rows.row_id
        self.rows = RowParams(temperature=put(padded(rows.temperature, 0.0)),
                              top_k=put(padded(rows.top_k, 0)),
                              top_p=put(padded(rows.top_p, 1.0)),
                              max_new_tokens=put(padded(max_new, 0)), row_id=put(row_id))
        self.entries = engine._commit(el.Entries.init(
            self.num_entries, self.pages_per_slot, engine.config.hidden_size,
            engine.compute_dtype))
        self.state = engine._commit(el.init_slots(engine.config, self.dc,
                                                  self.rows.max_new_tokens,
                                                  stop.stop_rev.shape[1]))
        # Rows with max_new_tokens 0 are finished already; their prompt is still prefilled
        # (its log-probs may be wanted).
        self.pending = collections.deque(
            _Job(i, prompts[i], [i * n + j for j in range(n) if max_new[i * n + j] > 0])
            for i in range(count))
        self.prefilling: list[_Job] = []
        self.ready: collections.deque[int] = collections.deque()  # rows, in admission order
        self.row_entry = np.zeros((r_pad,), np.int32)
        self.waiting_rows: dict[int, int] = {}  # entry -> its rows not yet in a slot
        self.free_entries = list(range(self.num_entries - 1, -1, -1))
        self.prompt_lp = [np.zeros((len(x),), np.float32) for x in prompts] \
            if prompt_logprobs else None
        # Pages kept free for the running rows' next pages when admitting or prefilling.
        self.reserve = min(slots, (engine.num_pages - 1) // 8)
        self.top, self.running = engine._top(), 0
        self.counters = collections.Counter()

    def _protected(self):
        """Cached nodes matched by prompts whose first chunk has not run yet."""
        return [node for job in self.prefilling for node in job.hits]

    def _release_entries(self, done: list[int]) -> None:
        mask = np.zeros((self.num_entries,), bool)
        mask[done] = True
        self.e.pool, self.entries = el.release_entries(self.e.pool, self.entries,
                                                       jnp.asarray(mask))
        self.free_entries.extend(done)

    # ---- prefill ---------------------------------------------------------------------------

    def prefill(self) -> None:
        """Prefill calls until enough rows wait for a slot; one call only while slots decode
        (chunked prefill interleaved with decode segments)."""
        while (self.pending or self.prefilling) and len(self.ready) < self.high:
            if not self._prefill_once():
                if not (self.ready or self.running):
                    raise RuntimeError(
                        f"KV pool too small: {self.e.num_pages} pages of {self.e.page_size} "
                        f"tokens, {self.top} free; a prompt chunk of {self.chunk} tokens "
                        "does not fit")
                return
            if self.running:
                return

    def _prefill_once(self) -> bool:
        """One prefill call: the next chunk of up to `prompts_per_call` prompts (False if
        none could run: no prompt, entry or pages)."""
        e, p = self.e, self.e.page_size
        batch = self.prefilling[:self.prompts_per_call]
        while len(batch) < self.prompts_per_call and self.pending and self.free_entries:
            job = self.pending.popleft()
            if e.cache is not None:  # at least one token is left to prefill: its logits
                job.hits = e.cache.match(job.tokens, max_pages=(len(job.tokens) - 1) // p,
                                         need_logprobs=self.prompt_lp is not None and job.score)
            job.done = len(job.hits) * p
            if self.prompt_lp is not None and job.score:
                for j, node in enumerate(job.hits):
                    self.prompt_lp[job.prompt][j * p:(j + 1) * p] = node.logprobs
            job.entry = self.free_entries.pop()
            self.prefilling.append(job)
            batch.append(job)
        if not batch:
            return False
        pages = [-(-min(self.chunk, len(job.tokens) - job.done) // p) for job in batch]
        if self.top < sum(pages) + self.reserve and e.cache is not None:
            e._release(e.cache.evict(sum(pages) + self.reserve - self.top,
                                     keep=self._protected()))
            self.top = e._top()
        fits = 0  # the jobs that fit, in order (the others wait for pages)
        while fits < len(batch) and self.top >= sum(pages[:fits + 1]) + (
                self.reserve if self.running else 0):
            fits += 1
        if fits == 0:
            return False
        batch = batch[:fits]

        b, put = self.prompts_per_call, self.put
        tokens = np.full((b, self.chunk), self.pad_id, np.int32)
        entry = np.full((b,), self.num_entries, np.int32)  # padding rows: out of range
        start, count = np.zeros((b,), np.int32), np.zeros((b,), np.int32)
        final = np.zeros((b,), bool)
        reuse = np.zeros((b, self.pages_per_slot), np.int32)
        reuse_count = np.zeros((b,), np.int32)
        for i, job in enumerate(batch):
            c = min(self.chunk, len(job.tokens) - job.done)
            tokens[i, :c] = job.tokens[job.done:job.done + c]
            entry[i], start[i], count[i] = job.entry, job.done, c
            final[i] = job.done + c == len(job.tokens)
            if job.hits:
                reuse[i, :len(job.hits)] = [node.page for node in job.hits]
                reuse_count[i] = len(job.hits)
                self.counters["reused_tokens"] += len(job.hits) * p
        e.pool, self.entries, lp = el.prefill(
            e.graphdef, self.params, e.pool, self.entries, put(tokens), put(entry), put(start),
            put(count), put(final), put(reuse), put(reuse_count), config=self.pc)
        self.counters["prefill_calls"] += 1
        self.counters["prefill_tokens"] += int(count.sum())
        lp = None if lp is None else np.asarray(to_host(lp))

        done = []
        for i, job in enumerate(batch):
            if lp is not None and job.score:
                self.prompt_lp[job.prompt][job.done:job.done + count[i]] = lp[i, :count[i]]
            job.done += int(count[i])
            job.hits = []
            if job.done == len(job.tokens):
                done.append(job)
        tables = np.asarray(to_host(self.entries.table)) \
            if done and e.cache is not None else None
        for job in done:  # its rows may take slots now
            self.prefilling.remove(job)
            if e.cache is not None:
                lps = self.prompt_lp[job.prompt] if self.prompt_lp is not None and job.score \
                    else None
                full = len(job.tokens) // p
                e._retain(e.cache.insert(job.tokens, tables[job.entry, :full], lps))
            self.row_entry[job.rows] = job.entry
            self.ready.extend(job.rows)
            self.waiting_rows[job.entry] = len(job.rows)
        empty = [job.entry for job in done if not job.rows]
        for entry_id in empty:
            del self.waiting_rows[entry_id]
        if empty:
            self._release_entries(empty)
        self.top = e._top()
        return True

    # ---- decode ----------------------------------------------------------------------------

    def decode(self) -> None:
        """One decode segment over the rows that wait now, then its bookkeeping."""
        e, put = self.e, self.put
        queued = list(self.ready)[:self.dc.rows]
        queue = np.zeros((self.dc.rows,), np.int32)
        queue[:len(queued)] = queued
        more = bool(self.pending or self.prefilling)
        # Pause for more rows before the queue runs dry; come back after a few steps when a
        # long prompt is half prefilled or no more rows could be queued.
        low_water = self.low if more and len(queued) > self.low else 0
        max_steps = e.interleave_steps if (self.prefilling or (more and not low_water)) \
            else _FOREVER
        e.pool, self.state = el.decode(
            e.graphdef, self.params, e.pool, self.entries, self.state, self.rows,
            put(self.row_entry), put(queue), put(np.int32(len(queued))), self.stop, self.seed,
            put(np.int32(low_water)), put(np.int32(max_steps)), put(np.int32(self.reserve)),
            config=self.dc)
        self.counters["segments"] += 1
        status, head, top, slot_rows, generated = to_host(
            (self.state.status, self.state.head, e.pool.alloc.top, self.state.row,
             self.state.generated))
        self.top, self.running = int(top), int((slot_rows >= 0).sum())
        done = []  # entries whose rows all took a slot: their reference can go
        for _ in range(int(head)):
            entry_id = int(self.row_entry[self.ready.popleft()])
            self.waiting_rows[entry_id] -= 1
            if self.waiting_rows[entry_id] == 0:
                del self.waiting_rows[entry_id]
                done.append(entry_id)
        if done:
            self._release_entries(done)
            self.top = e._top()
        if status == el.Status.PAGES:
            self._out_of_pages(slot_rows, generated)

    def _out_of_pages(self, slot_rows, generated) -> None:
        """Frees pages: cached prefixes first, then the youngest running row (it reruns later
        from the start, with the same tokens), then the admission reserve."""
        e = self.e
        freed = e.cache.evict(max(self.slots, len(e.cache) // 8), keep=self._protected()) \
            if e.cache is not None else []
        if freed:
            e._release(freed)
        elif self.running:
            victim = int(np.argmin(np.where(slot_rows >= 0, generated, _FOREVER)))
            r = int(slot_rows[victim])
            mask = np.zeros((self.slots,), bool)
            mask[victim] = True
            e.pool, self.state = el.preempt(e.pool, self.state, jnp.asarray(mask),
                                            pad_id=self.pad_id)
            self.pending.appendleft(_Job(r // self.n, self.prompts[r // self.n], [r],
                                         score=False))
            self.counters["preemptions"] += 1
        elif self.reserve:
            self.reserve = 0
        else:
            raise RuntimeError(f"KV pool too small: {e.num_pages} pages of {e.page_size} "
                               f"tokens; {self.top} free and no row can start")
        self.top = e._top()

    def finish(self):
        """(outputs on the host, prompt log-probs or None); sets the engine's `last_stats`."""
        st = self.state
        out, steps, busy, peak_pages, peak_live = to_host(
            (st.out, st.steps, st.busy, st.peak_pages, st.peak_live))
        out = jax.tree.map(lambda x: np.asarray(x)[:self.real], out)
        c = self.counters
        self.e.last_stats = EngineStats(
            slots=self.slots, rows=self.real, generated_tokens=int(out.lengths.sum()),
            decode_steps=int(steps), busy_slot_steps=int(busy), segments=c["segments"],
            prefill_calls=c["prefill_calls"], prefill_tokens=c["prefill_tokens"],
            reused_tokens=c["reused_tokens"], preemptions=c["preemptions"],
            page_size=self.e.page_size, bytes_per_token=self.e.bytes_per_token,
            peak_pages=int(peak_pages), peak_live_tokens=int(peak_live))
        lp = None if self.prompt_lp is None else [x[1:] for x in self.prompt_lp]
        return out, lp
