"""Sampler throughput on the CPU, tiny preset: ours vs `transformers.generate`.

    python benchmarks/bench_sampling_cpu.py                      # batch 1, 16, 64
    python benchmarks/bench_sampling_cpu.py --batches=1,4 --new_tokens=32

Random-weight tiny Qwen3 (float32), random prompts of `--prompt_len` tokens, every row decodes
exactly `--new_tokens` tokens (no EOS). Generated tokens per second of wall time, compile
excluded (one warm-up call per shape), median of `--reps` calls. Variants:
  sample      temperature 1, no filters (the plain RL rollout);
  synthesis   temperature 0.6, top-p 0.95, top-k 20 and five stop strings that never fire
              (the cold-start settings; measures the cost of filtering and stop matching);
  hf          transformers `generate`, same weights, do_sample=True, temperature 1, no filters.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from absl import app, flags

import opera_jax
from opera_jax.sampling import Sampler
from opera_jax.tokenizer import load_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "16", "64"], "batch sizes (prompts per call)")
flags.DEFINE_integer("prompt_len", 64, "prompt tokens")
flags.DEFINE_integer("new_tokens", 128, "tokens decoded per row")
flags.DEFINE_integer("reps", 3, "timed calls per variant")
flags.DEFINE_bool("hf", True, "also time transformers generate (--nohf: ours only)")

STOPS = ("\x00Wait", "\x00But", "\x00Hmm", "\x00Let me think", "\x00</think>")  # never fire


def median_time(fn, reps: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # ---- model: one random HF checkpoint, loaded by both sides ----
    torch.manual_seed(0)
    cfg = opera_jax.Qwen3Config.preset("tiny")
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "model_type")})
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    load_tokenizer(None).save_pretrained(path)
    model, tok = opera_jax.load_pretrained(path)
    # No EOS ids: every row decodes exactly `new_tokens` tokens.
    sampler = Sampler.for_tokenizer(model, tok, eos_ids=())

    print(f"devices: {jax.devices()}; torch threads: {torch.get_num_threads()}; "
          f"cpu cores: {os.cpu_count()}")
    print(f"tiny preset, prompt {FLAGS.prompt_len}, {FLAGS.new_tokens} new tokens, "
          f"median of {FLAGS.reps}")
    rows = []
    rng = np.random.default_rng(0)
    for b in map(int, FLAGS.batches):
        prompts = rng.integers(0, 1000, size=(b, FLAGS.prompt_len)).tolist()
        new = FLAGS.new_tokens

        def ours(**kw):
            out = sampler.sample(prompts, max_new_tokens=new, seed=1, **kw)
            assert (out.lengths == new).all()

        t = median_time(lambda: ours(temperature=1.0), FLAGS.reps)
        rows.append((b, "sample", b * new / t, t))
        t = median_time(lambda: ours(temperature=0.6, top_p=0.95, top_k=20, stop=STOPS),
                        FLAGS.reps)
        rows.append((b, "synthesis", b * new / t, t))
        if FLAGS.hf:
            ids = torch.tensor(prompts)

            def theirs():
                with torch.no_grad():
                    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                      max_new_tokens=new, min_new_tokens=new,
                                      pad_token_id=tok.pad_token_id)
                assert out.shape == (b, FLAGS.prompt_len + new)

            t = median_time(theirs, max(1, FLAGS.reps - 1))
            rows.append((b, "hf", b * new / t, t))

    print("\n| batch | variant | tokens/s | seconds per call |")
    print("| ---: | --- | ---: | ---: |")
    for b, name, tps, t in rows:
        print(f"| {b} | {name} | {tps:,.0f} | {t:.3f} |")


if __name__ == "__main__":
    app.run(main)
