"""The engine on a GPU: correctness first, then the rollout workload against today's sampler
and transformers `generate`.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_engine_gpu.py     # H100 / H200
    python benchmarks/bench_engine_gpu.py --preset tiny --check-preset tiny --check-layers 2 \\
        --prompts 4 --n 4 --cap 64 --slots 8 --hf-rows 8 --kernels xla --dtype float32  # CPU

Expected run time on an H200: ~7-9 min (use timeout 600): compiling the 28-layer programs
(engine per kernel and slot count, the fixed sampler), the fixed sampler's calls (each runs to
its longest row) and HF's batch (~40 ms a step). `--cap` and `--hf-rows` scale it.

1. Checks (float32, matmul precision "highest", TF32 off) on a random untied `--check-preset`
   model cut to `--check-layers` layers with peaked logits (final-norm scale raised; see
   bench_sampling_gpu.py), exported with `export_hf` and loaded by transformers:
   * greedy, 6 prompts around the page size × 2 samples on 4 slots (rows queue): every row ==
     HF `generate` of its prompt alone, log-probs == HF's forward (<= 1e-3);
   * sampled (T 1): the engine's rows == the fixed-batch sampler's (same streams; reported);
   * every kernel of `--check-kernels` gives the same greedy rows as the XLA path (a kernel
     that does not compile is reported and left out of the timing).
2. Timing (weights and pages in `--dtype`, bf16 by default), `--preset` (Qwen3-0.6B shape),
   the workload of rollout_workload.py (`--prompts` × `--n`, prompts of 64-255 tokens, response
   lengths log-normal with median cap / 6 and 5 % at `--cap`, per-row max_new_tokens, no EOS),
   temperature 1. Each program is compiled by a short call of the same shapes first.
   * engine: `Sampler.sample(slots=S)` for each S of `--slots` and kernel of `--kernels`
     (those that passed the check);
   * fixed: today's sampler, `--fixed-prompts` prompts per call (its [rows, prompt + cap]
     cache must fit: 256 rows × 1,280 slots × 112 KiB = 35 GiB at the defaults);
   * hf: transformers `generate` (SDPA, bf16) on the workload's first `--hf-rows` rows in one
     batch, run to their longest row; their own lengths count as generated tokens.
   tokens/s = generated tokens / wall seconds (prefill included).
Targets (issue, H200, Qwen3-0.6B shape): engine >= 3x the fixed sampler, >= 20x HF generate.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share the GPU

import argparse  # noqa: E402
import gc  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opera_jax  # noqa: E402
from opera_jax.model.paged import (PagedAttention, PagedKernel, bytes_per_token,  # noqa: E402
                                    default_attention)
from opera_jax.sampling import Sampler  # noqa: E402
from rollout_workload import rollout  # noqa: E402

TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def attention_for(kernel: str) -> PagedAttention:
    """The platform's XLA tiling, or a Pallas kernel (interpreted on a CPU dry run)."""
    if kernel == "xla":
        base = default_attention()
        return base if base.kernel is PagedKernel.XLA else PagedAttention(PagedKernel.XLA)
    return PagedAttention(PagedKernel(kernel), page_block=8,
                          interpret=jax.default_backend() == "cpu")


def check(preset: str, layers: int, kernels: list[str]) -> tuple[list[str], list[str]]:
    """Float32 parity with transformers; returns (failures, kernels that work)."""
    failures = []
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = opera_jax.Qwen3Config.preset(preset).replace(tie_word_embeddings=False,
                                                       num_hidden_layers=layers)
    with jax.default_matmul_precision("highest"):
        model = opera_jax.init_model(cfg, seed=0, dtype="float32")
        scale = 3.0 / (0.02 * cfg.hidden_size ** 0.5)  # logits of std ~3: peaked
        model.norm.scale.set_value(model.norm.scale.get_value() * scale)
        path = opera_jax.export_hf(model, tempfile.mkdtemp())
        import transformers
        hf = transformers.Qwen3ForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa").to(TORCH_DEVICE).eval()
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, 1000, size=m).tolist() for m in (3, 16, 21, 40, 7, 33)]
        max_new = [24, 9, 30, 17, 5, 28]
        s = Sampler(model, pad_id=0, kv_memory=64 << 20)
        out = s.sample(prompts, max_new_tokens=max_new, temperature=0.0, n=2, slots=4)
        err = 0.0
        for i, p in enumerate(prompts):
            ids = torch.tensor([p], device=TORCH_DEVICE)
            with torch.no_grad():
                ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new[i], do_sample=False,
                                  pad_token_id=0)[0, len(p):].tolist()
                seq = torch.tensor([p + ref], device=TORCH_DEVICE)
                lp = hf(seq).logits[0, len(p) - 1:-1].double().log_softmax(-1)
                want = lp.gather(-1, seq[0, len(p):, None])[:, 0].cpu().numpy()
            for r in (2 * i, 2 * i + 1):
                toks, lps = out.row(r)
                if toks.tolist() != ref:
                    failures.append(f"greedy row {r} differs from HF generate")
                err = max(err, float(np.abs(lps - want[:len(lps)]).max()))
        print(f"check [{preset} x{layers}, fp32]: greedy rows == HF alone: "
              f"{'ok' if not failures else 'FAILED'}; max |log-prob - HF| = {err:.2e}")
        if err > 1e-3:
            failures.append(f"log-probs differ from HF by {err:.2e}")
        kw = dict(max_new_tokens=max_new, temperature=1.0, n=2, seed=3)
        fixed = Sampler(model, pad_id=0).sample(prompts, **kw)
        sampled = s.sample(prompts, slots=4, **kw)
        same = np.mean([np.array_equal(fixed.row(r)[0], sampled.row(r)[0])
                        for r in range(len(fixed.lengths))])
        print(f"check: sampled engine rows == fixed sampler rows: {same:.0%}")
        if same < 0.9:
            failures.append(f"only {same:.0%} of sampled rows equal the fixed sampler's")
        working = []
        for kernel in kernels:
            try:
                k = Sampler(model, pad_id=0, kv_memory=64 << 20,
                            paged_attention=attention_for(kernel))
                got = k.sample(prompts, max_new_tokens=max_new, temperature=0.0, n=2, slots=4)
            except Exception as e:  # a kernel that does not lower here
                print(f"check: kernel {kernel} FAILED to run: {type(e).__name__}: "
                      f"{str(e)[:300]}")
                failures.append(f"kernel {kernel} does not run")
                continue
            ok = np.array_equal(got.tokens, out.tokens)
            print(f"check: kernel {kernel}: greedy rows == xla path: {ok}")
            if ok:
                working.append(kernel)
            else:
                failures.append(f"kernel {kernel} gives other greedy rows")
    del hf, model
    if TORCH_DEVICE == "cuda":
        torch.cuda.empty_cache()
    return failures, working


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--check-preset", default="qwen3-0.6b")
    parser.add_argument("--check-layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--cap", type=int, default=1024)
    parser.add_argument("--slots", type=int, nargs="+", default=[256])
    parser.add_argument("--kernels", nargs="+", default=["xla", "pallas_gpu"])
    parser.add_argument("--check-kernels", nargs="+", default=["xla", "pallas_gpu"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--fixed-prompts", type=int, default=16)
    parser.add_argument("--hf-rows", type=int, default=64)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()}; torch {torch.__version__} on "
          f"{TORCH_DEVICE}")

    t0 = time.perf_counter()
    failures, working = check(args.check_preset, args.check_layers, args.check_kernels)
    kernels = [k for k in args.kernels if k in working]
    print(f"checks took {time.perf_counter() - t0:.0f} s", flush=True)

    cfg = opera_jax.Qwen3Config.preset(args.preset)
    model = opera_jax.init_model(cfg, seed=0, dtype=args.dtype)
    w = rollout(prompts=args.prompts, n=args.n, cap=args.cap, min_prompt=64, max_prompt=256,
                vocab=min(cfg.vocab_size, 100_000))
    total = w.generated_tokens
    print(f"{args.prompts} prompts x {args.n}, cap {args.cap}: {total:,} tokens, mean "
          f"{w.max_new.mean():.0f}, {(w.max_new >= args.cap).mean():.1%} at the cap", flush=True)
    kw = dict(temperature=1.0, n=w.n, seed=1)
    short = np.minimum(w.max_new, 1)  # the same shapes, one token a row but the longest
    short[int(np.argmax(w.max_new))] = w.max_new.max()
    rows = []

    for kernel in kernels:
        s = Sampler(model, pad_id=0, paged_attention=attention_for(kernel))
        for slots in args.slots:
            t1 = time.perf_counter()
            s.sample(w.prompts, max_new_tokens=short, slots=slots, **kw)
            compile_s = time.perf_counter() - t1
            s.engine.clear_prefix_cache()
            t1 = time.perf_counter()
            s.sample(w.prompts, max_new_tokens=w.max_new, slots=slots, **kw)
            secs = time.perf_counter() - t1
            st = s.engine.last_stats
            rows.append((f"engine {kernel} S={slots}", total / secs, secs, st.decode_steps,
                         st.decode_steps / st.ideal_steps, st.peak_kv_bytes / 2**30,
                         st.peak_kv_bytes / (st.peak_live_tokens * st.bytes_per_token),
                         compile_s))
            print(rows[-1], st, flush=True)
        del s
        gc.collect()

    fixed = Sampler(model, pad_id=0)
    per = args.fixed_prompts
    calls = [(w.prompts[i:i + per], w.max_new[i * w.n:(i + per) * w.n])
             for i in range(0, len(w.prompts), per)]
    t1 = time.perf_counter()
    fixed.sample(calls[0][0], max_new_tokens=calls[0][1], **kw)  # compiles; runs a whole call
    compile_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    steps = 0
    for prompts, new in calls:
        fixed.sample(prompts, max_new_tokens=new, **kw)
        steps += int(new.max())
    secs = time.perf_counter() - t1
    width = -(-255 // 16) * 16 + int(2 ** np.ceil(np.log2(args.cap)))
    kv = per * w.n * width * bytes_per_token(cfg, args.dtype) / 2**30
    rows.append((f"fixed, {per} prompts a call", total / secs, secs, steps, None, kv, None,
                 compile_s))
    print(rows[-1], flush=True)
    del fixed, model
    gc.collect()

    if args.hf_rows:
        import transformers
        hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                             if k not in ("architectures", "model_type")})
        hf_cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        hf = transformers.Qwen3ForCausalLM(hf_cfg).to(getattr(torch, args.dtype)).to(
            TORCH_DEVICE).eval()
        r = args.hf_rows
        lens = w.max_new[:r]
        prompts = [w.prompts[i // w.n] for i in range(r)]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=TORCH_DEVICE)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                            device=TORCH_DEVICE)

        def generate(new):
            with torch.no_grad():
                hf.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                            temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                            min_new_tokens=new, pad_token_id=0)
            if TORCH_DEVICE == "cuda":
                torch.cuda.synchronize()

        generate(4)  # warm-up
        t1 = time.perf_counter()
        generate(int(lens.max()))
        secs = time.perf_counter() - t1
        rows.append((f"hf generate, {r} rows", int(lens.sum()) / secs, secs, int(lens.max()),
                     None, None, None, 0.0))
        print(rows[-1], flush=True)

    print(f"\n{args.preset}, {args.prompts} x {args.n}, cap {args.cap}, device "
          f"{jax.devices()[0].device_kind}")
    print("| sampler | tokens/s | s | decode steps | / ideal | peak KV GiB | KV / live | "
          "compile s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, tps, secs, steps, ratio, kv, over, c in rows:
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(f"| {name} | {tps:,.0f} | {secs:.1f} | {steps} | {fmt(ratio, '.3f')} | "
              f"{fmt(kv, '.2f')} | {fmt(over, '.3f')} | {c:.0f} |")
    fixed_tps = next(x[1] for x in rows if x[0].startswith("fixed"))
    hf_tps = next((x[1] for x in rows if x[0].startswith("hf")), None)
    for name, tps, *_ in rows:
        if name.startswith("engine"):
            print(f"{name}: {tps / fixed_tps:.1f}x fixed"
                  + (f", {tps / hf_tps:.1f}x HF generate" if hf_tps else ""))
    print("checks:", "all passed" if not failures else "FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
