"""The published stack's synthesis, for benchmarks: the same procedure (opera_jax/synth/job.py,
one prompt and one candidate per call) with PyTorch `transformers` doing the sampling and the
scoring, as the published PyTorch system does.

`TransformersSampler` has the interface the synthesis `Scheduler` uses (`sample`, `table`,
`eos_ids`). Each call is one `generate` (KV cache, do_sample with the same temperature / top-k /
top-p, `stop_strings`, `output_logits` for the sampled tokens' temperature-1 log-probs) and,
when the caller asks for the context's log-probs (a candidate to score), one more forward pass
over context + candidate: the teacher scoring each candidate after sampling it. Randomness is
torch's, seeded from the row seeds, so the records are not token-for-token those of the JAX
sampler; the benchmark compares throughput at the same settings and reports the work done.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import transformers

from opera_jax.sampling import FinishReason, Samples
from opera_jax.sampling import stops as stops_lib


class TransformersSampler:
    """One prompt per call, `n` = 1 (the published procedure)."""

    def __init__(self, hf_dir: str, tokenizer, *, eos_ids: Sequence[int], pad_id: int):
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32).eval()
        self.tokenizer = tokenizer
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = int(pad_id)
        vocab = self.model.config.vocab_size
        pieces = stops_lib.token_bytes(tokenizer, vocab)
        self.table = stops_lib.TokenTable.build(pieces + [b""] * (vocab - len(pieces)))

    @staticmethod
    def _first_stop(data: bytes, stop: Sequence[str]) -> tuple[int, int, int] | None:
        """(stop index, start byte, end byte) of the stop string that ends first in `data`."""
        best = None
        for i, s in enumerate(stop):
            at = data.find(s.encode())
            if at >= 0:
                end = at + len(s.encode())
                if best is None or end < best[2]:
                    best = (i, at, end)
        return best

    @torch.no_grad()
    def sample(self, prompts, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=1,
               stop=(), seed=0, prompt_logprobs=False, row_seeds=None,
               compact=False) -> Samples:
        if len(prompts) != 1 or n != 1:
            raise ValueError("the published procedure samples one prompt, one row per call")
        context = list(prompts[0])
        cap = int(np.asarray(max_new_tokens).reshape(-1)[0])
        torch.manual_seed(int(row_seeds[0]) if row_seeds is not None else seed)
        ids = torch.tensor([context])
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=True,
            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
            max_new_tokens=cap, eos_token_id=list(self.eos_ids), pad_token_id=self.pad_id,
            stop_strings=list(stop) or None, tokenizer=self.tokenizer if stop else None,
            output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, len(context):].tolist()
        logits = torch.stack(out.logits, dim=1)[0].float()  # [new, V], raw
        lps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(new)[:, None])[:, 0]

        reason, hit = FinishReason.LENGTH, None
        if new and new[-1] in self.eos_ids:
            reason = FinishReason.EOS
        elif stop:
            hit = self._first_stop(self.table.detokenize(new), stop)
            if hit is not None:
                reason = FinishReason.STOP
        c = max(cap, 1)
        tokens = np.full((1, c), self.pad_id, np.int32)
        logprobs = np.zeros((1, c), np.float32)
        tokens[0, :len(new)] = new
        logprobs[0, :len(new)] = lps.numpy()
        context_lp = None
        if prompt_logprobs:  # the teacher scores the candidate: forward over context + it
            full = torch.tensor([context + new])
            lp = torch.log_softmax(self.model(full).logits[0].float(), -1)
            context_lp = [lp[:len(context) - 1].gather(
                -1, torch.tensor(context[1:])[:, None])[:, 0].numpy()]
        return Samples(tokens=tokens, logprobs=logprobs,
                       lengths=np.array([len(new)], np.int32),
                       finish_reason=np.array([int(reason)], np.int32),
                       stop_index=np.array([hit[0] if hit else -1], np.int32),
                       stop_start=np.array([hit[1] if hit else -1], np.int32),
                       stop_end=np.array([hit[2] if hit else -1], np.int32),
                       num_samples=1, prompt_logprobs=context_lp)
