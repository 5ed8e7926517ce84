"""Grain input pipelines: deterministic shuffling, per-host sharding, a checkpointable position.

    records ─► shuffle(seed), reshuffled each epoch ─► repeat ─► this host's stride
            ─► map(tokenize) ─► prefetch threads ─► pack / pad ─► batch

The global order depends only on (records, seed): every epoch is a new seeded permutation of all
records, and host i of n takes elements i, i + n, i + 2n, … of that stream, so the hosts see
disjoint rows and together cover every row once per epoch.

`iterator.get_state()` / `set_state(state)` is the position (a small JSON-able dict, one per
host); `opera_jax.checkpoint` saves it next to the model so a resumed run continues with the
exact next batch.

Rows a tokeniser drops (too long) are counted, not warned about one by one: the first few are
named, then one summary per pass. A whole pass over the rows that yields nothing is an error
(`EmptyDataError`) naming the source, the filter and the numbers, instead of an endless wait.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import grain
import jax
import numpy as np

from opera_jax import tokenizer as tk
from opera_jax.enums import coerce
from opera_jax.data.packing import TokenizeSFT, batch_examples
from opera_jax.data.schema import PROMPT_FIELDS
from opera_jax.reward.config import TaskType

log = logging.getLogger(__name__)

# Named one by one before the counting takes over.
_NAMED_DROPS = 3


class EmptyDataError(ValueError):
    """Every row of a source was filtered out: training would wait for ever."""


class CountDrops:
    """Wraps a row -> example-or-None map: counts the dropped rows, names the first few, logs
    one summary per pass, and raises `EmptyDataError` once `total` rows in a row were dropped
    (a whole pass without a usable row).

    Args:
      fn: the map; returns None for a row it drops.
      total: rows in one pass (this host's share of the source).
      source: the data spec, for messages.
      reason: why `fn` drops a row, e.g. "longer than seq_len=256 tokens".
    """

    def __init__(self, fn: Callable[[dict], dict | None], *, total: int, source: str,
                 reason: str):
        self.fn, self.total, self.source, self.reason = fn, max(int(total), 1), source, reason
        self._lock = threading.Lock()
        self._seen = self._dropped = self._run = 0

    def __call__(self, row: dict) -> dict | None:
        example = self.fn(row)
        with self._lock:
            self._seen += 1
            if example is None:
                self._dropped += 1
                self._run += 1
                if self._dropped <= _NAMED_DROPS:
                    log.warning("%s: row %s dropped: %s", self.source,
                                row.get("_source", row.get("id", "?")), self.reason)
            else:
                self._run = 0
            if self._run >= self.total:
                raise EmptyDataError(f"all {self.total} rows of {self.source} were dropped: "
                                     f"{self.reason}")
            if self._seen % self.total == 0 and self._dropped:
                log.warning("%s: %d of %d rows dropped in pass %d (%s)", self.source,
                            self._dropped, self.total, self._seen // self.total, self.reason)
                self._dropped = 0
        return example


def tokenized(ds: grain.MapDataset, tokenize: Callable[[dict], dict | None], *, rows: int,
              source: str, reason: str, num_threads: int) -> grain.IterDataset:
    """Rows → examples on `num_threads` threads ahead of the loop; the rows `tokenize` drops
    (returns None for) are counted by `CountDrops`, which fails a pass that yields nothing."""
    guard = CountDrops(tokenize, total=rows, source=source, reason=reason)
    ds = ds.map(guard).filter(lambda ex: ex is not None)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1) * 8)
    return ds.to_iter_dataset(read)


def shuffled_source(records: Sequence, *, seed: int, shuffle: bool = True,
                    num_epochs: int | None = None, process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
    """This host's stream of records: seeded per-epoch shuffle, repeat, host stride.

    Args:
      records: random-access rows (a list of dicts, or any Grain data source).
      seed: shuffle seed (0 <= seed < 2**32); each epoch folds in the epoch number.
      shuffle: False keeps file order (e.g. for evaluation).
      num_epochs: passes over the data; None repeats forever.
      process_index / process_count: this host and the number of hosts; default to
        `jax.process_index()` / `jax.process_count()`.

    Returns:
      A MapDataset of this host's rows (length `sys.maxsize // n` when repeating forever).
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not in [0, {count})")
    ds = grain.MapDataset.source(records)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)  # reseeds the shuffle every epoch
    return ds[index::count]


def sft_batches(records: Sequence[dict], tokenizer, *, eos_id: int, pad_id: int, seq_len: int,
                global_batch_size: int, seed: int, packing: bool = True,
                overlong: str = "drop", enable_thinking: bool = True,
                num_epochs: int | None = None, num_threads: int = 2,
                process_index: int | None = None, process_count: int | None = None,
                source: str = "the SFT data",
                special_tokens_in_text: bool = False) -> grain.IterDataset:
    """This host's SFT batches: dicts of int32 [B / hosts, T] numpy arrays.

    Args:
      records: validated SFT rows (`prompt`, `thinking`, `output`; see data.jsonl).
      tokenizer: the model's tokenizer (chat template included).
      eos_id / pad_id: appended after each response / written on padding.
      seq_len: T.
      global_batch_size: B over all hosts; must be divisible by the number of hosts.
      seed: shuffle seed.
      packing: first-fit pack several examples per row, or one example per row.
      overlong: what an example longer than T does (`Overlong`).
      enable_thinking: passed to the chat template.
      num_epochs: None = forever.
      num_threads: threads that tokenise ahead of the training loop (0 = inline).
      process_index / process_count: see `shuffled_source`.
      source: the data spec, for messages.

    Returns:
      An IterDataset; `iter(ds)` gives a DatasetIterator with get_state / set_state. Keys:
      tokens, segment_ids, positions, loss_mask (see data.packing).
    """
    count = jax.process_count() if process_count is None else process_count
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                         f"{count} hosts")
    ds = shuffled_source(records, seed=seed, num_epochs=num_epochs,
                         process_index=process_index, process_count=count)
    tokenize = TokenizeSFT(tokenizer, eos_id=eos_id, seq_len=seq_len, overlong=overlong,
                           enable_thinking=enable_thinking,
                           special_tokens_in_text=special_tokens_in_text)
    ds = tokenized(ds, tokenize, rows=-(-len(records) // count), source=source,
                   reason=f"longer than seq_len={seq_len} tokens (overlong={overlong})",
                   num_threads=num_threads)
    return batch_examples(ds, seq_len=seq_len, batch_size=global_batch_size // count,
                          pad_id=pad_id, packing=packing)


class TokenizePrompt:
    """Prompt row (`prompt`, `reference`, optional `task_type`, `id`, `system`) → token ids.

    The prompt gets the chat template with the generation prompt (thinking on by default; the
    row's system message first when it has one), as the policy sees it; the reference is
    tokenised on its own. Both are data: special-token
    strings in them are plain text unless `special_tokens_in_text` (tokenizer.encode_prompt).
    Prompts longer than `max_prompt_len` tokens give None (dropped; `prompt_batches` counts
    them). The output keeps the row itself under "row" (user reward terms read it).
    """

    def __init__(self, tokenizer, *, max_prompt_len: int, enable_thinking: bool = True,
                 special_tokens_in_text: bool = False):
        self.tokenizer, self.max_prompt_len = tokenizer, max_prompt_len
        self.enable_thinking = enable_thinking
        self.special = special_tokens_in_text

    def __call__(self, row: dict) -> dict | None:
        ids = tk.encode_prompt(self.tokenizer, row["prompt"], enable_thinking=self.enable_thinking,
                               system=row.get("system"), special_tokens_in_text=self.special)
        if len(ids) > self.max_prompt_len:
            return None
        reference = (tk.encode(self.tokenizer, row["reference"]) if self.special
                     else tk.encode_text(self.tokenizer, row["reference"]))
        return {"id": str(row.get("id", "")), "prompt": row["prompt"], "row": row,
                "prompt_ids": np.asarray(ids, np.int32),
                "reference_ids": np.asarray(reference, np.int32),
                "task_type": coerce(TaskType, row.get("task_type", "writing"),
                                    f"{row.get('_source', 'row ' + str(row.get('id')))}: "
                                    f"task_type").value}


def prompt_batches(records: Sequence[dict], tokenizer, *, batch_size: int, seed: int,
                   max_prompt_len: int, enable_thinking: bool = True, shuffle: bool = True,
                   num_epochs: int | None = None, num_threads: int = 2,
                   per_host: bool = True, source: str = "the prompt data",
                   special_tokens_in_text: bool = False) -> grain.IterDataset:
    """This host's prompt batches: lists of `TokenizePrompt` dicts, `batch_size / hosts` each;
    with `per_host=False` every host reads the same global batches of `batch_size` (GRPO's
    host-side sampling and reward work on the whole batch in every process).

    Uses the SFT pipeline's seeded, per-epoch reshuffled, host-strided source, so the
    iterator's position checkpoints the same way.
    """
    count = jax.process_count() if per_host else 1
    if batch_size % count:
        raise ValueError(f"{batch_size} prompts per step are not divisible by {count} hosts")
    ds = shuffled_source(records, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                         **({} if per_host else dict(process_index=0, process_count=1)))
    tokenize = TokenizePrompt(tokenizer, max_prompt_len=max_prompt_len,
                              enable_thinking=enable_thinking,
                              special_tokens_in_text=special_tokens_in_text)
    ds = tokenized(ds, tokenize, rows=-(-len(records) // count), source=source,
                   reason=f"longer than max_prompt_len={max_prompt_len} tokens",
                   num_threads=num_threads)
    return ds.batch(batch_size // count, batch_fn=list)
