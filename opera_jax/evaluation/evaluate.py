"""Evaluation: generate for a prompt set, score intrinsically, compare models side by side.

    python -m opera_jax.eval --source=sft=RUN_OR_HF_DIR --source=grpo=OTHER --out=DIR

Each source is an HF directory (config.json) or a training run (its Orbax checkpoints, restored
onto the devices at hand). Prompts (`eval.prompts`, data.path syntax): the embedded held-out
toy prompts by default, or a JSONL / ArrayRecord file in the shape of public writing
benchmarks: the prompt under `prompt`, `query` or `instruction` (an `input` field is
appended), an optional reference under `reference`, `answer` or `output`, an optional `id`
and `task_type`.

Writes to the output directory (created whole, then renamed into place; report.py): `responses_<label>.jsonl` (id, prompt, response, thinking, answer,
finish_reason and the per-sample metrics; ready for an external judge), `metrics.json`, and
`report.md` with a table and `plots.png`. Intrinsic metrics per model: the OPERA reward and its
reflection score, the reference perplexity given prompt + response (exp(−LP(c_full))), think
and answer lengths in tokens, guiding-word counts, the share cut at the length limit and the
accuracy on `math` prompts; and what the reward cannot see (rollout/diagnostics.py): whether the
think block closed, repeated 4-grams and paragraphs, and on prompts with a checkable ground
truth (the embedded toy domain) the answer's accuracy — `answer_acc` (well-formed with the
prompt's color and place), `color_acc`, `place_acc`, `well_formed`. Rows without a reference
are generated and measured but not scored.
By default every model scores its own responses (as in training); `scorer` names one source
to score all of them with, a common yardstick for a comparison.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from opera_jax import tokenizer as tk
from opera_jax.config import build
from opera_jax.config.sections import Eval
from opera_jax.config.sections import Mesh as MeshSection
from opera_jax.data.pipeline import TokenizePrompt
from opera_jax.data.sources import open_rows
from opera_jax.evaluation import report
from opera_jax.outputs import check_writable, output_dir
from opera_jax.reward import DEFAULT_KEYWORDS, RewardConfig, TaskType, score_token_ids
from opera_jax.reward.segments import keyword_regex, parse_think_block
from opera_jax.rollout import diagnostics
from opera_jax.rollout.batch import sample_rollout
from opera_jax.sampling import FinishReason, Sampler

log = logging.getLogger(__name__)

_PROMPT_KEYS = ("prompt", "query", "instruction")
_REFERENCE_KEYS = ("reference", "answer", "output")
# Ground-truth measures (rollout/diagnostics.py) -> their names in metrics and the report.
TRUTH_KEYS = {"correct": "answer_acc", "color": "color_acc", "place": "place_acc",
              "well_formed": "well_formed"}


def load_prompts(config: Eval) -> list[dict]:
    """Prompt rows (id, prompt, reference, task_type) of `config.prompts`, the first
    `num_prompts` of them; benchmark field names are accepted (see the module docstring)."""
    rows = []
    for i, raw in enumerate(open_rows(config.prompts, on_bad_row="raise")):
        key = next((k for k in _PROMPT_KEYS if raw.get(k)), None)
        if key is None:
            raise ValueError(f"{raw.get('_source', f'{config.prompts} row {i + 1}')}: no "
                             f"prompt field (one of {_PROMPT_KEYS})")
        prompt = raw[key] + (f"\n\n{raw['input']}" if raw.get("input") else "")
        ref = next((str(raw[k]) for k in _REFERENCE_KEYS if raw.get(k)), "")
        rows.append({"id": str(raw.get("id", i)), "prompt": prompt, "reference": ref,
                     "task_type": raw.get("task_type", "writing")})
    return rows[:config.num_prompts] if config.num_prompts is not None else rows


def _per_sample(tokenizer, prompt: str, ids: np.ndarray, think_close: int | None,
                keywords: Sequence[str]) -> dict:
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    hit = np.flatnonzero(ids == think_close) if think_close is not None else []
    think_len = int(hit[0]) + 1 if len(hit) else len(ids)
    block = parse_think_block(text)
    thinking = "\n\n".join(s.text for s in block.segments)
    return {"response": text, "thinking": thinking, "answer": block.answer.strip(),
            "think_len": think_len, "answer_len": len(ids) - think_len,
            "guiding_words": len(keyword_regex(tuple(keywords)).findall(thinking)),
            **diagnostics.response_quality(prompt, text, ids, keywords=keywords)}


def evaluate_model(model, tokenizer, rows: list[dict], config, *, scorer=None, mesh=None):
    """Generates `config.n` responses per row and measures them.

    Args:
      model, tokenizer: the model evaluated.
      rows: prompt rows (`load_prompts`).
      config: the `eval` section.
      scorer: the model that computes LP (the reward, reference perplexity); default `model`.
      mesh: the mesh the models' parameters live on (the sampler's batch follows it), or None.

    Returns:
      (records: one dict per response, metrics: dict of float means).
    """
    special = tk.special_token_ids(tokenizer)
    tokenize = TokenizePrompt(tokenizer, max_prompt_len=config.max_prompt_len)
    prompts = [p for p in (tokenize({**r, "reference": r["reference"] or " "}) for r in rows)
               if p is not None]
    if not prompts:
        raise ValueError(f"every prompt of {config.prompts} is longer than "
                         f"eval.max_prompt_len={config.max_prompt_len} tokens")
    sampler = Sampler.for_tokenizer(model, tokenizer, stop_strings=False, mesh=mesh)
    longest = max(len(p["prompt_ids"]) for p in prompts)
    ro = sample_rollout(sampler, prompts, n=config.n, seq_len=longest + config.max_new_tokens,
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                        top_p=config.top_p, top_k=config.top_k, seed=config.seed,
                        slots=config.sampler_slots())
    by_id = {str(r["id"]): r for r in rows}
    records = []
    for r, ids in enumerate(ro.response_ids):
        src = by_id[prompts[r // config.n]["id"]]
        records.append({"id": src["id"], "sample": r % config.n, "prompt": src["prompt"],
                        "reference": src["reference"], "task_type": src["task_type"],
                        "finish_reason": FinishReason(int(ro.finish_reason[r])).name.lower(),
                        **_per_sample(tokenizer, src["prompt"], ids, special["think_close"],
                                      DEFAULT_KEYWORDS)})
    scored = [r for r, rec in enumerate(records) if rec["reference"].strip()]
    if scored:
        result = score_token_ids(
            scorer or model, tokenizer, [ro.prompt_ids[r] for r in scored],
            [ro.response_ids[r] for r in scored], [ro.reference_ids[r] for r in scored],
            [int(ro.group_ids[r]) for r in scored], [ro.task_types[r] for r in scored],
            config=RewardConfig())
        for j, r in enumerate(scored):
            records[r].update(reward=float(result.reward[j]),
                              reflection_score=float(result.reflection_score[j]),
                              reflection_count=int(result.reflection_count[j]),
                              reference_ppl=float(np.exp(-result.lp_full[j])))
    return records, summarize(records)


def summarize(records: list[dict]) -> dict[str, float]:
    """Means over the records: scored metrics over writing rows, the ground truth over the rows
    that have one (`truth/*`, see train/diagnostics.py), math accuracy separately."""
    def mean(key, rows):
        vals = [r[key] for r in rows if key in r and np.isfinite(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    writing = [r for r in records if r["task_type"] != TaskType.MATH.value]
    math = [r for r in records if r["task_type"] == TaskType.MATH.value]
    out = {"responses": float(len(records)),
           "truncated_frac": float(np.mean([r["finish_reason"] == "length" for r in records])),
           "think_closed": mean("think_closed", records),
           "think_len": mean("think_len", records), "answer_len": mean("answer_len", records),
           "guiding_words": mean("guiding_words", records),
           "repeat_ngram": mean("repeat_ngram", records),
           "repeat_paragraph": mean("repeat_paragraph", records),
           "reward": mean("reward", writing), "reflection_score": mean("reflection_score", writing),
           "reflection_count": mean("reflection_count", writing),
           "reference_ppl": mean("reference_ppl", writing)}
    if any("truth/correct" in r for r in records):
        out.update({name: mean(f"truth/{k}", records) for k, name in TRUTH_KEYS.items()})
        out["truth_responses"] = float(sum("truth/correct" in r for r in records))
    if math:
        out["math_acc"] = mean("reward", math)
        out["math_responses"] = float(len(math))
    return out


# Measures `verdict` judges: key, label, higher is better, key of its response count.
_VERDICT = (("answer_acc", "held-out answer accuracy", True, "truth_responses"),
            ("well_formed", "well-formed answers", True, "truth_responses"),
            ("math_acc", "math accuracy", True, "math_responses"),
            ("truncated_frac", "truncated responses", False, "responses"))


def verdict(before: dict[str, float], after: dict[str, float], *,
            z: float = 2.0) -> tuple[bool, list[str]]:
    """Whether `after` (e.g. the GRPO model) is worse than `before` (the SFT model) on what the
    reward does not measure, and one line per measure that says so.

    Each measure is a share of n responses, so a change is judged against its sampling noise:
    `z` standard errors of the difference of two shares, sqrt(a(1-a)/n_a + b(1-b)/n_b)
    (responses to one prompt are correlated, so this understates the noise a little). Worse:
    a share that fell by more than that, or a truncation rate that rose by more than that and
    past 10 %; "better" likewise; anything smaller is "within noise". A measure absent from
    either side is not judged; without response counts (older results) every fall is worse.
    """
    lines, worse = [], False
    for key, label, higher_is_better, count in _VERDICT:
        if key not in before or key not in after:
            continue
        a, b = before[key], after[key]
        na, nb = before.get(count), after.get(count)
        noise = z * float(np.sqrt(a * (1 - a) / na + b * (1 - b) / nb)) if na and nb else 0.0
        gain = (b - a) if higher_is_better else (a - b)
        bad = gain < -noise and (higher_is_better or b > 0.1)
        worse |= bad
        if na and nb:
            tag = ("WORSE" if bad else "better" if gain > noise else
                   "unchanged" if gain == 0 else "within noise")
            tail = (f"  ({b - a:+.3f}; noise ±{noise:.3f} at {z:g} s.e., "
                    f"n={int(na)}/{int(nb)}: {tag})")
        else:
            tail = "  (WORSE)" if bad else ""
        lines.append(f"{label}: {a:.3f} -> {b:.3f}{tail}")
    return worse, lines


def compare(sources: dict[str, str], config: Eval, out: str, *, overwrite: bool = False,
            mesh=None) -> dict:
    """Evaluates every source on the same prompts and writes `out` as a whole (report.py).

    Args:
      sources: label -> an HF directory or a trainer's run directory.
      config: the `eval` section; `scorer` names a label whose model scores every source.
      out: the output directory: refused when it holds files, unless `overwrite`.
    Returns:
      label -> metrics.
    """
    check_writable(out, overwrite=overwrite, what="evaluation", flag="--overwrite")
    rows = load_prompts(config)
    mesh = mesh or build.make_mesh(MeshSection())  # every source and its sampler on one mesh
    models = {label: build.load_source(path, dtype=config.dtype, mesh=mesh)
              for label, path in sources.items()}
    if config.scorer is not None and config.scorer not in models:
        raise ValueError(f"eval.scorer={config.scorer!r} is not one of the sources {list(models)}")
    results, per_model = {}, {}
    for label, (model, tokenizer) in models.items():
        t0 = time.perf_counter()
        scorer = None if config.scorer is None else models[config.scorer][0]
        records, metrics = evaluate_model(model, tokenizer, rows, config, scorer=scorer,
                                          mesh=mesh)
        metrics["prompts_per_s"] = len(rows) / (time.perf_counter() - t0)
        results[label], per_model[label] = metrics, records
    with output_dir(out, overwrite=overwrite, what="evaluation", flag="--overwrite") as tmp:
        if tmp is not None:
            report.write(tmp, results, per_model, sources)
    return results
