"""Worker of tests/test_distributed.py: a 3-step SFT run, as one of several processes.

    OPERA_COORDINATOR=… OPERA_NUM_PROCESSES=2 OPERA_PROCESS_ID=i python multiprocess_sft_worker.py DIR

Process 0 prints the per-step losses as JSON on its last line.
"""
import json
import sys

from opera_jax import distributed
distributed.initialize()
import jax
from opera_jax.data.jsonl import write_jsonl
from opera_jax.data.toy_domain import examples
from opera_jax.train.configs import sft_tiny
from opera_jax.train.sft import train
from opera_jax.train.metrics import read_metrics
out = sys.argv[1]
c = sft_tiny()
c.workdir = out
c.model.dtype = "float32"
c.data.path = out + "_toy.jsonl"
if jax.process_index() == 0:
    write_jsonl(c.data.path, examples(64, seed=0))
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices("data")
c.data.write_toy_rows = 0
c.data.num_threads = 0
c.sft.steps = 3
c.checkpoint.async_save = False
train(c)
if jax.process_index() == 0:
    print(json.dumps([round(r["loss"], 6) for r in read_metrics(out)]))
