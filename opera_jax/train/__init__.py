"""Training: state and optimizer, checkpoints, metrics, SFT and GRPO loops and losses."""
