"""The rollout-shaped workload shared by bench_engine_cpu.py and bench_engine_gpu.py.

`prompts` prompts × `n` samples (the published recipe: 64 × 16). Prompt lengths uniform in
[min_prompt, max_prompt). Response lengths: log-normal with median cap / 6 and 5 % of the rows
at the cap (sigma = ln 6 / 1.645), rounded and clipped to [1, cap]: a heavy tail, a few rows
run to the cap while most stop early (mean ~0.27 · cap). They are imposed as per-row
max_new_tokens with no EOS, so every sampler does exactly the same work per row; the engine
uses them only as each row's stopping point (it admits rows first come, first served, and a
row leaves its slot at its last token as it would at an EOS).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    n: int
    max_new: np.ndarray  # int32 [prompts · n], row r = prompt r // n
    cap: int

    @property
    def generated_tokens(self) -> int:
        return int(self.max_new.sum())


def rollout(*, prompts: int = 64, n: int = 16, cap: int = 512, min_prompt: int = 32,
            max_prompt: int = 128, vocab: int = 1000, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_prompt, max_prompt, size=prompts)
    toks = [rng.integers(0, vocab, size=int(m)).tolist() for m in lengths]
    sigma = np.log(6.0) / 1.645  # P(L >= cap) = 5 % with median cap / 6
    new = np.exp(np.log(cap / 6.0) + sigma * rng.normal(size=prompts * n))
    return Workload(prompts=toks, n=n, max_new=np.clip(np.round(new), 1, cap).astype(np.int32),
                    cap=cap)
