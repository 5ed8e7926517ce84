"""Evaluation on held-out prompts: intrinsic metrics, what the reward cannot see, and the
ground truth where the prompts have one (`evaluate`); the report files (`report`)."""

from opera_jax.evaluation.evaluate import (TRUTH_KEYS, compare, evaluate_model, load_prompts,
                                           summarize, verdict)

__all__ = ["TRUTH_KEYS", "compare", "evaluate_model", "load_prompts", "summarize", "verdict"]
