"""The reward curves of a GRPO run as a PNG, and its closing summary, from `metrics.jsonl`.

Left: the training reward (mean ± std over the step's responses) with its rank and reflection
sub-scores. Right: the validation reward on held-out prompts, when the run logged it, with the
validation answers' ground-truth accuracy (where the prompts have one) and truncation rate:
what the reward does not measure, next to it. Matplotlib's object API with the Agg canvas: no
pyplot, no global backend switch.
"""

from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from opera_jax.train.metrics import read_metrics

FILENAME = "reward_curves.png"


def latest_per_step(rows: list[dict]) -> list[dict]:
    """One row per step, the last written (a resumed run re-logs the steps it repeats), with
    rows of the same step merged (validation and training metrics may come separately)."""
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step[row["step"]] = {**by_step.get(row["step"], {}), **row}
    return [by_step[s] for s in sorted(by_step)]


def _series(rows: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax, rows: list[dict], prefix: str, title: str) -> bool:
    """Mean ± std, rank and reflection of `{prefix}*` on one axis; False when none logged."""
    steps, mean = _series(rows, f"{prefix}mean")
    if steps:
        _, std = _series(rows, f"{prefix}std")
        if len(std) == len(mean):
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], alpha=0.2, color="C0")
        ax.plot(steps, mean, "C0o-", label="reward (mean ± std)", markersize=3)
        for name, style in (("rank", "C1--"), ("reflection", "C2--")):
            x, y = _series(rows, prefix + name)
            if x:
                ax.plot(x, y, style, label=name)
        ax.legend(loc="best", fontsize="small")
    ax.set(title=title, xlabel="RL step")
    return bool(steps)


def plot_rewards(workdir: str, path: str | None = None) -> str | None:
    """Writes the reward-curve PNG; returns its path (None when there is nothing to plot).

    Args:
      workdir: the run's directory (holding metrics.jsonl).
      path: output file; default `workdir/reward_curves.png`.
    """
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return None
    rows = latest_per_step(read_metrics(workdir))
    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    train_ax, val_ax = fig.subplots(1, 2)
    drawn = _panel(train_ax, rows, "reward/", "training reward")
    drawn |= _panel(val_ax, rows, "val_reward/", "held-out prompts")
    for key, style, label in ((TRUTH, "C3s-", "answer accuracy (ground truth)"),
                              ("val_response/truncated_frac", "C7^:", "truncated")):
        x, y = _series(rows, key)
        if x:
            val_ax.plot(x, y, style, label=label, markersize=4)
            val_ax.legend(loc="best", fontsize="small")
    if not drawn:
        return None
    path = path or os.path.join(workdir, FILENAME)
    fig.savefig(path, dpi=100)
    return path


TRUTH = "val_response/truth/correct"
# What run_summary compares between the first and the last validation: (key, label, higher
# is better).
_SUMMARY = (("val_reward/mean", "validation reward", True),
            (TRUTH, "validation answer accuracy (ground truth)", True),
            ("val_response/truth/well_formed", "well-formed answers", True),
            ("val_response/truncated_frac", "truncated responses", False),
            ("val_response/repeat_paragraph", "repeated paragraphs", False))


def run_summary(workdir: str) -> list[str]:
    """Lines comparing the first and the last validation of a run: the reward next to what it
    does not measure, and a plain warning when the ground truth got worse while the reward
    rose."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return []
    rows = [r for r in latest_per_step(read_metrics(workdir)) if "val_reward/mean" in r]
    if len(rows) < 2:
        return []
    first, last = rows[0], rows[-1]
    lines = [f"validation, step {first['step']} -> {last['step']}:"]
    for key, label, _ in _SUMMARY:
        if key in first and key in last:
            lines.append(f"  {label}: {first[key]:.3f} -> {last[key]:.3f}")
    if TRUTH in first and TRUTH in last and last[TRUTH] < first[TRUTH]:
        lines.append("  the ground truth got WORSE during RL: do not trust the reward curve "
                     "alone (docs/METHOD.md §6)")
    return lines
