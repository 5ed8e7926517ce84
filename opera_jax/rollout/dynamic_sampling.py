"""DAPO's dynamic sampling: a step's batch made only of groups whose rewards differ.

A group whose G responses all get the same reward has zero advantage: it adds nothing to the
policy gradient and dilutes the token mean. DAPO drops such groups and samples further prompts
until the batch is full again; `collect_batch` does that around the loop's rollout-and-score
function (train/grpo.py), keeping the batch's shape so the update compiles once.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from opera_jax.reward.terms import Scored
from opera_jax.rollout.batch import Rollout, concat, group_rows


def informative_groups(rewards: np.ndarray, group_ids: np.ndarray) -> list[int]:
    """The groups whose rewards are not all equal (they have a nonzero advantage), in order."""
    return [int(g) for g in dict.fromkeys(group_ids.tolist())
            if np.ptp(rewards[group_ids == g]) > 0]


def collect_batch(sample_and_score: Callable[[list[dict], int], tuple[Rollout, Scored]],
                  batches: Iterator[list[dict]], *, num_prompts: int, dynamic: bool,
                  max_rounds: int) -> tuple[Rollout, Scored, dict[str, float]]:
    """This step's rollout and its scores.

    Without `dynamic`, one rollout of the next prompt batch. With it (DAPO's dynamic
    sampling), groups whose rewards are all equal are dropped and further prompt batches are
    rolled out until `num_prompts` groups with a spread are gathered or `max_rounds`
    rollouts ran; a batch still short is filled with equal-reward groups (in order; their
    advantage is 0), so the update keeps its shape, and `sampling/filled_groups` says how many.

    Args:
      sample_and_score: (prompt rows, round) -> (Rollout, Scored) of those prompts.
      batches: the prompt batches (`num_prompts` rows each).
    Returns:
      (rollout, scored, metrics): `num_prompts` groups; metrics are sampling/* (dynamic only).
    """
    ro, scored = sample_and_score(next(batches), 0)
    if not dynamic:
        return ro, scored, {}
    parts, kept = [(ro, scored)], len(informative_groups(scored.reward, ro.group_ids))
    while kept < num_prompts and len(parts) < max_rounds:
        parts.append(sample_and_score(next(batches), len(parts)))
        kept += len(informative_groups(parts[-1][1].reward, parts[-1][0].group_ids))
    ro, scored = concat([p[0] for p in parts]), Scored.concat([p[1] for p in parts])
    good = informative_groups(scored.reward, ro.group_ids)
    rest = [g for g in dict.fromkeys(ro.group_ids.tolist()) if g not in set(good)]
    idx = group_rows(ro.group_ids, (good + rest)[:num_prompts])
    metrics = {"sampling/rounds": float(len(parts)),
               "sampling/informative_frac": len(good) / (len(parts) * num_prompts),
               "sampling/filled_groups": float(max(num_prompts - len(good), 0))}
    return ro.take(idx), scored.take(idx), metrics
