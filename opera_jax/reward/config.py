"""Frozen config of the OPERA reward (docs/METHOD.md §1–2).

Defaults are the published settings, except `keyword_match` (whole words; `SUBSTRING`
reproduces the published test). Enum fields also accept their string values, so an
ml_collections config can hold plain strings:

    RewardConfig(keyword_match="substring", scorer="reference")
"""

from __future__ import annotations

import dataclasses
import enum
import math

from opera_jax.enums import coerce

# Published reflection keywords, matched case-insensitively (the reward's reflection term).
DEFAULT_KEYWORDS = ("But", "Wait", "Hmm", "However", "Wait a minute")
# Published guiding words: where cold-start synthesis stops to branch (docs/METHOD.md §4, step 2).
GUIDING_WORDS = ("Wait", "But", "Hmm", "Let me think", "However")


class KeywordMatch(str, enum.Enum):
    """How a reflection keyword is found in a segment's text (case-insensitive either way)."""

    WORD = "word"  # whole words: "but" does not fire inside "attribute"
    SUBSTRING = "substring"  # published: plain substring test


class Scorer(str, enum.Enum):
    """Which weights compute LP."""

    POLICY = "policy"  # published: the actor being trained (the rollout's weights)
    REFERENCE = "reference"  # a frozen model (the SFT checkpoint)


class LPImpl(str, enum.Enum):
    """How LP is computed; both give the same values up to float rounding."""

    KERNEL = "kernel"  # one prefill + short reference passes (kernel.py)
    NAIVE = "naive"  # one full forward pass per context (naive.py), for checks


class MathMatch(str, enum.Enum):
    """How a `math` response's answer is compared with the reference."""

    EXACT = "exact"          # the last balanced \\boxed{…} outside the think block (scores.py)
    PUBLISHED = "published"  # the published regex, reproduced exactly (docs/METHOD.md §2.5)
    MATH_VERIFY = "math_verify"  # math-verify's parse + verify of the answer part (if installed)


class Term(str, enum.Enum):
    """A built-in reward term (reward/terms.py); `python:module:function` names a user one."""

    OPERA = "opera"        # the OPERA reward (§2, with the math path of `math` rows)
    MATH = "math"          # every row: 1 when the answer matches the reference (math_match)
    OVERLONG = "overlong"  # DAPO's soft overlong punishment, in [−1, 0]
    FORMAT = "format"      # 1 when the think block is opened and closed exactly once


PYTHON_TERM = "python:"


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """One weighted term of `RewardConfig.terms`: "name" or "name=weight"."""

    name: str                  # a `Term` value, or "python:module.path:function"
    weight: float = 1.0

    @property
    def key(self) -> str:
        """Its metric name, `reward/<key>`: the term, or the python function's name."""
        return self.name.rsplit(":", 1)[1] if self.name.startswith(PYTHON_TERM) else self.name

    @classmethod
    def parse(cls, spec: str) -> "TermSpec":
        """"opera", "format=0.2", "python:my.rewards:brevity=0.5" → TermSpec (ValueError
        naming the entry)."""
        name, weight = spec.strip(), 1.0
        if "=" in name:
            name, _, value = name.rpartition("=")
            try:
                weight = float(value)
            except ValueError:
                raise ValueError(f"reward.terms entry {spec!r}: weight {value!r} is not a "
                                 f"number") from None
            if not math.isfinite(weight):
                raise ValueError(f"reward.terms entry {spec!r}: weight must be finite")
        if name.startswith(PYTHON_TERM):
            module, _, function = name[len(PYTHON_TERM):].rpartition(":")
            if not module or not function.isidentifier():
                raise ValueError(f"reward.terms entry {spec!r}: expected "
                                 f"python:module.path:function")
        else:
            coerce(Term, name, f"reward.terms entry {spec!r}: the term")
        return cls(name, weight)


class TaskType(str, enum.Enum):
    """Per-sample reward path."""

    WRITING = "writing"  # perplexity-dynamics reward
    MATH = "math"  # exact match of the last \\boxed{} outside the think block


# reward/<name> metrics that are not terms (rollout/stats.py) and must not be shadowed.
RESERVED_METRICS = frozenset({"mean", "std", "rank", "reflection", "reflection_count",
                              "math_acc", "adv_nonzero_frac"})


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Settings of the OPERA reward.

    Attributes:
      rank_weight: weight of the group rank term (published 0.3; 0 = reflection-only ablation).
      reflection_weight: weight of tanh(count / 2) (published 0.7; 0 = rank-only ablation).
      keywords: reflection keywords; a keyword with spaces ("Wait a minute") matches any
        whitespace run between its words in `WORD` mode, the exact string in `SUBSTRING` mode.
      keyword_match: `KeywordMatch`.
      max_segments: cap on segments per response, or None (published: no cap). Past the cap
        the paragraphs are not dropped: paragraphs max_segments .. K are merged into the last
        segment, which ends where the last paragraph ends (at "</think>") and contains a keyword
        if any of the merged paragraphs does. So c_full, c_0 and the end of the think block are
        always scored, and a response costs at most max_segments + 2 contexts.
      group_size: expected number of responses per group, checked when set; None accepts
        any group size (a group of one gets rank_score 1.0).
      scorer: `Scorer`; with REFERENCE the entry points need `reference_model=`.
      math_match: `MathMatch` of the `math` rows.
      distinct_reflections: a deviation from the method, off (None) by default: a reflective
        paragraph counts only if its content words (keywords set aside) overlap no earlier
        paragraph's by this Jaccard share or more — a restated paragraph earns nothing
        (docs/METHOD.md §6).
      terms: the reward is Σ weight · term over these "name[=weight]" entries (`TermSpec`;
        reward/terms.py): opera (default: the reward above, alone), math, overlong, format,
        python:module:function. Each term is logged as reward/<name>.
      overlong_cache: L_cache of the overlong term: 0 up to L_max − L_cache response tokens,
        then linear down to −1 at L_max (the response limit); None = L_max // 5 (DAPO's
        4,096 of 20,480).
      lp_impl: `LPImpl`: the kernel, or the naive path (checks; and on GPU while the model runs
        cached attention on XLA, see benchmarks/RESULTS.md).
      temperature: LP is computed from softmax(logits / temperature) (published 1.0).
      batch_size: responses per kernel call (one prefill of prompt + response for this many
        rows); contexts per forward call on the naive path.
      contexts_per_step: reference passes run side by side in one step of the kernel's loop.
      cache_windows: number of static key-window sizes (~P/n, 2P/n, … P) a reference pass can
        attend to; contexts are sorted by length and each step uses the smallest window that
        holds its contexts (more windows: less attention to hidden slots, more compile time).
      prefill_chunk: the prompt + response pass is run in chunks of this many tokens (bounds
        the attention scores held at once).
      logprob_chunk: positions per chunk of the float32 log-softmax.
      min_bucket: smallest padded token length; lengths are padded up to buckets so new
        lengths rarely recompile.
      buckets_per_octave: how finely lengths and counts are bucketed (a power of two): 16
        pads little, 2 compiles few shapes (RL, where lengths change every step).
    """

    rank_weight: float = 0.3
    reflection_weight: float = 0.7
    keywords: tuple[str, ...] = DEFAULT_KEYWORDS
    keyword_match: KeywordMatch = KeywordMatch.WORD
    max_segments: int | None = None
    group_size: int | None = None
    scorer: Scorer = Scorer.POLICY
    math_match: MathMatch = MathMatch.EXACT
    distinct_reflections: float | None = None
    terms: tuple[str, ...] = ("opera",)
    overlong_cache: int | None = None
    lp_impl: LPImpl = LPImpl.KERNEL
    temperature: float = 1.0
    batch_size: int = 8
    contexts_per_step: int = 16
    cache_windows: int = 4
    prefill_chunk: int = 1024
    logprob_chunk: int = 512
    min_bucket: int = 64
    buckets_per_octave: int = 16

    def __post_init__(self):
        # Frozen: coerce through object.__setattr__ so string values become enums / tuples.
        for name, cls in (("keyword_match", KeywordMatch), ("scorer", Scorer),
                          ("math_match", MathMatch), ("lp_impl", LPImpl)):
            object.__setattr__(self, name, coerce(cls, getattr(self, name), f"reward.{name}"))
        object.__setattr__(self, "keywords", tuple(self.keywords))
        object.__setattr__(self, "terms", tuple(self.terms))
        for name in ("rank_weight", "reflection_weight", "temperature"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"RewardConfig.{name} must be finite, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"RewardConfig.temperature must be > 0, got {self.temperature}")
        if not self.keywords or not all(isinstance(k, str) and k.strip() for k in self.keywords):
            raise ValueError(
                f"RewardConfig.keywords must be non-empty strings, got {self.keywords}")
        terms = [TermSpec.parse(t) for t in self.terms]
        keys = [t.key for t in terms]
        if not terms or len(set(keys)) != len(keys):
            raise ValueError(f"reward.terms must name each term once, got {self.terms}")
        if RESERVED_METRICS & set(keys):
            raise ValueError(f"reward.terms: a python term's function may not be named "
                             f"{sorted(RESERVED_METRICS & set(keys))[0]!r} (a reward metric)")
        if self.overlong_cache is not None and self.overlong_cache < 1:
            raise ValueError(f"reward.overlong_cache must be >= 1 or None, got "
                             f"{self.overlong_cache}")
        if self.distinct_reflections is not None and not 0 < self.distinct_reflections <= 1:
            raise ValueError(f"reward.distinct_reflections must be in (0, 1] or None, got "
                             f"{self.distinct_reflections}")
        if self.max_segments is not None and self.max_segments < 1:
            raise ValueError(f"RewardConfig.max_segments must be >= 1 or None, got "
                             f"{self.max_segments}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"RewardConfig.group_size must be >= 1 or None, got {self.group_size}")
        per = self.buckets_per_octave
        if per < 1 or per & (per - 1):
            raise ValueError(f"RewardConfig.buckets_per_octave must be a power of two, got {per}")
        for name in ("batch_size", "contexts_per_step", "cache_windows", "prefill_chunk",
                     "logprob_chunk", "min_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"RewardConfig.{name} must be >= 1, got {getattr(self, name)}")

    def replace(self, **changes) -> "RewardConfig":
        return dataclasses.replace(self, **changes)
