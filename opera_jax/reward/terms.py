"""The RL reward as a weighted sum of terms (`reward.terms`, docs/METHOD.md §5).

    reward = Σ weight · term,  e.g.  terms = ("opera", "format=0.2", "overlong")

  opera      the OPERA reward (score_token_ids: §2 for writing rows, the math check for math
             rows); the default, alone, so the default reward is unchanged
  math       every row, whatever its task_type: 1.0 when the answer part matches the reference
             under `reward.math_match` (exact | published | math_verify), else 0.0
  overlong   DAPO's soft overlong punishment of a response of L tokens, with L_max the
             response limit and L_c = `reward.overlong_cache`:
                 0                          L <= L_max − L_c
                 (L_max − L_c − L) / L_c    L_max − L_c < L <= L_max
                 −1                         L > L_max
  format     1.0 when the response holds exactly one "<think>" and then exactly one
             "</think>" (the think block opened and closed once), else 0.0
  python:module.path:function
             a user function `function(rows, responses) -> one float per response`: rows
             are the responses' data rows (dicts as read, schema-mapped: prompt, reference,
             task_type, extra_info, …), responses their decoded texts (special tokens such as
             the end of turn dropped, think tags kept). Imported once, when the run starts.

Every term's (unweighted) values are returned next to the sum; GRPO logs each term's batch
mean as `reward/<term>` (a python term under its function's name). Terms are pure functions
of the texts and rows, except opera, which runs the model and is skipped when not a term.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Hashable, Sequence

import numpy as np

from opera_jax.reward import scores
from opera_jax.reward.config import PYTHON_TERM, RewardConfig, Term, TermSpec
from opera_jax.reward.opera import RewardResult, score_token_ids
from opera_jax.tokenizer import THINK_CLOSE, THINK_OPEN


@dataclasses.dataclass(frozen=True)
class Scored:
    """A batch's reward and its terms.

    reward: float32 [R], Σ weight · term. terms: term key -> float32 [R], unweighted, in the
    order of `reward.terms`. opera: the opera term's parts (rank, reflection, LPs), or None
    when opera is not a term.
    """

    reward: np.ndarray
    terms: dict[str, np.ndarray]
    opera: RewardResult | None

    def take(self, idx) -> "Scored":
        """The scores of responses `idx` (int indices), in that order."""
        idx = np.asarray(idx, np.int64)
        return Scored(reward=self.reward[idx], terms={k: v[idx] for k, v in self.terms.items()},
                      opera=None if self.opera is None else self.opera.take(idx))

    @staticmethod
    def concat(items: Sequence["Scored"]) -> "Scored":
        """Scores of several batches, one after the other."""
        opera = [s.opera for s in items]
        return Scored(reward=np.concatenate([s.reward for s in items]),
                      terms={k: np.concatenate([s.terms[k] for s in items])
                             for k in items[0].terms},
                      opera=None if opera[0] is None else RewardResult.concat(opera))


def overlong_penalty(lengths, max_len: int, cache: int) -> np.ndarray:
    """DAPO's soft overlong punishment (module docstring) of responses of `lengths` tokens:
    float32 [R] in [−1, 0]."""
    if not 0 < cache <= max_len:
        raise ValueError(f"overlong cache {cache} must be in [1, {max_len}] (the response limit)")
    lengths = np.asarray(lengths, np.float64)
    start = max_len - cache
    out = np.where(lengths <= start, 0.0, (start - lengths) / cache)
    return np.where(lengths > max_len, -1.0, out).astype(np.float32)


def format_reward(response: str) -> float:
    """1.0 when `response` holds exactly one "<think>", then exactly one "</think>"."""
    opened, closed = response.count(THINK_OPEN), response.count(THINK_CLOSE)
    return float(opened == 1 and closed == 1
                 and response.index(THINK_OPEN) < response.index(THINK_CLOSE))


def load_function(name: str) -> Callable:
    """The function of a "python:module.path:function" term (ImportError / AttributeError
    naming the term)."""
    module, _, function = name[len(PYTHON_TERM):].rpartition(":")
    try:
        fn = getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise ImportError(f"reward term {name!r}: cannot import {module!r}: {e}") from None
    except AttributeError:
        raise AttributeError(f"reward term {name!r}: module {module!r} has no "
                             f"{function!r}") from None
    if not callable(fn):
        raise TypeError(f"reward term {name!r}: {module}.{function} is not callable")
    return fn


def _user_values(name: str, fn: Callable, rows: list[dict], texts: list[str]) -> np.ndarray:
    values = fn(rows, texts)
    try:
        out = np.asarray([float(v) for v in values], np.float32)
    except (TypeError, ValueError):
        raise TypeError(f"reward term {name!r} must return one float per response, got "
                        f"{type(values).__name__}") from None
    if out.shape != (len(texts),):
        raise ValueError(f"reward term {name!r} returned {out.shape[0]} values for "
                         f"{len(texts)} responses")
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        raise ValueError(f"reward term {name!r}: value {out[bad[0]]} for response {bad[0]}")
    return out


class Terms:
    """The terms of a `RewardConfig`, user functions imported once.

    Args:
      config: the `reward` section (its group_size set by the loop).
    """

    def __init__(self, config: RewardConfig):
        self.config = config
        self.specs = tuple(TermSpec.parse(t) for t in config.terms)
        self.functions = {s.name: load_function(s.name) for s in self.specs
                          if s.name.startswith(PYTHON_TERM)}

    @property
    def has_opera(self) -> bool:
        return any(s.name == Term.OPERA.value for s in self.specs)

    def score(self, model, tokenizer, *, prompt_ids: Sequence[Sequence[int]],
              response_ids: Sequence[Sequence[int]], reference_ids: Sequence[Sequence[int]],
              group_ids: Sequence[Hashable], task_types: Sequence[str], rows: Sequence[dict],
              max_len: int, reference_model=None) -> Scored:
        """Every term of R responses and their weighted sum.

        Args:
          model, tokenizer, prompt_ids, response_ids, reference_ids, group_ids, task_types,
            reference_model: as `score_token_ids` (used by opera only).
          rows: per response, its data row (math: `reference`; python terms: all of it).
          max_len: L_max, the response limit in tokens (overlong).
        Returns:
          `Scored`.
        """
        texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in response_ids]
        opera = None
        values: dict[str, np.ndarray] = {}
        for spec in self.specs:
            if spec.name == Term.OPERA.value:
                opera = score_token_ids(model, tokenizer, prompt_ids, response_ids,
                                        reference_ids, group_ids, task_types,
                                        config=self.config, reference_model=reference_model)
                values[spec.key] = opera.reward
            elif spec.name == Term.MATH.value:
                check = scores.math_check(self.config.math_match)
                values[spec.key] = np.asarray([check(t, r["reference"])
                                               for t, r in zip(texts, rows)], np.float32)
            elif spec.name == Term.OVERLONG.value:
                cache = self.config.overlong_cache or max(max_len // 5, 1)
                values[spec.key] = overlong_penalty([len(x) for x in response_ids], max_len,
                                                    min(cache, max_len))
            elif spec.name == Term.FORMAT.value:
                values[spec.key] = np.asarray([format_reward(t) for t in texts], np.float32)
            else:
                values[spec.key] = _user_values(spec.name, self.functions[spec.name],
                                                list(rows), texts)
        reward = np.zeros((len(texts),), np.float32)  # 0 + 1 · r = r: the default is opera
        for spec in self.specs:
            reward += np.float32(spec.weight) * values[spec.key]
        return Scored(reward=reward, terms=values, opera=opera)

