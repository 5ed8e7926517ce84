"""Metrics writer (JSONL + TensorBoard, NaN stops with the step) and the periodic helper."""

import math
import os

import pytest

from opera_jax.train.metrics import MetricsWriter, Throughput, read_metrics
from opera_jax.train.periodic import Every


def test_every_fires_on_multiples_and_the_last_step():
    assert [s for s in range(1, 26) if Every(10, last_step=25)(s)] == [10, 20, 25]
    assert [s for s in range(1, 6) if Every(0, last_step=5)(s)] == [5]
    assert [s for s in range(1, 6) if Every(2)(s)] == [2, 4]


def test_writer_appends_jsonl_and_tensorboard_and_stops_on_nan(tmp_path):
    w = MetricsWriter(str(tmp_path), total_steps=10, console=False, enabled=True)
    w.write(1, {"loss": 2.5, "lr": 1e-3})
    w.write(2, {"loss": 2.0, "lr": 2e-3})
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite metrics \{'loss': nan\}"):
        w.write(3, {"loss": math.nan, "lr": 1e-3})
    with pytest.raises(FloatingPointError, match="step 4: .*'grad_norm': inf"):
        w.write(4, {"loss": 1.0, "grad_norm": math.inf})
    w.close()
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 2.5, "lr": 1e-3},
                                           {"step": 2, "loss": 2.0, "lr": 2e-3}]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    # A resumed run appends.
    w = MetricsWriter(str(tmp_path), total_steps=10, initial_step=2, console=False, enabled=True)
    w.write(3, {"loss": 1.5})
    w.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_other_processes_check_but_do_not_write(tmp_path):
    w = MetricsWriter(str(tmp_path / "x"), total_steps=1, enabled=False)
    w.write(1, {"loss": 1.0})
    with pytest.raises(FloatingPointError, match="step 2"):
        w.write(2, {"loss": math.nan})
    assert not os.path.exists(tmp_path / "x")


def test_throughput_counts_tokens_since_last_rate():
    t = Throughput()
    t.add(100)
    t.add(300)
    r = t.rate()
    assert r["tokens_per_s"] / r["steps_per_s"] == pytest.approx(200.0)
    t.add(50)
    r = t.rate()
    assert r["tokens_per_s"] / r["steps_per_s"] == pytest.approx(50.0)
