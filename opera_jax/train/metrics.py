"""Training metrics: a flat dict of float scalars per logged step, written by process 0 to the
console (a tqdm progress bar plus one line per log step), `metrics.jsonl`, TensorBoard and,
when `log.wandb_project` is set, Weights & Biases (an optional extra: `pip install -e
".[wandb]"`). W&B follows its environment: WANDB_MODE=offline writes the run under
`workdir/wandb/` (`wandb sync` uploads it later). The W&B run id is kept in `workdir/wandb_id`,
so a resumed run continues the same W&B run (W&B ignores steps it already holds).

Every process checks the values: a NaN or Inf stops training with a `FloatingPointError` that
names the step and the metric, before anything is checkpointed.

`metrics.jsonl` follows the checkpoints: each row is written with one `write` of the whole line
and flushed, and a resumed run first drops the rows of the steps it will repeat (those after
the restored step, written before a kill) and a last line cut short, so every step appears
once. `read_metrics` skips (and names) a damaged line instead of failing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from typing import Mapping

import jax
import tqdm

from opera_jax.config.sections import Log

log = logging.getLogger(__name__)
FILENAME = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"


def check_finite(step: int, metrics: Mapping[str, float]) -> None:
    """Raises FloatingPointError naming `step` and every non-finite metric."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"step {step}: non-finite metrics {bad}; stopping")


class Throughput:
    """Counts tokens between log steps; `rate()` gives tokens/s and steps/s since the last call."""

    def __init__(self):
        self._t, self._tokens, self._steps = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        self._tokens += int(tokens)
        self._steps += 1

    def rate(self) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        out = {"tokens_per_s": self._tokens / dt, "steps_per_s": self._steps / dt}
        self._t, self._tokens, self._steps = now, 0, 0
        return out


class MetricsWriter:
    """Console + JSONL + TensorBoard for one run.

    Args:
      workdir: `metrics.jsonl` and `tb/` go here (appended to on resume).
      total_steps: the progress bar's total.
      initial_step: the step training resumes from (the bar starts there).
      enabled: whether this process writes; default `jax.process_index() == 0`.
      console: show the progress bar and metric lines.
      log: the `log` section (W&B); None = no W&B.
      config: the run's config (JSON-safe dict), recorded with the W&B run.
    """

    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
                 enabled: bool | None = None, console: bool = True, log: Log | None = None,
                 config: dict | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._tb = self._bar = self._wandb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, FILENAME)
        truncate_metrics(path, initial_step)
        # One os.write per row on an O_APPEND descriptor: a kill leaves whole lines.
        self._jsonl = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        import tensorboardX  # only process 0 needs it

        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tb"))
        if log is not None and log.wandb_project is not None:
            self._wandb = _wandb_run(workdir, log, config)
        if console:
            self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step",
                                  dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        """Moves the progress bar (cheap: no device sync)."""
        if self._bar is not None:
            self._bar.update(steps)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Checks and writes one step's metrics (host floats: device_get them first).

        Raises:
          FloatingPointError: a metric is NaN or Inf (on every process).
        """
        metrics = {k: float(v) for k, v in metrics.items()}
        check_finite(step, metrics)
        if not self.enabled:
            return
        os.write(self._jsonl, (json.dumps({"step": step, **metrics}) + "\n").encode())
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            short = {k: f"{v:.4g}" for k, v in metrics.items()}
            self._bar.set_postfix({k: short[k] for k in ("loss", "tokens_per_s") if k in short},
                                  refresh=False)
            self._bar.write(f"step {step}: " + ", ".join(f"{k}={v}" for k, v in short.items()))

    def close(self) -> None:
        for f in (self._bar, self._tb):
            if f is not None:
                f.close()
        if self._jsonl is not None:
            os.close(self._jsonl)
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._jsonl = self._tb = self._wandb = None


def _wandb_run(workdir: str, section: Log, config: dict | None):
    """A W&B run for `workdir`: the id saved there (a resumed run continues it) or a new one."""
    try:
        import wandb  # an optional extra, imported only when asked for
    except ImportError:
        raise ImportError("log.wandb_project is set but wandb is not installed: "
                          "pip install -e \".[wandb]\"") from None
    path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:8]  # W&B's form: 8 lowercase letters and digits
        with open(path, "w", encoding="utf-8") as f:
            f.write(run_id + "\n")
    return wandb.init(project=section.wandb_project, entity=section.wandb_entity,
                      name=section.wandb_name, group=section.wandb_group, id=run_id,
                      resume="allow", dir=workdir, config=config)


def _rows(path: str) -> list[dict]:
    """The readable rows of a metrics file; a damaged line is skipped with a warning."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "step" not in row:
                    raise ValueError("not a metrics row")
            except ValueError:
                log.warning("%s:%d: damaged metrics line skipped", path, lineno)
                continue
            rows.append(row)
    return rows


def truncate_metrics(path: str, step: int) -> None:
    """Keeps only the rows of steps <= `step` (and no damaged line): a resumed run repeats the
    steps after its checkpoint. Rewritten atomically (a new file renamed into place)."""
    if not os.path.exists(path):
        return
    rows = _rows(path)
    kept = [r for r in rows if r["step"] <= step]
    with open(path, "rb") as f:
        clean = f.read().endswith(b"\n") or not os.path.getsize(path)
    if len(kept) == len(rows) and clean:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    if len(kept) < len(rows):
        log.info("%s: dropped %d rows after step %d (they are repeated)", path,
                 len(rows) - len(kept), step)


def read_metrics(workdir: str) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` (damaged lines skipped, with a warning)."""
    return _rows(os.path.join(workdir, FILENAME))
