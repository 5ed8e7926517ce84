"""Worker of tests/test_distributed.py: a 3-step SFT run, as one of several processes.

    OPERA_COORDINATOR=… OPERA_NUM_PROCESSES=2 OPERA_PROCESS_ID=i python multiprocess_sft_worker.py DIR

Process 0 prints the per-step losses as JSON on its last line.
"""
import json
import sys

from opera_jax import distributed
distributed.initialize()
import jax
from opera_jax.config.runs import parse
from opera_jax.config.setups import sft_tiny
from opera_jax.train.metrics import read_metrics
from opera_jax.train.sft import train
out = sys.argv[1]
c = sft_tiny()
c.workdir = out
c.model.dtype = "float32"
c.data.path = "toy:sft:64"
c.data.num_threads = 0
c.sft.steps = 3
c.checkpoint.async_save = False
train(parse(c))
if jax.process_index() == 0:
    print(json.dumps([round(r["loss"], 6) for r in read_metrics(out)]))
