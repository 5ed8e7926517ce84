"""Does RL with the OPERA reward make the default recipe's model better? Seeds and controls.

    python benchmarks/study.py                                   # 3 seeds, every variant
    python benchmarks/study.py --config.seeds=0,1,2,3,4 --config.variants=opera,random,sft
    python benchmarks/study.py --config.recipe.grpo.optim.lr=3e-4   # any key of the recipe

For each seed, the main job's warm-up, synthesis and SFT stages run as `python -m
opera_jax.train` runs them, seeded (`seeded`); then one GRPO run per variant starts from the
same SFT model, and every model is evaluated on the same held-out prompts with the same seed,
scored by the SFT model (one yardstick). The variants differ only in what the advantages are
computed from:

  opera            the default run's reward
  rank_only        rank term only (reflection_weight 0)
  reflection_only  reflection term only (rank_weight 0)
  random           the OPERA rewards permuted at random across each step's batch: the same
                   mean and variance, no relation to the response (`grpo.random_rewards`)
  sft              no RL: the SFT model itself
  opera_distinct   a deviation: a reflective paragraph that restates an earlier one earns
                   nothing (`reward.distinct_reflections=0.8`)

Writes to `workdir`: `units/<seed>_<variant>.json` (one per finished unit: the evaluation's
metrics and the GRPO curves), `study.md` (mean ± sd over seeds per variant) and `study.png`
(held-out answer accuracy and training reward over RL steps). Rerunning the command skips
finished units and resumes a cut one from its checkpoints; a tqdm bar counts units.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import ml_collections
import numpy as np
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from opera_jax import cli, pipeline
from opera_jax.config import build
from opera_jax.config.runs import parse
from opera_jax.config.sections import Mesh
from opera_jax.config.setups import default
from opera_jax.evaluation import evaluate
from opera_jax.train.metrics import read_metrics
from opera_jax.train.plots import latest_per_step

# Variant name -> the config keys it changes (dotted, under the recipe); nothing else differs.
VARIANTS: dict[str, dict] = {
    "opera": {},
    "rank_only": {"reward.reflection_weight": 0.0},
    "reflection_only": {"reward.rank_weight": 0.0},
    "random": {"grpo.random_rewards": True},
}
# Options that change what the reward counts (docs/METHOD.md §6), shown next to the method.
DEVIATIONS: dict[str, dict] = {
    "opera_distinct": {"reward.distinct_reflections": 0.8},
}
NO_RL = "sft"
# Columns of the table: (label, key in a unit's results).
COLUMNS = (("train reward first 5", "reward_first5"), ("train reward last 5", "reward_last5"),
           ("held-out reward", "reward"), ("answer accuracy", "answer_acc"),
           ("color", "color_acc"), ("place", "place_acc"), ("well-formed", "well_formed"),
           ("math accuracy", "math_acc"), ("truncated", "truncated_frac"),
           ("think length", "think_len"), ("repeated paragraphs", "repeat_paragraph"))


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/study"
    c.seeds = "0,1,2"
    c.variants = ",".join([*VARIANTS, NO_RL, *DEVIATIONS])
    c.recipe = default()           # the main job's config; any key may be overridden
    return c


def seeded(recipe: ml_collections.ConfigDict, seed: int, workdir: str,
           changes: dict | None = None):
    """The typed recipe with every stage's randomness drawn from `seed` (the toy data, the
    warm-up's initial weights, synthesis sampling, data orders, GRPO sampling and state RNG)
    and the variant's `changes`; everything under `workdir`/seed<seed>."""
    c = ml_collections.ConfigDict(recipe.to_dict())
    c.workdir = os.path.join(workdir, f"seed{seed}")
    c.seed = c.data.seed = c.model.init_seed = c.synth.seed = seed
    for key, value in (changes or {}).items():
        section, name = key.rsplit(".", 1)
        c[section][name] = value
    return parse(c)


def _grpo_curves(grpo_dir: str) -> dict:
    rows = latest_per_step(read_metrics(grpo_dir))
    pick = lambda key: [(r["step"], r[key]) for r in rows if key in r]  # noqa: E731
    rewards = [v for _, v in pick("reward/mean")]
    k = min(5, len(rewards) // 2)
    return {"reward_curve": pick("reward/mean"),
            "val_accuracy_curve": pick("val_response/truth/correct"),
            "val_reward_curve": pick("val_reward/mean"),
            "truncated_curve": pick("response/truncated_frac"),
            "reward_first5": float(np.mean(rewards[:k])) if k else float("nan"),
            "reward_last5": float(np.mean(rewards[-k:])) if k else float("nan")}


def run_unit(config: ml_collections.ConfigDict, seed: int, variant: str, scorer) -> dict:
    """One (seed, variant): GRPO from the seed's SFT model (unless `sft`), then evaluation."""
    recipe = seeded(config.recipe, seed, config.workdir, {**VARIANTS, **DEVIATIONS}.get(variant))
    paths = pipeline.paths_of(recipe)
    out = {"seed": seed, "variant": variant}
    source = paths.sft_hf
    if variant != NO_RL:
        grpo_dir = os.path.join(paths.workdir, f"grpo_{variant}")
        pipeline.run_grpo(recipe, paths, workdir=grpo_dir)
        out.update(_grpo_curves(grpo_dir))
        source = grpo_dir
    mesh = build.make_mesh(Mesh())  # as load_source places the scorer
    model, tokenizer = build.load_source(source, dtype=recipe.eval.dtype, mesh=mesh)
    rows = evaluate.load_prompts(recipe.eval)
    _, metrics = evaluate.evaluate_model(model, tokenizer, rows, recipe.eval, scorer=scorer,
                                         mesh=mesh)
    out.update(metrics)
    return out


def _fmt(values: list[float]) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "–"
    sd = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f"{np.mean(values):.3f} ± {sd:.3f}"


def write_table(units: list[dict], variants: list[str], path: str) -> str:
    seeds = sorted({u["seed"] for u in units})
    lines = [f"Mean ± sd over seeds {seeds} (sd with n − 1).", "",
             "| variant | " + " | ".join(label for label, _ in COLUMNS) + " |",
             "| --- |" + " ---: |" * len(COLUMNS)]
    for v in variants:
        rows = [u for u in units if u["variant"] == v]
        if rows:
            lines.append(f"| {v} | " + " | ".join(_fmt([r.get(key, float("nan")) for r in rows])
                                                 for _, key in COLUMNS) + " |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_plot(units: list[dict], variants: list[str], path: str) -> None:
    fig = Figure(figsize=(12, 4), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, reward_ax = fig.subplots(1, 2)
    for i, v in enumerate(variants):
        rows = [u for u in units if u["variant"] == v]
        for ax, key in ((acc_ax, "val_accuracy_curve"), (reward_ax, "reward_curve")):
            curves = [dict(map(tuple, u[key])) for u in rows if u.get(key)]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            mean = [np.mean([c[s] for c in curves]) for s in steps]
            ax.plot(steps, mean, "o-", color=f"C{i}", markersize=3, label=v)
            for c in curves:
                ax.plot(steps, [c[s] for s in steps], "-", color=f"C{i}", alpha=0.2)
        sft = [u["answer_acc"] for u in units if u["variant"] == v == NO_RL]
        if sft:
            acc_ax.axhline(np.mean(sft), color=f"C{i}", ls="--", label="sft (evaluation)")
    acc_ax.set(title="held-out answer accuracy (validation, during RL)", xlabel="RL step")
    reward_ax.set(title="training reward (each variant's own; the random control logs the "
                        "OPERA reward)", xlabel="RL step")
    for ax in (acc_ax, reward_ax):
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=72)


def study(config: ml_collections.ConfigDict) -> None:
    logging.getLogger("opera_jax").setLevel(logging.WARNING)
    seeds = [int(x) for x in str(config.seeds).split(",") if x.strip()]
    variants = [v.strip() for v in config.variants.split(",") if v.strip()]
    unknown = set(variants) - {*VARIANTS, *DEVIATIONS, NO_RL}
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; known: "
                         f"{', '.join([*VARIANTS, NO_RL, *DEVIATIONS])}")
    unit_dir = os.path.join(config.workdir, "units")
    os.makedirs(unit_dir, exist_ok=True)
    units = []
    with tqdm(total=len(seeds) * len(variants), unit="unit", desc="study") as bar:
        for seed in seeds:
            recipe = seeded(config.recipe, seed, config.workdir)
            scorer = None
            for variant in variants:
                path = os.path.join(unit_dir, f"{seed}_{variant}.json")
                if not os.path.exists(path):
                    if scorer is None:  # the seed's SFT model, built once
                        for stage in (pipeline.run_warmup, pipeline.run_synth,
                                      pipeline.run_sft):
                            stage(recipe, pipeline.paths_of(recipe))
                        scorer = build.load_source(pipeline.paths_of(recipe).sft_hf)[0]
                    bar.set_postfix_str(f"seed {seed} {variant}")
                    unit = run_unit(config, seed, variant, scorer)
                    with open(path + ".tmp", "w") as f:
                        json.dump(unit, f, indent=1)
                    os.replace(path + ".tmp", path)
                with open(path) as f:
                    units.append(json.load(f))
                bar.update(1)
    print(write_table(units, variants, os.path.join(config.workdir, "study.md")))
    write_plot(units, variants, os.path.join(config.workdir, "study.png"))
    print(f"table: {config.workdir}/study.md, plot: {config.workdir}/study.png")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run_main(lambda: study(flags.FLAGS.config))


if __name__ == "__main__":
    cli.define_config(get_config, sys.argv)
    app.run(main, flags_parser=cli.parse_flags)
