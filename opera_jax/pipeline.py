"""The whole OPERA recipe as one job: warm-up → synthesis → SFT → GRPO → evaluation.

    python -m opera_jax.train                              # the embedded default (toy domain)
    python -m opera_jax.train --config.grpo.steps=40 --config.stages=grpo,eval

Each stage is an ordinary stage run (config/runs.py) built from the pipeline's sections, with
its own folder under `workdir`; the pipeline only wires one stage's output into the next one's
input:

  warmup  SFT from random weights on the toy domain's traces (data/toy_domain.py): stands in
          for a pretrained instruct model, which cannot be downloaded here. Cached by the hash
          of its settings under `warmup.cache`, so later runs (any workdir) skip it. Skipped
          when `model.hf_dir` names a real model. Output: an HF directory.
  synth   cold-start synthesis with that model as teacher (or `synth.teacher`)
          → synth/records.jsonl.
  sft     the student (the same start model) fine-tuned on those records → sft/hf.
  grpo    GRPO with the OPERA reward from sft/hf (also the KL reference) → grpo/.
  eval    the SFT and GRPO models side by side on held-out prompts → eval/report.md, with the
          ground truth where the prompts have one.

A stage is done only when it finished: its folder then holds `.stage_done.json` with the hash
of the stage's settings. A rerun skips done stages (with the same settings) and resumes an
interrupted one from its checkpoints; SIGTERM saves the running stage and stops the job
(`checkpoint.Preempted`), so no later stage runs on a half-trained model. `stages` selects a
subset; a stage's input must then exist already.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time

from opera_jax.config import build
from opera_jax.config import sections as S
from opera_jax.config.runs import GRPORun, PipelineRun, SFTRun, SynthRun, to_json
from opera_jax.data import toy_domain
from opera_jax.data.jsonl import write_jsonl
from opera_jax.evaluation import evaluate
from opera_jax.locks import WorkdirLock
from opera_jax.model.hf_io import export_hf
from opera_jax.synth import records_path, synthesize
from opera_jax.synth.wrapper import wrap_prompt
from opera_jax.train import grpo, sft
from opera_jax.train.metrics import read_metrics
from opera_jax.train.plots import latest_per_step

log = logging.getLogger(__name__)

STAGES = ("warmup", "synth", "sft", "grpo", "eval")
DONE = ".stage_done.json"


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


def settings_hash(settings) -> str:
    """12 hex digits of sha256 over a JSON-able description of a stage's settings."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def parse_stages(spec: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in config.stages={spec!r}; "
                         f"stages: {', '.join(STAGES)}")
    return stages


def paths_of(run: PipelineRun) -> Paths:
    workdir = os.path.abspath(os.path.expanduser(run.workdir))
    cache = os.path.abspath(os.path.expanduser(run.warmup.cache))
    # Everything the warm-up's result depends on: its run and the traces it reads.
    key = settings_hash({"run": to_json(warmup_run(run, "")), "examples": run.warmup.examples})
    return Paths(workdir=workdir, warmup=os.path.join(cache, key))


def _need(path: str, stage: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"stage {stage!r} needs {path}, which an earlier stage writes; "
                                f"add that stage to config.stages")


def is_done(folder: str, settings) -> bool:
    """Whether the stage in `folder` finished with these settings."""
    try:
        with open(os.path.join(folder, DONE)) as f:
            return json.load(f)["hash"] == settings_hash(settings)
    except (OSError, ValueError, KeyError):
        return False


def mark_done(folder: str, settings) -> None:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, DONE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"hash": settings_hash(settings),
                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    os.replace(tmp, os.path.join(folder, DONE))


def _export(run_dir: str, out: str) -> None:
    """A trainer's newest checkpoint as an HF directory (replaced whole)."""
    model, tokenizer, _, step = build.load_run(run_dir)
    log.info("exporting step %d of %s to %s", step, run_dir, out)
    export_hf(model, out, tokenizer=tokenizer, overwrite=True)


# ---------------------------------------------------------------- stage runs


def start_model(run: PipelineRun, paths: Paths) -> S.Model:
    """The recipe's start point: `model.hf_dir`, else the warm-up's export."""
    if run.model.hf_dir is not None:
        return run.model
    return dataclasses.replace(run.model, hf_dir=paths.warmup_hf, preset=None)


def warmup_run(run: PipelineRun, workdir: str) -> SFTRun:
    sft_fields = {f.name: getattr(run.warmup, f.name) for f in dataclasses.fields(S.SFT)}
    return SFTRun(workdir=workdir, seed=run.seed, model=run.model, mesh=run.mesh,
                  data=dataclasses.replace(run.data, path=os.path.join(workdir, "traces.jsonl")),
                  checkpoint=run.checkpoint, sft=S.SFT(**sft_fields))


def synth_run(run: PipelineRun, paths: Paths) -> SynthRun:
    teacher = start_model(run, paths)
    if run.synth.teacher is not None:
        teacher = dataclasses.replace(teacher, hf_dir=run.synth.teacher, checkpoint=None)
    return SynthRun(workdir=paths.synth, seed=run.seed, model=teacher, mesh=run.mesh,
                    data=dataclasses.replace(run.data, path=run.synth_prompts), synth=run.synth)


def sft_run(run: PipelineRun, paths: Paths) -> SFTRun:
    return SFTRun(workdir=paths.sft, seed=run.seed, model=start_model(run, paths), mesh=run.mesh,
                  data=dataclasses.replace(run.data, path=records_path(synth_run(run, paths))),
                  checkpoint=run.checkpoint, sft=run.sft, log=run.log)


def grpo_run(run: PipelineRun, paths: Paths, *, workdir: str | None = None) -> GRPORun:
    """GRPO from the SFT model (also the KL reference) into `paths.grpo` (or `workdir`)."""
    model = dataclasses.replace(run.model, hf_dir=paths.sft_hf, preset=None, checkpoint=None)
    return GRPORun(workdir=workdir or paths.grpo, seed=run.seed, model=model, mesh=run.mesh,
                   data=run.data, checkpoint=run.checkpoint, grpo=run.grpo,
                   rollout=run.rollout, reward=run.reward, loss=run.loss,
                   validation=run.validation, log=run.log)


# ---------------------------------------------------------------- stages


def run_warmup(run: PipelineRun, paths: Paths) -> None:
    """From-scratch SFT on the toy domain, exported as the HF 'instruct model'."""
    if run.model.hf_dir is not None:
        log.info("warm-up: skipped, the start model is %s", run.model.hf_dir)
        return
    stage = warmup_run(run, paths.warmup)
    if is_done(paths.warmup, to_json(stage)):
        log.info("warm-up: cached at %s", paths.warmup_hf)
        return
    with WorkdirLock(paths.warmup, what="warm-up cache"):
        if not os.path.exists(stage.data.path):
            # Half of the prompts carry the synthesis wrapper, so the warmed-up model also
            # serves as the synthesis teacher.
            rng = random.Random(run.seed)
            rows = toy_domain.examples(run.warmup.examples, seed=run.seed)
            for row in rows:
                if rng.random() < 0.5:
                    row["prompt"] = wrap_prompt(row["prompt"])
            write_jsonl(stage.data.path + ".tmp", rows)
            os.replace(stage.data.path + ".tmp", stage.data.path)
    sft.train(stage)
    _export(paths.warmup, paths.warmup_hf)
    mark_done(paths.warmup, to_json(stage))


def run_synth(run: PipelineRun, paths: Paths) -> dict | None:
    stage = synth_run(run, paths)
    if is_done(paths.synth, to_json(stage)):
        log.info("synth: done, %s", records_path(stage))
        return None
    if stage.model.hf_dir is not None:
        _need(os.path.join(stage.model.hf_dir, "config.json"), "synth")
    summary = synthesize(stage)
    mark_done(paths.synth, to_json(stage))
    return summary


def run_sft(run: PipelineRun, paths: Paths) -> None:
    stage = sft_run(run, paths)
    if is_done(paths.sft, to_json(stage)):
        log.info("sft: done, %s", paths.sft_hf)
        return
    _need(stage.data.path, "sft")
    sft.train(stage)
    _export(paths.sft, paths.sft_hf)
    mark_done(paths.sft, to_json(stage))


def run_grpo(run: PipelineRun, paths: Paths, *, workdir: str | None = None) -> None:
    stage = grpo_run(run, paths, workdir=workdir)
    if is_done(stage.workdir, to_json(stage)):
        log.info("grpo: done, %s", stage.workdir)
        return
    _need(os.path.join(paths.sft_hf, "config.json"), "grpo")
    grpo.train(stage)
    mark_done(stage.workdir, to_json(stage))


def run_eval(run: PipelineRun, paths: Paths) -> dict:
    _need(os.path.join(paths.sft_hf, "config.json"), "eval")
    _need(paths.grpo, "eval")
    return evaluate.compare({"sft": paths.sft_hf, "grpo": paths.grpo}, run.eval, paths.eval,
                            overwrite=True)


# ---------------------------------------------------------------- driver


def run(config: PipelineRun) -> dict:
    """Runs the selected stages in order; returns a summary dict (also printed).

    Raises:
      checkpoint.Preempted: a stage stopped on SIGTERM (its state saved); rerun to resume.
    """
    stages = parse_stages(config.stages)
    paths = paths_of(config)
    with WorkdirLock(paths.workdir, what="pipeline workdir"):
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
        summary.update(_ground_truth_summary(summary.get("eval")))
        with open(os.path.join(paths.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    _print_summary(summary, paths)
    return summary


def _grpo_reward_summary(paths: Paths) -> dict:
    """Mean training reward of the first and last 5 RL steps, from grpo/metrics.jsonl."""
    if not os.path.exists(os.path.join(paths.grpo, "metrics.jsonl")):
        return {}
    rows = latest_per_step(read_metrics(paths.grpo))
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    if len(rewards) < 2:
        return {}
    k = min(5, len(rewards) // 2)
    return {"reward_first5": sum(rewards[:k]) / k, "reward_last5": sum(rewards[-k:]) / k}


def _ground_truth_summary(results: dict | None) -> dict:
    """`accuracy` per model (held-out answer accuracy, where the prompts have a ground truth)
    and the verdict of SFT -> GRPO on what the reward does not measure."""
    if not results:
        return {}
    out = {}
    if all("answer_acc" in m for m in results.values()):
        out["accuracy"] = {label: m["answer_acc"] for label, m in results.items()}
    if "sft" in results and "grpo" in results:
        worse, lines = evaluate.verdict(results["sft"], results["grpo"])
        out["rl_made_worse"], out["ground_truth"] = worse, lines
    return out


def _print_summary(summary: dict, paths: Paths) -> None:
    lines = ["", "OPERA pipeline finished.",
             f"  stage seconds:   {summary['seconds']}"]
    if "reward_first5" in summary:
        lines.append(f"  GRPO reward:     first 5 steps {summary['reward_first5']:.3f} → "
                     f"last 5 steps {summary['reward_last5']:.3f}")
    if "ground_truth" in summary:  # next to the reward: what it does not measure
        lines.append("  SFT -> GRPO on held-out prompts (not seen by the reward):")
        lines += [f"    {line}" for line in summary["ground_truth"]]
        if summary["rl_made_worse"]:
            lines.append("  RL made the model WORSE on the ground truth above, whatever the "
                         "reward says: read eval/report.md before using this model.")
    lines += [f"  warm-up model:   {paths.warmup_hf}",
              f"  synthesis:       {os.path.join(paths.synth, 'records.jsonl')}",
              f"  SFT model:       {paths.sft_hf}  (checkpoints: {paths.sft}/checkpoints)",
              f"  GRPO run:        {paths.grpo}/checkpoints, metrics {paths.grpo}/metrics.jsonl",
              f"  TensorBoard:     tensorboard --logdir {paths.workdir}",
              f"  reward plot:     {paths.grpo}/reward_curves.png",
              f"  evaluation:      {paths.eval}/report.md",
              f"  summary:         {paths.workdir}/summary.json"]
    print("\n".join(lines))
