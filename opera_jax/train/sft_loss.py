"""The SFT loss: token-mean negative log-likelihood of the response tokens.

Kept: next-token NLL on every response token (thinking, answer and the closing `<|im_end|>`),
averaged over all such tokens of the global batch — a long example weighs more than a short
one, and packing does not change the value. Dropped: prompt tokens, padding, and any target
whose input token belongs to another packed example (the first token of each example is a
prompt token anyway; the check makes the mask correct on its own).

Log-probs come from `model.logprobs`, chunked and in float32 (bf16 log-softmax over a 150k vocab
loses ~2 digits); the [B, T, V] float32 logits are never built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_weights(batch: dict) -> jax.Array:
    """1.0 where token t+1 is a response token predicted from token t of the same example.

    Args:
      batch: tokens, segment_ids, loss_mask, each int [B, T].
    Returns:
      float32 [B, T-1]; entry t weighs the prediction of token t+1.
    """
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return (same & (batch["loss_mask"][:, 1:] > 0)).astype(jnp.float32)


def nll_sum(model, batch: dict, *, chunk_size: int = 512) -> tuple[jax.Array, jax.Array]:
    """Sum of response-token NLL and the number of response tokens.

    Args:
      model: a Qwen3 (merged inside the jitted step).
      batch: tokens, segment_ids, positions, loss_mask, each int32 [B, T].
      chunk_size: positions per log-prob chunk.
    Returns:
      (nll_sum float32 [], n_tokens float32 []).
    """
    tokens = batch["tokens"]
    hidden = model(tokens, segment_ids=batch["segment_ids"], positions=batch["positions"],
                   return_hidden=True)  # [B, T, D]
    logp = model.logprobs(hidden[:, :-1], tokens[:, 1:], chunk_size=chunk_size)  # f32 [B, T-1]
    w = target_weights(batch)
    return -jnp.sum(logp * w), jnp.sum(w)


def token_mean_nll(model, batch: dict, *, chunk_size: int = 512) -> jax.Array:
    """The SFT loss of one batch: nll_sum / n_tokens (0 when the batch has no response token)."""
    total, count = nll_sum(model, batch, chunk_size=chunk_size)
    return total / jnp.maximum(count, 1.0)
