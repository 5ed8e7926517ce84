"""Evaluation: generate for a prompt set, score intrinsically, compare models side by side.

    python -m opera_jax.eval --checkpoint RUN_OR_HF_DIR [--checkpoint OTHER] [--prompts FILE]

Each source is an HF directory (config.json) or a training run (its Orbax checkpoints, restored
onto the devices at hand). Prompts: the embedded held-out toy prompts by default, or a JSONL
file in the shape of public writing benchmarks: the prompt under `prompt`, `query` or
`instruction` (an `input` field is appended), an optional reference under `reference`,
`answer` or `output`, an optional `id` and `task_type`.

Writes to `--out`: `responses_<label>.jsonl` (id, prompt, response, thinking, answer,
finish_reason and the per-sample metrics; ready for an external judge), `metrics.json`, and
`report.md` with a table and `plots.png`. Intrinsic metrics per model: the OPERA reward and its
reflection score, the reference perplexity given prompt + response (exp(−LP(c_full))), think
and answer lengths in tokens, guiding-word counts, the share cut at the length limit and the
accuracy on `math` prompts. Rows without a reference are generated and measured but not scored.
By default every model scores its own responses (as in training); `scorer` names one source
to score all of them with, a common yardstick for a comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import ml_collections
import numpy as np

from opera_jax import tokenizer as tk
from opera_jax.data import toy_domain
from opera_jax.data.jsonl import read_jsonl, write_jsonl
from opera_jax.reward import RewardConfig, TaskType, score_token_ids
from opera_jax.reward.segments import parse_think_block
from opera_jax.sampling import FinishReason, Sampler, default_eos_ids, token_bytes
from opera_jax.train.rollout import TokenizePrompt, keyword_pattern, sample_rollout

log = logging.getLogger(__name__)

_PROMPT_KEYS = ("prompt", "query", "instruction")
_REFERENCE_KEYS = ("reference", "answer", "output")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = "eval"
    c.prompts = ""            # JSONL file; "" = the embedded held-out toy prompts
    c.num_prompts = 32        # first N prompts (0 = all)
    c.n = 2                   # responses per prompt (rank needs >= 2)
    c.max_new_tokens = 192
    c.max_prompt_len = 512
    c.temperature = 0.6
    c.top_p = 0.95
    c.top_k = 20
    c.seed = 0
    c.scorer = "self"         # self | a source label: who computes LP for every model
    c.keywords = ("But", "Wait", "Hmm", "However", "Wait a minute")
    c.dtype = "float32"
    return c


def load_prompts(config: ml_collections.ConfigDict) -> list[dict]:
    """Prompt rows (id, prompt, reference, task_type) from `config.prompts` or the toy set."""
    if not config.prompts:
        return toy_domain.prompt_rows(config.num_prompts or 32, seed=12345, held_out=True)
    rows = []
    for i, raw in enumerate(read_jsonl(config.prompts, on_error="raise")):
        key = next((k for k in _PROMPT_KEYS if raw.get(k)), None)
        if key is None:
            raise ValueError(f"{config.prompts}:{raw.get('_line', i + 1)}: no prompt field "
                             f"(one of {_PROMPT_KEYS})")
        prompt = raw[key] + (f"\n\n{raw['input']}" if raw.get("input") else "")
        ref = next((str(raw[k]) for k in _REFERENCE_KEYS if raw.get(k)), "")
        rows.append({"id": str(raw.get("id", i)), "prompt": prompt, "reference": ref,
                     "task_type": raw.get("task_type", "writing")})
    return rows[:config.num_prompts] if config.num_prompts else rows


def load_source(source: str, *, dtype: str = "float32"):
    """(model, tokenizer) from an HF directory or a training run's checkpoints."""
    from opera_jax.export import load_checkpoint
    from opera_jax.model.hf_io import load_pretrained

    if os.path.isfile(os.path.join(source, "config.json")):
        return load_pretrained(source, dtype=dtype)
    model, tokenizer, _, step = load_checkpoint(source, dtype=dtype)
    log.info("%s: checkpoint step %d", source, step)
    return model, tokenizer


def _per_sample(tokenizer, ids: np.ndarray, think_close: int | None, keywords) -> dict:
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    hit = np.flatnonzero(ids == think_close) if think_close is not None else []
    think_len = int(hit[0]) + 1 if len(hit) else len(ids)
    block = parse_think_block(tokenizer.decode(ids.tolist()))
    thinking = "\n\n".join(s.text for s in block.segments)
    return {"response": text, "thinking": thinking, "answer": block.answer.strip(),
            "think_len": think_len, "answer_len": len(ids) - think_len,
            "guiding_words": len(keywords.findall(thinking))}


def evaluate_model(model, tokenizer, rows: list[dict], config, *, scorer=None):
    """Generates `config.n` responses per row and measures them.

    Returns:
      (records: one dict per response, metrics: dict of float means).
    """
    special = tk.special_token_ids(tokenizer)
    tokenize = TokenizePrompt(tokenizer, max_prompt_len=config.max_prompt_len)
    prompts = [p for p in (tokenize({**r, "reference": r["reference"] or " "}) for r in rows)
               if p is not None]
    sampler = Sampler(model, token_pieces=token_bytes(tokenizer, model.config.vocab_size),
                      eos_ids=default_eos_ids(tokenizer), pad_id=special["pad"])
    longest = max(len(p["prompt_ids"]) for p in prompts)
    ro = sample_rollout(sampler, prompts, n=config.n, seq_len=longest + config.max_new_tokens,
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                        top_p=config.top_p, top_k=config.top_k, seed=config.seed)
    keywords = keyword_pattern(config.keywords)
    by_id = {str(r["id"]): r for r in rows}
    records = []
    for r, ids in enumerate(ro.response_ids):
        src = by_id[prompts[r // config.n]["id"]]
        records.append({"id": src["id"], "sample": r % config.n, "prompt": src["prompt"],
                        "reference": src["reference"], "task_type": src["task_type"],
                        "finish_reason": FinishReason(int(ro.finish_reason[r])).name.lower(),
                        **_per_sample(tokenizer, ids, special["think_close"], keywords)})
    scored = [r for r, rec in enumerate(records) if rec["reference"].strip()]
    if scored:
        result = score_token_ids(
            scorer or model, tokenizer, [ro.prompt_ids[r] for r in scored],
            [ro.response_ids[r] for r in scored], [ro.reference_ids[r] for r in scored],
            [int(ro.group_ids[r]) for r in scored], [ro.task_types[r] for r in scored],
            config=RewardConfig(keywords=tuple(config.keywords)))
        for j, r in enumerate(scored):
            records[r].update(reward=float(result.reward[j]),
                              reflection_score=float(result.reflection_score[j]),
                              reflection_count=int(result.reflection_count[j]),
                              reference_ppl=float(np.exp(-result.lp_full[j])))
    return records, summarize(records)


def summarize(records: list[dict]) -> dict[str, float]:
    """Means over the records; scored metrics over writing rows, math accuracy separately."""
    def mean(key, rows):
        vals = [r[key] for r in rows if key in r and np.isfinite(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    writing = [r for r in records if r["task_type"] != TaskType.MATH.value]
    math = [r for r in records if r["task_type"] == TaskType.MATH.value]
    out = {"responses": float(len(records)),
           "truncated_frac": float(np.mean([r["finish_reason"] == "length" for r in records])),
           "think_len": mean("think_len", records), "answer_len": mean("answer_len", records),
           "guiding_words": mean("guiding_words", records),
           "reward": mean("reward", writing), "reflection_score": mean("reflection_score", writing),
           "reflection_count": mean("reflection_count", writing),
           "reference_ppl": mean("reference_ppl", writing)}
    if math:
        out["math_acc"] = mean("reward", math)
    return out


def compare(sources: dict[str, str], config: ml_collections.ConfigDict) -> dict:
    """Evaluates every source on the same prompts; writes the files named in the docstring."""
    os.makedirs(config.out, exist_ok=True)
    rows = load_prompts(config)
    models = {label: load_source(path, dtype=config.dtype) for label, path in sources.items()}
    if config.scorer != "self" and config.scorer not in models:
        raise ValueError(f"eval.scorer={config.scorer!r}: not 'self' nor one of {list(models)}")
    results, per_model = {}, {}
    for label, (model, tokenizer) in models.items():
        t0 = time.perf_counter()
        scorer = None if config.scorer == "self" else models[config.scorer][0]
        records, metrics = evaluate_model(model, tokenizer, rows, config, scorer=scorer)
        metrics["prompts_per_s"] = len(rows) / (time.perf_counter() - t0)
        write_jsonl(os.path.join(config.out, f"responses_{label}.jsonl"), records)
        results[label], per_model[label] = metrics, records
    with open(os.path.join(config.out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    write_report(config.out, results, per_model, sources)
    return results


def write_report(out: str, results: dict, per_model: dict, sources: dict) -> str:
    """report.md (a table, one column per model) and plots.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    keys = list(dict.fromkeys(k for m in results.values() for k in m))
    lines = ["# Evaluation", "", "| metric | " + " | ".join(labels) + " |",
             "| --- |" + " ---: |" * len(labels)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{results[m].get(k, float('nan')):.4g}"
                                              for m in labels) + " |")
    lines += ["", "Sources: " + ", ".join(f"`{m}` = {sources[m]}" for m in labels), "",
              "![plots](plots.png)", ""]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for m in labels:
        counts = [r["reflection_count"] for r in per_model[m] if "reflection_count" in r]
        ppl = [r["reference_ppl"] for r in per_model[m] if "reference_ppl" in r]
        axes[0].hist(counts, bins=np.arange(-0.5, max(counts + [1]) + 1.5), alpha=0.5, label=m)
        axes[1].hist(ppl, bins=20, alpha=0.5, label=m)
    axes[0].set_title("counted reflections per response")
    axes[1].set_title("reference perplexity given the response")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "plots.png"), dpi=90)
    plt.close(fig)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv=None) -> None:
    defaults = default_config()
    p = argparse.ArgumentParser(prog="python -m opera_jax.eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", action="append", required=True,
                   help="an HF dir or a training run dir; give two to compare")
    p.add_argument("--label", action="append", help="a name per --checkpoint")
    for key in ("out", "prompts", "num_prompts", "n", "max_new_tokens", "temperature", "top_p",
                "top_k", "seed", "scorer", "dtype"):
        p.add_argument(f"--{key.replace('_', '-')}", type=type(defaults[key]), default=defaults[key])
    args = p.parse_args(argv)
    from opera_jax import distributed

    distributed.initialize()  # no-op for a single process
    labels = args.label or [os.path.basename(os.path.normpath(c)) or c for c in args.checkpoint]
    if len(labels) != len(args.checkpoint) or len(set(labels)) != len(labels):
        p.error("give one distinct --label per --checkpoint")
    config = default_config()
    for key in config:
        if hasattr(args, key):
            config[key] = getattr(args, key)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results = compare(dict(zip(labels, args.checkpoint)), config)
    print(open(os.path.join(config.out, "report.md")).read())
    del results


if __name__ == "__main__":
    main()
