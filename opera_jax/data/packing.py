"""SFT rows → token ids with a loss mask, then fixed-shape [B, T] batches (packed or padded).

One example (Qwen3 chat template, thinking on):

    prompt   = apply_chat_template(prompt)          loss_mask 0
             = "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"
    response = "<think>\\n{thinking}\\n</think>\\n\\n{output}" + <|im_end|>   loss_mask 1

The two parts are encoded separately and concatenated, so the boundary is exact: the loss covers
everything after the generation prompt, the closing `<|im_end|>` included.

A batch is a dict of numpy arrays, all [B, T]:
  tokens       int32  token ids (pad id on padding)
  segment_ids  int32  1, 2, … per example within a row; 0 = padding
  positions    int32  position within the example (0 on padding)
  loss_mask    int32  1 on response tokens (the tokens to predict)

Packing is Grain's first-fit packer over B bins (checkpointable: its state is the parent's
position plus the rows already emitted). The model's `segment_ids` argument keeps packed examples
from attending to each other; the loss also drops targets that cross a segment boundary.
"""

from __future__ import annotations

import grain
import numpy as np

from opera_jax.config.sections import Overlong
from opera_jax.tokenizer import encode_prompt, encode_response

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


class TokenizeSFT:
    """Row dict (`prompt`, `thinking`, `output`, optional `system`) → {"tokens": int32 [L],
    "loss_mask": int32 [L]}, or None when dropped.

    Args:
      tokenizer: a `transformers` tokenizer with a Qwen3-style chat template.
      eos_id: the id appended after the output (`<|im_end|>` for Qwen3).
      seq_len: T, the row length; longer examples follow `overlong`.
      overlong: `Overlong.DROP` or `Overlong.TRUNCATE` (config.sections.Overlong).
      enable_thinking: passed to the chat template.
      special_tokens_in_text: encode special-token strings inside prompt, thinking and output
        as control tokens (default: plain text; tokenizer.encode_text).
    """

    def __init__(self, tokenizer, *, eos_id: int, seq_len: int,
                 overlong: Overlong | str = Overlong.DROP, enable_thinking: bool = True,
                 special_tokens_in_text: bool = False):
        self.tokenizer, self.eos_id, self.seq_len = tokenizer, int(eos_id), int(seq_len)
        self.overlong = Overlong(overlong)
        self.enable_thinking = enable_thinking
        self.special = special_tokens_in_text

    def __call__(self, row: dict) -> dict | None:
        prompt = encode_prompt(self.tokenizer, row["prompt"], enable_thinking=self.enable_thinking,
                               system=row.get("system"), special_tokens_in_text=self.special)
        response = encode_response(self.tokenizer, row["thinking"], row["output"],
                                   special_tokens_in_text=self.special)
        response.append(self.eos_id)
        tokens = np.asarray(prompt + response, np.int32)
        loss_mask = np.concatenate([np.zeros(len(prompt), np.int32),
                                    np.ones(len(response), np.int32)])
        if len(tokens) > self.seq_len:  # dropped rows are counted by pipeline.CountDrops
            if not (self.overlong is Overlong.TRUNCATE and len(prompt) < self.seq_len):
                return None
            tokens, loss_mask = tokens[:self.seq_len], loss_mask[:self.seq_len]
        return {"tokens": tokens, "loss_mask": loss_mask}


def pad_example(example: dict, *, seq_len: int, pad_id: int) -> dict:
    """One example alone in a row of length T (the unpacked layout).

    Args:
      example: {"tokens": int [L], "loss_mask": int [L]} with L <= T.
    Returns:
      {"tokens", "segment_ids", "positions", "loss_mask"}, each int32 [T].
    """
    n = len(example["tokens"])
    row = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS}
    row["tokens"][:] = pad_id
    row["tokens"][:n] = example["tokens"]
    row["loss_mask"][:n] = example["loss_mask"]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    return row


def _rename_packed(row: dict) -> dict:
    return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
            "positions": row["tokens_positions"], "loss_mask": row["loss_mask"]}


def batch_examples(ds: grain.IterDataset, *, seq_len: int, batch_size: int, pad_id: int,
                   packing: bool = True) -> grain.IterDataset:
    """Examples → batches of [B, T] arrays (see the module docstring for the keys).

    Args:
      ds: IterDataset of {"tokens": int [L], "loss_mask": int [L]} with L <= T.
      seq_len: T.
      batch_size: B, rows per batch (this host's share of the global batch).
      pad_id: token id written on padding (masked out everywhere; any id works).
      packing: first-fit pack several examples per row (B bins at a time), or one per row.
    Returns:
      IterDataset of dicts of int32 [B, T] numpy arrays; incomplete final batches are dropped.
    """
    if packing:
        ds = grain.experimental.FirstFitPackIterDataset(
            ds, length_struct={"tokens": seq_len, "loss_mask": seq_len},
            num_packing_bins=batch_size, shuffle_bins=False,
            padding_struct={"tokens": pad_id, "loss_mask": 0})
        ds = ds.map(_rename_packed)
    else:
        ds = ds.map(lambda ex: pad_example(ex, seq_len=seq_len, pad_id=pad_id))
    return ds.batch(batch_size, drop_remainder=True)
