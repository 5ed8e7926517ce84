"""Grain input pipelines: deterministic shuffling, per-host sharding, a checkpointable position.

    records ─► shuffle(seed), reshuffled each epoch ─► repeat ─► this host's stride
            ─► map(tokenize) ─► prefetch threads ─► pack / pad ─► batch

The global order depends only on (records, seed): every epoch is a new seeded permutation of all
records, and host i of n takes elements i, i + n, i + 2n, … of that stream, so the hosts see
disjoint rows and together cover every row once per epoch.

`iterator.get_state()` / `set_state(state)` is the position (a small JSON-able dict, one per
host); `opera_jax.train.checkpoint` saves it next to the model so a resumed run continues with
the exact next batch.
"""

from __future__ import annotations

from typing import Sequence

import grain
import jax

from opera_jax.data.packing import Overlong, TokenizeSFT, batch_examples


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
                overlong: Overlong | str = Overlong.DROP, enable_thinking: bool = True,
                num_epochs: int | None = None, num_threads: int = 2,
                process_index: int | None = None,
                process_count: int | None = None) -> grain.IterDataset:
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
                           enable_thinking=enable_thinking)
    ds = ds.map(tokenize).filter(lambda ex: ex is not None)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(num_threads, 1) * 8)
    ds = ds.to_iter_dataset(read)
    return batch_examples(ds, seq_len=seq_len, batch_size=global_batch_size // count,
                          pad_id=pad_id, packing=packing)
