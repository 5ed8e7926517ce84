"""Weights & Biases logging from MetricsWriter, offline: the run directory holds the values
written (read back from W&B's record file by a reader written here)."""

import glob
import os
import struct
import time

import pytest

from opera_jax.config.sections import Log
from opera_jax.train.metrics import MetricsWriter, read_metrics

wandb = pytest.importorskip("wandb")


def wandb_history(run_file: str, *, timeout: float = 60.0) -> list[dict]:
    """The history rows of a `.wandb` file: a 7-byte file header, then records in 32 KiB
    blocks, each chunk with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle,
    4 last) around a serialized `Record` protobuf. W&B's writer process may finish the file
    after `finish()` returns: read until it holds the run's `exit` record."""
    deadline = time.time() + timeout
    while True:
        rows, done = _records(run_file)
        if done or time.time() > deadline:
            return rows
        time.sleep(0.2)


def _records(run_file: str) -> tuple[list[dict], bool]:
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, payload, rows, done = 32768, 7, b"", [], False
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            kind = record.WhichOneof("record_type")
            done = done or kind == "exit"
            if kind == "history":
                rows.append({("/".join(i.nested_key) or i.key): float(i.value_json)
                             for i in record.history.item})
    return rows, done


def test_offline_run_holds_the_logged_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path / "run")
    section = Log(wandb_project="opera-test", wandb_name="pulse")
    w = MetricsWriter(workdir, total_steps=3, console=False, enabled=True, log=section,
                      config={"grpo": {"steps": 3}})
    w.write(1, {"loss": 1.5, "reward/opera": 0.25})
    w.write(2, {"loss": 1.25, "reward/opera": 0.5})
    w.close()
    run_id = open(os.path.join(workdir, "wandb_id")).read().strip()
    files = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", f"run-{run_id}.wandb"))
    assert len(files) == 1
    rows = wandb_history(files[0])
    assert [(r["_step"], r["loss"], r["reward/opera"]) for r in rows] == [
        (1, 1.5, 0.25), (2, 1.25, 0.5)]
    # the JSONL file holds the same rows
    assert read_metrics(workdir) == [{"step": 1, "loss": 1.5, "reward/opera": 0.25},
                                     {"step": 2, "loss": 1.25, "reward/opera": 0.5}]
    # a resumed writer continues the same W&B run
    w = MetricsWriter(workdir, total_steps=3, initial_step=2, console=False, enabled=True,
                      log=section)
    w.write(3, {"loss": 1.0, "reward/opera": 0.75})
    w.close()
    files = glob.glob(os.path.join(workdir, "wandb", "offline-run-*", f"run-{run_id}.wandb"))
    assert len(files) == 2  # one offline directory per process run, the same W&B run id
    rows = sorted((r for f in files for r in wandb_history(f)), key=lambda r: r["_step"])
    assert [(r["_step"], r["loss"]) for r in rows] == [(1, 1.5), (2, 1.25), (3, 1.0)]


def test_no_project_means_no_wandb(tmp_path):
    w = MetricsWriter(str(tmp_path), total_steps=1, console=False, enabled=True, log=Log())
    w.write(1, {"loss": 1.0})
    w.close()
    assert not os.path.exists(tmp_path / "wandb") and not os.path.exists(tmp_path / "wandb_id")
