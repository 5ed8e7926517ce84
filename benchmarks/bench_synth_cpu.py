"""Cold-start synthesis on the CPU: batched vs the published one-prompt-one-candidate procedure.

    python benchmarks/bench_synth_cpu.py [--prompts 32] [--batch-prompts 32] [--teacher-dir DIR]
                                         [--no-transformers]

The comparison only means something if the teacher really writes guiding words, so the teacher
is a tiny Qwen3 trained from scratch on the embedded toy domain (opera_jax/train/sft.py with
configs/sft_tiny.py; half of the prompts wrapped by `wrap_prompt`, as the warm-up stage does),
exported to --teacher-dir and reused by later runs (retrained when the wrapper text changed).
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
  chunked     the same, calls cut to --rows-per-call rows of similar context length (on a CPU
              a row costs nearly the same in any batch, so smaller calls waste less on prompt
              padding and a shorter cache).
Batched modes narrow each call's batch as its rows finish (`synth.compact`).
Each mode runs once cold (compiling), then --reps times timed, every shape compiled
(prompts/s = prompts / wall seconds, writing records included; the median is reported). The
modes' records are compared with the sequential ones: per-row seeds make them equal.
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from opera_jax import export_hf, load_pretrained, make_mesh
from opera_jax.data import toy_domain
from opera_jax.data.jsonl import read_jsonl, write_jsonl
from opera_jax.synth import read_records, synthesize, wrap_prompt
from opera_jax.synth.scheduler import Batching
from opera_jax.synth.wrapper import WRAPPER
from opera_jax.train import state as state_lib
from opera_jax.train.cli import load_config_file
from opera_jax.train.sft import train

HERE = os.path.dirname(os.path.abspath(__file__))
SFT_CONFIG = os.path.join(HERE, os.pardir, "configs", "sft_tiny.py")
SYNTH_CONFIG = os.path.join(HERE, os.pardir, "configs", "synth_tiny.py")
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
    c = load_config_file(SFT_CONFIG)
    c.workdir = work
    c.data.path = write_jsonl(os.path.join(work, "teacher_sft.jsonl"), rows)
    c.data.write_toy_rows = 0
    c.data.seq_len = 384
    c.sft.steps = steps
    c.sft.log_every = max(1, steps // 10)
    c.checkpoint.every = steps
    c.checkpoint.async_save = False
    c.model.dtype = "float32"
    c.mesh.num_devices = 1
    c.optim.warmup_steps = 20
    t0 = time.perf_counter()
    state = train(c)
    graphdef, _ = state_lib.abstract_params(c.model, make_mesh(devices=jax.devices()[:1]))
    model = nnx.merge(graphdef, state.params)
    export_hf(model, out_dir, tokenizer=state_lib.model_tokenizer(c.model))
    with open(os.path.join(out_dir, MARKER), "w", encoding="utf-8") as f:
        json.dump({"wrapper": WRAPPER, "steps": steps, "examples": examples}, f)
    print(f"teacher: {steps} SFT steps in {time.perf_counter() - t0:.0f} s -> {out_dir}",
          flush=True)


def run_mode(teacher, prompts_path: str, out_dir: str, name: str, *, teacher_dir: str,
             reps: int, **synth) -> dict:
    """One cold run (compiles), then `reps` timed runs of one mode over the same prompts."""
    summaries = []
    for rep in range(reps + 1):
        c = load_config_file(SYNTH_CONFIG)
        c.output = os.path.join(out_dir, f"{name}_{rep}.jsonl")
        c.input = prompts_path
        c.write_toy_prompts = 0
        c.progress = False
        c.teacher.hf_dir = teacher_dir
        for key, value in synth.items():
            c.synth[key] = value
        summaries.append(synthesize(c, teacher=teacher))
    timed = sorted(summaries[1:], key=lambda x: x["seconds"])
    return {"cold": summaries[0], "median": timed[len(timed) // 2], "best": timed[0],
            "records": read_records(c.output)}


def run_transformers(prompts_path: str, *, teacher_dir: str, reps: int) -> dict:
    """The published stack (hf_synth_baseline.py) over the same prompts: `run_mode`'s result."""
    import torch

    from hf_synth_baseline import TransformersSampler
    from opera_jax.sampling import default_eos_ids
    from opera_jax.synth.scheduler import Scheduler
    from opera_jax.synth.stage import settings_from
    from opera_jax.tokenizer import load_tokenizer, special_token_ids

    c = load_config_file(SYNTH_CONFIG)
    settings, _ = settings_from(c)
    tok = load_tokenizer(teacher_dir)
    sampler = TransformersSampler(teacher_dir, tok, eos_ids=default_eos_ids(tok),
                                  pad_id=special_token_ids(tok)["pad"] or 0)
    rows = read_jsonl(prompts_path, required=("id", "prompt", "reference"))
    rows = [{k: v for k, v in r.items() if k != "_source"} for r in rows]
    print(f"transformers {transformers_version()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    summaries, records = [], []
    for _ in range(reps + 1):
        scheduler = Scheduler(sampler, tok, settings,
                              Batching(batch_prompts=1, batch_candidates=False, compact=False))
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


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-prompts", type=int, default=32)
    p.add_argument("--rows-per-call", type=int, default=32,
                   help="the chunked batched variant's cap on rows per sampler call")
    p.add_argument("--reps", type=int, default=3, help="timed runs per mode (after a cold one)")
    p.add_argument("--teacher-dir", default=os.path.join(tempfile.gettempdir(),
                                                         "opera_toy_teacher"))
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--sft-examples", type=int, default=2048)
    p.add_argument("--no-transformers", action="store_true",
                   help="skip the published stack (PyTorch transformers, ~0.1 s per prompt)")
    args = p.parse_args()
    print(f"{jax.devices()[0].platform} x{jax.device_count()}, jax {jax.__version__}, "
          f"{args.prompts} prompts", flush=True)

    if needs_training(args.teacher_dir):
        train_teacher(args.teacher_dir, steps=args.sft_steps, examples=args.sft_examples)
    teacher = load_pretrained(args.teacher_dir)
    out_dir = tempfile.mkdtemp(prefix="bench_synth_")
    prompts = write_jsonl(os.path.join(out_dir, "prompts.jsonl"),
                          toy_domain.prompt_rows(args.prompts, seed=11, held_out=True))

    bp, rpc = args.batch_prompts, args.rows_per_call
    modes = {
        "sequential, published procedure on our sampler": dict(batch_prompts=1, batch_candidates=False,
                                       rows_per_call=0, compact=False),
        "1 prompt, B candidates per call": dict(batch_prompts=1, batch_candidates=True,
                                                rows_per_call=0, compact=False),
        f"batched, {bp} prompts in flight": dict(batch_prompts=bp, batch_candidates=True,
                                                 rows_per_call=0),
        f"batched, {bp} in flight, <= {rpc} rows per call": dict(
            batch_prompts=bp, batch_candidates=True, rows_per_call=rpc),
    }
    results = {name: run_mode(teacher, prompts, out_dir, f"mode{i}", reps=args.reps,
                              teacher_dir=args.teacher_dir, **synth)
               for i, (name, synth) in enumerate(modes.items())}
    hf = None
    if not args.no_transformers:
        hf = run_transformers(prompts, teacher_dir=args.teacher_dir, reps=args.reps)

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
