"""Worker of tests/test_distributed.py: a 2-step GRPO pulse run, as one of several processes.

    OPERA_COORDINATOR=… OPERA_NUM_PROCESSES=2 OPERA_PROCESS_ID=i python multiprocess_grpo_worker.py DIR

Process 0 prints the per-step metrics (reward/mean, loss, kl) as JSON on its last line.
"""
import json
import sys

from opera_jax import distributed
distributed.initialize()
import jax
from opera_jax.config.runs import parse
from opera_jax.config.setups import grpo_tiny
from opera_jax.train.grpo import train
from opera_jax.train.metrics import read_metrics
out = sys.argv[1]
c = grpo_tiny()
c.workdir = out
c.model.dtype = "float32"
c.data.path = "toy:prompts:64"
c.data.num_threads = 0
c.rollout.num_prompts = 4
c.rollout.n = 4
c.rollout.max_new_tokens = 32
c.grpo.steps = 2
c.validation.every = None
c.checkpoint.async_save = False
train(parse(c))
if jax.process_index() == 0:
    print(json.dumps([{k: r[k] for k in ("reward/mean", "loss", "kl")}
                      for r in read_metrics(out) if "loss" in r]))
