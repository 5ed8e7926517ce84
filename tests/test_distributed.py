"""Multi-process runs: the launch environment, and two CPU processes forming one mesh.

Two processes with 2 fake CPU devices each (gloo collectives) run 3 SFT steps, and 2 GRPO
steps, on a mesh that spans both; the losses (GRPO: reward, loss, KL) equal those of one
process with 4 fake devices.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from opera_jax.distributed import launch_spec

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_sft_worker.py")


def test_launch_spec_from_environment():
    assert launch_spec({}) is None
    assert launch_spec({"SLURM_NTASKS": "1"}) is None
    assert launch_spec({"SLURM_NTASKS": "4"}) == {}
    assert launch_spec({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == {}
    assert launch_spec({"TPU_WORKER_HOSTNAMES": "w0"}) is None
    assert launch_spec({"OPERA_MULTIHOST": "1"}) == {}
    explicit = {"OPERA_COORDINATOR": "10.0.0.1:1234", "OPERA_NUM_PROCESSES": "2",
                "OPERA_PROCESS_ID": "1"}
    assert launch_spec(explicit) == {"coordinator_address": "10.0.0.1:1234",
                                     "num_processes": 2, "process_id": 1}
    assert launch_spec({**explicit, "OPERA_NUM_PROCESSES": "1", "OPERA_PROCESS_ID": "0"}) is None
    with pytest.raises(ValueError, match=r"missing \['OPERA_PROCESS_ID'\]"):
        launch_spec({"OPERA_COORDINATOR": "h:1", "OPERA_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match=r"OPERA_PROCESS_ID=2 is outside \[0, 2\)"):
        launch_spec({**explicit, "OPERA_PROCESS_ID": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPERA_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(extra)
    return env


def _last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


def _two_and_one(worker: str, tmp_path, timeout: int):
    """Runs `worker` as 2 processes × 2 devices, then as 1 process × 4 devices; returns the
    JSON each run's process 0 printed last."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, worker, str(tmp_path / "two")], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env=_env(2, OPERA_COORDINATOR=f"127.0.0.1:{port}", OPERA_NUM_PROCESSES="2",
                 OPERA_PROCESS_ID=str(i))) for i in range(2)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one = subprocess.run([sys.executable, worker, str(tmp_path / "one")], capture_output=True,
                         text=True, env=_env(4), timeout=timeout)
    assert one.returncode == 0, one.stderr[-3000:]
    # one writer: only process 0 wrote metrics
    assert os.path.exists(tmp_path / "two" / "metrics.jsonl")
    return _last_json(outs[0][0]), _last_json(one.stdout)


def test_two_processes_equal_one_process(tmp_path):
    two_losses, one_losses = _two_and_one(WORKER, tmp_path, timeout=400)
    assert len(one_losses) == 3 and one_losses[0] > one_losses[-1]
    assert two_losses == pytest.approx(one_losses, rel=1e-5)


GRPO_WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_grpo_worker.py")


@pytest.mark.slow  # the default suite stays under ~10 min on 2 cores
def test_grpo_two_processes_equal_one_process(tmp_path):
    """2 GRPO pulse steps (rollout, OPERA reward, update) on a mesh spanning two processes
    with 2 fake devices each: the same metrics as one process with 4 devices."""
    two_rows, one_rows = _two_and_one(GRPO_WORKER, tmp_path, timeout=600)
    assert len(one_rows) == 2 and one_rows[1]["kl"] > 0
    # abs: the step-1 loss is on-policy (ratio 1), a sum of O(1) advantage terms that cancel
    # to ~1e-4, so the float32 reduction order across processes shows at ~1e-8 absolute.
    for a, b in zip(two_rows, one_rows, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
