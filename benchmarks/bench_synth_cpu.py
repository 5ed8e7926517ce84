"""Cold-start synthesis on the CPU: batched vs the published one-prompt-one-candidate procedure.

    python benchmarks/bench_synth_cpu.py [--prompts=32] [--batch_prompts=32] [--teacher_dir=DIR]
                                         [--notransformers]

The comparison only means something if the teacher really writes guiding words, so the teacher
is a tiny Qwen3 trained from scratch on the embedded toy domain (opera_jax/train/sft.py with
configs/sft_tiny.py; half of the prompts wrapped by `wrap_prompt`, as the warm-up stage does),
exported to --teacher_dir and reused by later runs (retrained when the wrapper text changed).
Any other HF Qwen3 directory works as it is.

All modes synthesise the same toy prompts with the same seed and settings (configs/
synth_tiny.py: B = 4 candidates, ≤ 20 reflective states, T 0.6, top-p 0.95, top-k 20):
  transformers  the published stack: the same procedure, one prompt and one candidate per
              call, sampled by PyTorch `transformers.generate` and each candidate scored by
              one more teacher forward pass (benchmarks/hf_synth_baseline.py; torch's random
              numbers, so its records are its own);
  sequential  batch_prompts=1, batch_candidates=False: one prompt at a time, every candidate
              its own call of our sampler (the published procedure on our sampler);
  candidates  batch_prompts=1, batch_candidates=True: one prompt at a time, its B candidates
              in one call (one prefill of the context);
  batched     batch_prompts=P: every in-flight prompt advances one phase per round, all
              candidates of all prompts in shared sampler calls (at most four per round);
  chunked     the same, calls cut to --rows_per_call rows of similar context length (on a CPU
              a row costs nearly the same in any batch, so smaller calls waste less on prompt
              padding and a shorter cache).
Batched modes narrow each call's batch as its rows finish (`synth.compact`).
Each mode runs once cold (compiling), then --reps times timed, every shape compiled
(prompts/s = prompts / wall seconds, writing records included; the median is reported). The
modes' records are compared with the sequential ones: per-row seeds make them equal.
"""

import dataclasses
import json
import logging
import os
import tempfile
import time

import jax
import numpy as np
import transformers
from absl import app, flags
from flax import nnx

from opera_jax import cli, export_hf
from opera_jax.config import build
from opera_jax.config.runs import parse
from opera_jax.config.setups import sft_tiny, synth_tiny
from opera_jax.data import toy_domain
from opera_jax.data.jsonl import write_jsonl
from opera_jax.synth import Scheduler, read_records, records_path, synthesize, wrap_prompt
from opera_jax.synth.stage import read_prompts
from opera_jax.synth.wrapper import WRAPPER
from opera_jax.tokenizer import default_eos_ids, special_token_ids
from opera_jax.train import sft

FLAGS = flags.FLAGS
flags.DEFINE_integer("prompts", 32, "toy prompts (held-out scenes) to synthesise")
flags.DEFINE_integer("batch_prompts", 32, "prompts in flight in the batched modes")
flags.DEFINE_integer("rows_per_call", 32, "the chunked batched mode's cap on rows per call")
flags.DEFINE_integer("reps", 3, "timed runs per mode (after a cold one)")
flags.DEFINE_string("teacher_dir", os.path.join(tempfile.gettempdir(), "opera_toy_teacher"),
                    "HF directory of the teacher (trained there when missing)")
flags.DEFINE_integer("sft_steps", 400, "SFT steps of a teacher this script trains")
flags.DEFINE_integer("sft_examples", 2048, "toy examples of a teacher this script trains")
flags.DEFINE_bool("transformers", True, "also run the published stack (PyTorch transformers, "
                  "~0.1 s per prompt; --notransformers skips it)")

MARKER = "bench_synth_teacher.json"  # written next to a teacher this script trained


def needs_training(teacher_dir: str) -> bool:
    """No checkpoint there, or one this script trained with another wrapper text."""
    if not os.path.exists(os.path.join(teacher_dir, "config.json")):
        return True
    marker = os.path.join(teacher_dir, MARKER)
    if not os.path.exists(marker):
        return False  # someone else's teacher: used as it is
    with open(marker, encoding="utf-8") as f:
        return json.load(f)["wrapper"] != WRAPPER


def train_teacher(out_dir: str, *, steps: int, examples: int, seed: int = 0) -> None:
    """SFT of the tiny preset on toy examples (half with the synthesis wrapper); HF export."""
    work = tempfile.mkdtemp(prefix="synth_teacher_")
    rows = toy_domain.examples(examples, seed=seed)
    rng = np.random.default_rng(seed)
    for r in rows:
        if rng.random() < 0.5:
            r["prompt"] = wrap_prompt(r["prompt"])
    c = sft_tiny()
    c.workdir = work
    c.data.path = write_jsonl(os.path.join(work, "teacher_sft.jsonl"), rows)
    c.sft.seq_len = 384
    c.sft.steps = steps
    c.sft.log_every = max(1, steps // 10)
    c.sft.optim.warmup_frac = min(1.0, 20 / steps)  # 20 warm-up steps
    c.checkpoint.every = steps
    c.checkpoint.async_save = False
    c.model.dtype = "float32"
    c.mesh.num_devices = 1
    run = parse(c)
    t0 = time.perf_counter()
    state = sft.train(run)
    graphdef, _ = build.abstract_params(run.model, build.make_mesh(run.mesh))
    model = nnx.merge(graphdef, state.params)
    export_hf(model, out_dir, tokenizer=build.load_model_tokenizer(run.model), overwrite=True)
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        json.dump({"wrapper": WRAPPER, "steps": steps, "examples": examples}, f)
    print(f"teacher: {steps} SFT steps in {time.perf_counter() - t0:.0f} s -> {out_dir}",
          flush=True)


def synth_run(prompts: str, teacher_dir: str, workdir: str, **synth):
    """configs/synth_tiny.py's run with the teacher at `teacher_dir`, on `prompts`."""
    c = synth_tiny()
    c.workdir, c.data.path = workdir, prompts
    c.model.hf_dir, c.model.preset = teacher_dir, None
    c.synth.progress = False
    for key, value in synth.items():
        c.synth[key] = value
    return parse(c)


def run_mode(teacher, prompts: str, out_dir: str, name: str, *, teacher_dir: str,
             reps: int, **synth) -> dict:
    """One cold run (compiles), then `reps` timed runs of one mode over the same prompts."""
    summaries = []
    for rep in range(reps + 1):
        run = synth_run(prompts, teacher_dir, os.path.join(out_dir, f"{name}_{rep}"), **synth)
        summaries.append(synthesize(run, teacher=teacher))
    timed = sorted(summaries[1:], key=lambda x: x["seconds"])
    return {"cold": summaries[0], "median": timed[len(timed) // 2], "best": timed[0],
            "records": read_records(records_path(run))}


def run_transformers(prompts: str, out_dir: str, *, teacher_dir: str, reps: int) -> dict:
    """The published stack (hf_synth_baseline.py) over the same prompts: `run_mode`'s result."""
    # Lazy: PyTorch is no dependency of opera_jax, and only this mode needs it.
    import torch

    from hf_synth_baseline import TransformersSampler

    run = synth_run(prompts, teacher_dir, os.path.join(out_dir, "transformers"))
    settings = dataclasses.replace(run.synth, batch_prompts=1, batch_candidates=False,
                                   compact=False)
    tok = build.load_model_tokenizer(run.model)
    sampler = TransformersSampler(teacher_dir, tok, eos_ids=default_eos_ids(tok),
                                  pad_id=special_token_ids(tok)["pad"] or 0)
    rows, _, _ = read_prompts(run, tok)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    summaries, records = [], []
    for _ in range(reps + 1):
        scheduler = Scheduler(sampler, tok, settings)
        records = []
        start = time.perf_counter()
        scheduler.run(rows, on_done=lambda job: records.append(job.record()))
        seconds = time.perf_counter() - start
        summaries.append({"seconds": seconds, "prompts_per_s": len(records) / seconds,
                          "written": len(records),
                          "mean_reflections": float(np.mean([r["reflection_count"]
                                                             for r in records])),
                          **dataclasses.asdict(scheduler.counters)})
    timed = sorted(summaries[1:], key=lambda x: x["seconds"])
    return {"cold": summaries[0], "median": timed[len(timed) // 2], "best": timed[0],
            "records": records}


def bench(args) -> None:
    # Every synthesis run logs its summary at INFO; the table below holds what matters.
    logging.getLogger("opera_jax").setLevel(logging.WARNING)
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, "
          f"{args.prompts} prompts", flush=True)

    if needs_training(args.teacher_dir):
        train_teacher(args.teacher_dir, steps=args.sft_steps, examples=args.sft_examples)
    teacher = build.load_source(args.teacher_dir)
    out_dir = tempfile.mkdtemp(prefix="bench_synth_")
    prompts = f"toy:heldout:{args.prompts}:11"  # held-out toy prompts, seed 11

    bp, rpc = args.batch_prompts, args.rows_per_call
    modes = {
        "sequential, published procedure on our sampler": dict(
            batch_prompts=1, batch_candidates=False, rows_per_call=None, compact=False),
        "1 prompt, B candidates per call": dict(batch_prompts=1, batch_candidates=True,
                                                rows_per_call=None, compact=False),
        f"batched, {bp} prompts in flight": dict(batch_prompts=bp, batch_candidates=True,
                                                 rows_per_call=None),
        f"batched, {bp} in flight, <= {rpc} rows per call": dict(
            batch_prompts=bp, batch_candidates=True, rows_per_call=rpc),
    }
    results = {name: run_mode(teacher, prompts, out_dir, f"mode{i}", reps=args.reps,
                              teacher_dir=args.teacher_dir, **synth)
               for i, (name, synth) in enumerate(modes.items())}
    hf = None
    if args.transformers:
        hf = run_transformers(prompts, out_dir, teacher_dir=args.teacher_dir, reps=args.reps)

    base = results["sequential, published procedure on our sampler"]
    key = lambda r: (r["id"], r["thinking"], r["output"])  # noqa: E731
    print("| mode | prompts/s (median) | best | vs sequential | vs transformers | cold s | "
          "sampler calls | rounds | tokens generated | decode steps | prefill tokens | "
          "identical records |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = ([("sequential, published stack (transformers)", hf)] if hf else []) + list(
        results.items())
    for name, r in rows:
        same = len({key(x) for x in base["records"]} & {key(x) for x in r["records"]})
        same = "own RNG" if r is hf else f"{same}/{len(base['records'])}"
        m = r["median"]
        vs_hf = f"{m['prompts_per_s'] / hf['median']['prompts_per_s']:.1f}x" if hf else "-"
        print(f"| {name} | {m['prompts_per_s']:.1f} | {r['best']['prompts_per_s']:.1f} | "
              f"{m['prompts_per_s'] / base['median']['prompts_per_s']:.2f}x | {vs_hf} | "
              f"{r['cold']['seconds']:.1f} | {m['sampler_calls']} | {m['rounds']} | "
              f"{m['generated_tokens']:,} | {m['decode_steps']:,} | {m['prefill_tokens']:,} | "
              f"{same} |")
    m = base["median"]
    print(f"per prompt: {m['mean_reflections']:.2f} reflective states, "
          f"{m['thinking_tokens']['mean']:.0f} thinking tokens, "
          f"{m['generated_tokens'] / m['written']:.0f} tokens generated (candidates included);"
          f" think_end {m['think_end']}")
    print("decode steps: decode-loop iterations, each call running until its longest row; "
          "on a device whose step costs the same for 1 or 128 rows they set the time.")
    example = max(results[f"batched, {bp} prompts in flight"]["records"],
                  key=lambda r: r["reflection_count"])
    print("example record:", json.dumps({k: example[k] for k in (
        "prompt", "thinking", "output", "reflection_count", "chosen_ppl", "rejected_ppls")},
        ensure_ascii=False, indent=1))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run_main(lambda: bench(FLAGS))


if __name__ == "__main__":
    app.run(main)
