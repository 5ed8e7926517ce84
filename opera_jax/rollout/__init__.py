"""The rollout half of an RL step and what it is measured by.

`batch` (sample prompts into a token-level training batch), `dynamic_sampling` (DAPO: a batch
of groups whose rewards differ), `diagnostics` (what the responses look like beyond the
reward: think block closed, repeats, the ground truth), `stats` (the host-side metrics GRPO
logs per step and evaluation reports).
"""

from opera_jax.rollout.batch import Rollout, sample_rollout

__all__ = ["Rollout", "sample_rollout"]
