"""Sampler on a GPU: correctness first, then tokens/s against `transformers.generate`.

    python benchmarks/bench_sampling_gpu.py                       # on the H100 / H200
    python benchmarks/bench_sampling_gpu.py --preset=tiny --new_tokens=16 --batches=1,4 \\
        --check_preset=tiny                                        # dry run on a CPU

Expected run time on an H100/H200: ~4-6 min, most of it compiling (6 sampler programs for
the 28-layer model, 3 for the check model) and HF batch 1 (~11 s per call); use timeout 600.

1. Checks (float32, matmul precision "highest", TF32 off): a random untied `--check_preset`
   model cut to `--check_layers` layers (real widths, heads and vocabulary), whose final-norm
   scale is raised so its logits have std ~3 (random init gives nearly uniform distributions,
   which would hide bugs), exported with `export_hf` and loaded by `transformers`.
   Greedy: our 32 tokens == HF `generate`'s, batch 3, prompts of 3 lengths; their log-probs ==
   HF's log-softmax of its raw scores (<= 1e-3). Sampled (T 0.8, top-k 50): our log-probs ==
   HF's teacher-forced forward over prompt + output (<= 1e-3).
2. Timing (bf16 weights, bf16 KV cache): `--preset` (Qwen3-0.6B shape), random prompts of
   `--prompt_len` tokens, `--new_tokens` per row, no EOS. Compile excluded (warm-up call);
   median of `--reps` calls; tokens/s = batch · new tokens / wall time of a call (prefill
   included, as in generate). Variants: ours `sample` (temperature 1, no filters), ours
   `synthesis` (temperature 0.6, top-p 0.95, top-k 20, five never-firing stop strings over a
   synthetic 128-byte-wide token table), and HF `generate` (SDPA, bf16, do_sample, temperature 1,
   top-k 0) in the same process.
Targets on an H200: >= 1,500 tokens/s at batch 1 and >= 15,000 at batch 64 (ours, sample).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share the GPU

import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import opera_jax  # noqa: E402
from opera_jax.sampling import Sampler  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "qwen3-0.6b", "Qwen3Config preset timed")
flags.DEFINE_string("check_preset", "qwen3-0.6b", "Qwen3Config preset of the checks")
flags.DEFINE_integer("check_layers", 4, "layers of the check model")
flags.DEFINE_list("batches", ["1", "64"], "batch sizes (prompts per call)")
flags.DEFINE_integer("prompt_len", 128, "prompt tokens")
flags.DEFINE_integer("new_tokens", 256, "tokens decoded per row")
flags.DEFINE_integer("reps", 3, "timed calls per variant")
flags.DEFINE_bool("hf", True, "also time transformers generate (--nohf: ours only)")

STOPS = ("\x00Wait", "\x00But", "\x00Hmm", "\x00Let me think", "\x00</think>")
TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_model(path_or_cfg, dtype):
    if isinstance(path_or_cfg, str):
        m = transformers.Qwen3ForCausalLM.from_pretrained(path_or_cfg, dtype=dtype,
                                                          attn_implementation="sdpa")
    else:
        m = transformers.Qwen3ForCausalLM(path_or_cfg).to(dtype)
    return m.to(TORCH_DEVICE).eval()


def check(preset: str, layers: int) -> list[str]:
    """Greedy tokens and log-probs against transformers in float32; returns failures."""
    failures = []
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # Untied: with tied random embeddings the residual stream makes "repeat the last token"
    # near-certain, and every distribution one-hot. Fewer layers: the check compiles fast.
    cfg = opera_jax.Qwen3Config.preset(preset).replace(tie_word_embeddings=False,
                                                       num_hidden_layers=layers)
    with jax.default_matmul_precision("highest"):
        model = opera_jax.init_model(cfg, seed=0, dtype="float32")
        # Logits of std ~3 instead of ~0.02·sqrt(D): peaked, but not one-hot, distributions.
        scale = 3.0 / (0.02 * cfg.hidden_size ** 0.5)
        model.norm.scale.set_value(model.norm.scale.get_value() * scale)
        path = opera_jax.export_hf(model, tempfile.mkdtemp())
        hf = hf_model(path, torch.float32)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 1000, size=n).tolist() for n in (7, 30, 19)]
        new = 32
        ours = Sampler(model, pad_id=0).sample(prompts, max_new_tokens=new, temperature=0.0)
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=TORCH_DEVICE)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=TORCH_DEVICE)
        with torch.no_grad():
            ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True)
        ref_tokens = ref.sequences[:, width:].cpu().numpy()
        if not np.array_equal(ours.tokens[:, :new], ref_tokens):
            bad = np.argwhere(ours.tokens[:, :new] != ref_tokens)[0]
            failures.append(f"greedy differs from HF generate first at (row, step) {tuple(bad)}")
        ref_lp = torch.stack(ref.logits, 1).float().log_softmax(-1)  # [B, new, V]
        ref_lp = ref_lp.gather(-1, torch.tensor(ours.tokens[:, :new]).long().to(
            TORCH_DEVICE)[..., None])[..., 0].cpu().numpy()
        err = float(np.abs(ref_lp - ours.logprobs[:, :new]).max())
        print(f"check [{preset} x{layers} layers, fp32]: greedy {'ok' if not failures else 'FAILED'}; "
              f"max |log-prob - HF| = {err:.2e} (mean log-prob {ours.logprobs[:, :new].mean():.2f})")
        if err > 1e-3:
            failures.append(f"log-probs differ from HF by {err:.2e}")
        # Sampled tokens (temperature 0.8, top-k 50): temperature-1 log-probs vs HF forward.
        sampled = Sampler(model, pad_id=0).sample(prompts, max_new_tokens=new, temperature=0.8,
                                                  top_k=50, seed=3)
        err = 0.0
        for r, p in enumerate(prompts):
            toks, lps = sampled.row(r)
            seq = torch.tensor([p + toks.tolist()], device=TORCH_DEVICE)
            with torch.no_grad():
                lp = hf(seq).logits[0, len(p) - 1:-1].float().log_softmax(-1)
            ref = lp.gather(-1, seq[0, len(p):, None])[:, 0].cpu().numpy()
            err = max(err, float(np.abs(ref - lps).max()))
        print(f"check [{preset} x{layers} layers, fp32]: sampled max |log-prob - HF forward| = {err:.2e} "
              f"(mean log-prob {sampled.logprobs[:, :new].mean():.2f})")
        if err > 1e-3:
            failures.append(f"sampled log-probs differ from HF forward by {err:.2e}")
    del hf, model
    if TORCH_DEVICE == "cuda":
        torch.cuda.empty_cache()
    return failures


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(f"jax {jax.__version__} on {jax.devices()}; torch {torch.__version__} on {TORCH_DEVICE}")

    t0 = time.perf_counter()
    failures = check(FLAGS.check_preset, FLAGS.check_layers)
    print(f"checks took {time.perf_counter() - t0:.0f} s")

    cfg = opera_jax.Qwen3Config.preset(FLAGS.preset)
    model = opera_jax.init_model(cfg, seed=0, dtype="bfloat16")
    # Synthetic token table as wide as a real Qwen3 one (128 bytes), for the stop matcher cost.
    pieces = [f"<{i}>".encode() for i in range(cfg.vocab_size)]
    pieces[-1] = b"-" * 128
    sampler = Sampler(model, token_pieces=pieces, pad_id=0)
    rng = np.random.default_rng(0)
    new = FLAGS.new_tokens
    rows = []
    batches = [int(b) for b in FLAGS.batches]
    for b in batches:
        prompts = rng.integers(0, 1000, size=(b, FLAGS.prompt_len)).tolist()
        for name, kw in (("sample", dict(temperature=1.0)),
                         ("synthesis", dict(temperature=0.6, top_p=0.95, top_k=20, stop=STOPS))):
            def ours(kw=kw):
                out = sampler.sample(prompts, max_new_tokens=new, seed=1, **kw)
                assert (out.lengths == new).all()

            t1 = time.perf_counter()
            ours()
            compile_s = time.perf_counter() - t1
            t = median_time(ours, FLAGS.reps)
            rows.append((b, f"ours {name}", b * new / t, t, compile_s))
            print(rows[-1], flush=True)
    del sampler, model

    if FLAGS.hf:
        hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                             if k not in ("architectures", "model_type")})
        hf_cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        hf = hf_model(hf_cfg, torch.bfloat16)
        for b in batches:
            ids = torch.from_numpy(rng.integers(0, 1000, size=(b, FLAGS.prompt_len))).to(
                TORCH_DEVICE)

            def theirs(n=new):
                with torch.no_grad():
                    hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
                if TORCH_DEVICE == "cuda":
                    torch.cuda.synchronize()

            theirs(8)  # warm-up
            t = median_time(theirs, 1)
            rows.append((b, "hf generate", b * new / t, t, 0.0))
            print(rows[-1], flush=True)

    print(f"\n{FLAGS.preset}, prompt {FLAGS.prompt_len}, {new} new tokens, "
          f"device {jax.devices()[0].device_kind}")
    print("| batch | sampler | tokens/s | s per call | ms per step | compile s |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for b, name, tps, t, c in rows:
        print(f"| {b} | {name} | {tps:,.0f} | {t:.3f} | {1e3 * t / new:.2f} | {c:.1f} |")
    print("checks:", "all passed" if not failures else "FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    app.run(main)
