"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Called once by every entry point before JAX touches a device. It initialises when the job
spans several processes and does nothing for a single process:

* explicit: `OPERA_COORDINATOR` (host:port), `OPERA_NUM_PROCESSES`, `OPERA_PROCESS_ID`
  (launch/ scripts and tests set these);
* SLURM: `SLURM_NTASKS` > 1 — JAX reads the SLURM variables itself;
* TPU VM slices: `TPU_WORKER_HOSTNAMES` with more than one worker, or `OPERA_MULTIHOST=1`
  (launch/tpu_vm.sh sets it) — JAX finds the workers from the TPU metadata.

On CPU the collectives go through gloo (`jax_cpu_collectives_implementation`), so several CPU
processes on one machine form one mesh (tests).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax

log = logging.getLogger(__name__)


def launch_spec(env: Mapping[str, str]) -> dict | None:
    """The `jax.distributed.initialize` keyword arguments this environment asks for, or None
    for a single-process run. Raises ValueError on a half-specified explicit setup."""
    explicit = {k: env.get(k) for k in ("OPERA_COORDINATOR", "OPERA_NUM_PROCESSES",
                                        "OPERA_PROCESS_ID")}
    if any(explicit.values()):
        missing = [k for k, v in explicit.items() if not v]
        if missing:
            raise ValueError(f"multi-process launch needs all of OPERA_COORDINATOR, "
                             f"OPERA_NUM_PROCESSES, OPERA_PROCESS_ID; missing {missing}")
        num, pid = int(explicit["OPERA_NUM_PROCESSES"]), int(explicit["OPERA_PROCESS_ID"])
        if not 0 <= pid < num:
            raise ValueError(f"OPERA_PROCESS_ID={pid} is outside [0, {num})")
        if num == 1:
            return None
        return {"coordinator_address": explicit["OPERA_COORDINATOR"], "num_processes": num,
                "process_id": pid}
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return {}  # JAX's SLURM cluster detection fills in the rest
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return {}  # JAX's TPU cluster detection
    if env.get("OPERA_MULTIHOST", "").lower() in ("1", "true"):
        return {}  # the launcher says so; JAX detects the cluster
    return None


def initialize(env: Mapping[str, str] | None = None) -> bool:
    """Initialises the JAX distributed runtime if the environment asks for it.

    Returns:
      True if this is (now) a multi-process run.
    """
    spec = launch_spec(os.environ if env is None else env)
    if spec is None:
        return False
    # CPU processes need gloo collectives to form one mesh (the CPU client only; it must be
    # set before any backend starts, so no platform query here).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**spec)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
