"""The whole OPERA recipe as one job: warm-up → synthesis → SFT → GRPO → evaluation.

    python -m opera_jax.train                       # the embedded default (toy domain, CPU)
    python -m opera_jax.train --config=configs/default.py --config.grpo.grpo.steps=10

Each stage is an ordinary trainer or tool with its own sub-config (`config.warmup`,
`config.synth`, `config.sft`, `config.grpo`, `config.eval`) and its own folder under `workdir`;
the pipeline only wires one stage's output into the next one's input:

  warmup  SFT from random weights on the toy domain's traces (opera_jax/data/toy_domain.py):
          stands in for a pretrained instruct model, which cannot be downloaded here. Cached
          by its config's hash under `warmup_cache`, so later runs (any workdir) skip it.
          Output: an HF directory (the teacher, and the student's starting point).
  synth   cold-start synthesis with the warm-up model as teacher → synth/records.jsonl.
  sft     the student (the warm-up model) fine-tuned on those records → sft/hf.
  grpo    GRPO with the OPERA reward from sft/hf (also the KL reference) → grpo/.
  eval    the SFT and GRPO models side by side on held-out prompts → eval/report.md.

A stage whose output exists is skipped, and a stage cut short resumes from its own checkpoint,
so rerunning the same command after an interruption picks up where it stopped. `stages`
selects a subset (comma-separated); a skipped stage's output must then exist already.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time

import ml_collections

from opera_jax.data import toy_domain
from opera_jax.data.jsonl import write_jsonl

log = logging.getLogger(__name__)

STAGES = ("warmup", "synth", "sft", "grpo", "eval")


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes."""

    workdir: str
    warmup: str  # the warm-up run (in the cache)

    @property
    def warmup_hf(self):
        return os.path.join(self.warmup, "hf")

    @property
    def synth(self):
        return os.path.join(self.workdir, "synth")

    @property
    def synth_records(self):
        return os.path.join(self.synth, "records.jsonl")

    @property
    def sft(self):
        return os.path.join(self.workdir, "sft")

    @property
    def sft_hf(self):
        return os.path.join(self.sft, "hf")

    @property
    def grpo(self):
        return os.path.join(self.workdir, "grpo")

    @property
    def eval(self):
        return os.path.join(self.workdir, "eval")


def config_hash(config: ml_collections.ConfigDict) -> str:
    """A short stable hash of a (sub-)config."""
    blob = json.dumps(config.to_dict(), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def parse_stages(spec: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in config.stages={spec!r}; "
                         f"stages: {', '.join(STAGES)}")
    return stages


def paths_of(config: ml_collections.ConfigDict) -> Paths:
    workdir = os.path.abspath(os.path.expanduser(config.workdir))
    cache = os.path.abspath(os.path.expanduser(config.warmup_cache))
    return Paths(workdir=workdir, warmup=os.path.join(cache, config_hash(config.warmup)))


def _need(path: str, stage: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"stage {stage!r} needs {path}, which an earlier stage writes; "
                                f"add that stage to config.stages")


# ---------------------------------------------------------------- stages


def run_warmup(config: ml_collections.ConfigDict, paths: Paths) -> None:
    """From-scratch SFT on the toy domain, exported as the HF 'instruct model'."""
    from opera_jax.export import export_checkpoint
    from opera_jax.synth.wrapper import wrap_prompt
    from opera_jax.train import sft

    if os.path.exists(os.path.join(paths.warmup_hf, "config.json")):
        log.info("warm-up: cached at %s", paths.warmup_hf)
        return
    c = ml_collections.ConfigDict(config.warmup.to_dict())
    c.workdir = paths.warmup
    c.data.path = os.path.join(paths.warmup, "traces.jsonl")
    c.data.write_toy_rows = 0
    if not os.path.exists(c.data.path):
        # Half of the prompts carry the synthesis wrapper, so the warmed-up model also serves
        # as the synthesis teacher.
        rng = random.Random(config.seed)
        rows = toy_domain.examples(config.warmup_examples, seed=config.seed)
        for row in rows:
            if rng.random() < 0.5:
                row["prompt"] = wrap_prompt(row["prompt"])
        write_jsonl(c.data.path, rows)
    sft.train(c)
    export_checkpoint(paths.warmup, paths.warmup_hf)


def run_synth(config: ml_collections.ConfigDict, paths: Paths) -> dict:
    from opera_jax.synth import synthesize

    _need(os.path.join(paths.warmup_hf, "config.json"), "synth")
    c = ml_collections.ConfigDict(config.synth.to_dict())
    c.teacher.hf_dir = paths.warmup_hf
    c.input = os.path.join(paths.synth, "prompts.jsonl")
    c.output = paths.synth_records
    c.write_toy_prompts = 0
    if not os.path.exists(c.input):
        write_jsonl(c.input, toy_domain.prompt_rows(config.synth_prompts, seed=config.seed + 1))
    return synthesize(c)


def run_sft(config: ml_collections.ConfigDict, paths: Paths) -> None:
    from opera_jax.export import export_checkpoint
    from opera_jax.train import sft

    if os.path.exists(os.path.join(paths.sft_hf, "config.json")):
        log.info("sft: done, %s", paths.sft_hf)
        return
    _need(paths.synth_records, "sft")
    c = ml_collections.ConfigDict(config.sft.to_dict())
    c.workdir = paths.sft
    c.model.hf_dir = paths.warmup_hf
    c.data.path = paths.synth_records
    c.data.write_toy_rows = 0
    sft.train(c)
    export_checkpoint(paths.sft, paths.sft_hf)


def run_grpo(config: ml_collections.ConfigDict, paths: Paths) -> None:
    from opera_jax.train import grpo

    _need(os.path.join(paths.sft_hf, "config.json"), "grpo")
    c = ml_collections.ConfigDict(config.grpo.to_dict())
    c.workdir = paths.grpo
    c.model.hf_dir = paths.sft_hf  # the start point, and the KL reference
    c.data.path = os.path.join(paths.grpo, "prompts.jsonl")
    grpo.train(c)


def run_eval(config: ml_collections.ConfigDict, paths: Paths) -> dict:
    from opera_jax import evaluate

    _need(os.path.join(paths.sft_hf, "config.json"), "eval")
    c = ml_collections.ConfigDict(config.eval.to_dict())
    c.out = paths.eval
    return evaluate.compare({"sft": paths.sft_hf, "grpo": paths.grpo}, c)


# ---------------------------------------------------------------- driver


def run(config: ml_collections.ConfigDict) -> dict:
    """Runs the selected stages in order; returns a summary dict (also printed)."""
    stages = parse_stages(config.stages)
    paths = paths_of(config)
    os.makedirs(paths.workdir, exist_ok=True)
    seconds, summary = {}, {"workdir": paths.workdir}
    for stage, fn in (("warmup", run_warmup), ("synth", run_synth), ("sft", run_sft),
                      ("grpo", run_grpo), ("eval", run_eval)):
        if stage not in stages:
            continue
        log.info("==== stage %s ====", stage)
        t0 = time.perf_counter()
        out = fn(config, paths)
        seconds[stage] = round(time.perf_counter() - t0, 1)
        if isinstance(out, dict):
            summary[stage] = out
    summary["seconds"] = seconds
    summary.update(_grpo_reward_summary(paths))
    with open(os.path.join(paths.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    _print_summary(summary, paths)
    return summary


def _grpo_reward_summary(paths: Paths) -> dict:
    """Mean training reward of the first and last 5 RL steps, from grpo/metrics.jsonl."""
    from opera_jax.train.plots import latest_per_step

    file = os.path.join(paths.grpo, "metrics.jsonl")
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        rows = latest_per_step([json.loads(line) for line in f if line.strip()])
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    if len(rewards) < 2:
        return {}
    k = min(5, len(rewards) // 2)
    return {"reward_first5": sum(rewards[:k]) / k, "reward_last5": sum(rewards[-k:]) / k}


def _print_summary(summary: dict, paths: Paths) -> None:
    lines = ["", "OPERA pipeline finished.",
             f"  stage seconds:   {summary['seconds']}"]
    if "reward_first5" in summary:
        lines.append(f"  GRPO reward:     first 5 steps {summary['reward_first5']:.3f} → "
                     f"last 5 steps {summary['reward_last5']:.3f}")
    lines += [f"  warm-up model:   {paths.warmup_hf}",
              f"  synthesis:       {paths.synth_records}",
              f"  SFT model:       {paths.sft_hf}  (checkpoints: {paths.sft}/checkpoints)",
              f"  GRPO run:        {paths.grpo}/checkpoints, metrics {paths.grpo}/metrics.jsonl",
              f"  TensorBoard:     tensorboard --logdir {paths.workdir}",
              f"  reward plot:     {paths.grpo}/reward_curves.png",
              f"  evaluation:      {paths.eval}/report.md",
              f"  summary:         {paths.workdir}/summary.json"]
    print("\n".join(lines))
