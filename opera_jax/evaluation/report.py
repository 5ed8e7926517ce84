"""The files of an evaluation: one JSONL of responses per model, metrics.json, report.md with
a table (one column per model) and plots.png (reflections, reference perplexity, and the
ground truth and form next to each other)."""

from __future__ import annotations

import json
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from opera_jax.data.jsonl import write_jsonl

# The bars of the ground-truth panel.
_BARS = ("answer_acc", "color_acc", "place_acc", "well_formed", "think_closed",
         "truncated_frac", "math_acc")


def write(out: str, results: dict, per_model: dict, sources: dict) -> str:
    """Writes every file into `out`; returns the report's path."""
    for label, records in per_model.items():
        write_jsonl(os.path.join(out, f"responses_{label}.jsonl"), records)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    labels = list(results)
    keys = list(dict.fromkeys(k for m in results.values() for k in m))
    lines = ["# Evaluation", "", "| metric | " + " | ".join(labels) + " |",
             "| --- |" + " ---: |" * len(labels)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{results[m].get(k, float('nan')):.4g}"
                                              for m in labels) + " |")
    lines += ["", "Sources: " + ", ".join(f"`{m}` = {sources[m]}" for m in labels), "",
              "![plots](plots.png)", ""]
    _plot(os.path.join(out, "plots.png"), results, per_model)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def _plot(path: str, results: dict, per_model: dict) -> None:
    labels = list(results)
    fig = Figure(figsize=(15, 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for m in labels:
        counts = [r["reflection_count"] for r in per_model[m] if "reflection_count" in r]
        ppl = [r["reference_ppl"] for r in per_model[m] if "reference_ppl" in r]
        axes[0].hist(counts, bins=np.arange(-0.5, max(counts + [1]) + 1.5), alpha=0.5, label=m)
        axes[1].hist(ppl, bins=20, alpha=0.5, label=m)
    bars = [k for k in _BARS if any(k in results[m] for m in labels)]
    width = 0.8 / max(len(labels), 1)
    for i, m in enumerate(labels):
        axes[2].bar(np.arange(len(bars)) + i * width,
                    [results[m].get(k, float("nan")) for k in bars], width, label=m)
    axes[2].set_xticks(np.arange(len(bars)) + 0.4 - width / 2, bars, rotation=30, ha="right")
    axes[0].set_title("counted reflections per response")
    axes[1].set_title("reference perplexity given the response")
    axes[2].set_title("ground truth and form (share of responses)")
    for ax in axes:
        ax.legend()
    fig.savefig(path, dpi=90)
