"""The OPERA reward: perplexity dynamics of the reference answer (docs/METHOD.md §1–2).

    from opera_jax.reward import RewardConfig, score_texts
    out = score_texts(model, tokenizer, prompts, responses, references, group_ids)
    out.reward, out.rank_score, out.reflection_score, out.lp_segments

Modules: config (RewardConfig, enums) · segments (think block, paragraphs, keywords, character
→ token cuts) · contexts (the K + 2 contexts as token cuts) · kernel (one jitted LP computation
for all contexts) · naive (one forward per context, the reference) · scores (rank, reflection,
math) · opera (entry points).
"""

from opera_jax.reward.config import (DEFAULT_KEYWORDS, KeywordMatch, LPImpl, MathMatch,
                                     RewardConfig, Scorer, TaskType)
from opera_jax.reward.contexts import Context, plan_contexts
from opera_jax.reward.kernel import reference_logprobs
from opera_jax.reward.naive import naive_reference_logprobs
from opera_jax.reward.opera import RewardResult, score_texts, score_token_ids
from opera_jax.reward.scores import (last_boxed, math_reward, published_math_reward,
                                     rank_scores, reflection_count, reflection_score)
from opera_jax.reward.segments import (Segment, ThinkBlock, decode_with_offsets, has_keyword,
                                       parse_think_block, tokens_before)

__all__ = [
    "DEFAULT_KEYWORDS", "Context", "KeywordMatch", "LPImpl", "MathMatch", "RewardConfig",
    "RewardResult", "Scorer", "Segment", "TaskType", "ThinkBlock", "decode_with_offsets",
    "has_keyword", "last_boxed", "math_reward", "naive_reference_logprobs", "parse_think_block",
    "plan_contexts", "published_math_reward", "rank_scores", "reference_logprobs",
    "reflection_count", "reflection_score", "score_texts", "score_token_ids", "tokens_before",
]
