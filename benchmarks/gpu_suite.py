"""The GPU suite: every GPU benchmark against its peer, then the planner's estimate against the
measured memory, in one call of under 10 minutes on one H200; one results file.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/gpu_suite.py --out=/tmp/suite.json
    python benchmarks/gpu_suite.py --smoke --out=/tmp/suite_cpu.json     # end to end on a CPU

First `kernels`, in this process: every fused attention path against xla in float32 (the Pallas
flash kernel compiled by Triton for the first time; cuDNN causal and right-padded in bf16), and
flash vs xla time on a causal prefill.
Each benchmark is its own script (its flags, its correctness check before timing, its peer in
the same process) run as a child process with a time budget; the suite keeps its output and
pulls out the figures, next to their targets:
  train   bench_train_gpu.py: forward + backward of the 0.6B shape, per attention backend,
          and transformers (SDPA); target >= 45 % of the measured bf16 matmul ceiling.
  sample  bench_sampling_gpu.py: tokens/s at batch 1 and 64 against transformers.generate;
          targets >= 1,500 tokens/s at batch 1 and >= 15,000 at batch 64.
  reward  bench_reward_gpu.py: the LP kernel against the length-sorted naive path (one
          forward per context); target >= 2x.
  grpo    bench_grpo_gpu.py: whole GRPO steps split into rollout / reward / update, with MFU.
  memory  in this process: the planner's GPU estimate (compiled for a CPU device standing in)
          of an SFT step at the 0.6B shape, the same step compiled for the GPU, and the peak
          bytes the GPU reports after running it.
A budget is a timeout: a benchmark that runs out is recorded as such with its output so far,
and the suite goes on; all of it stops at --deadline_s (570 s), the memory part taking what is
left. Sizes are cut from the scripts' defaults to fit the 10 minutes
(compiles dominate); --smoke uses the scripts' own CPU smoke sizes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from opera_jax import sharding as sh  # noqa: E402
from opera_jax.config import build  # noqa: E402
from opera_jax.config.runs import SFTRun  # noqa: E402
from opera_jax.model import attention, flash_gpu  # noqa: E402
from opera_jax.config import sections as S  # noqa: E402
from opera_jax.plan import gpu_target, plan  # noqa: E402
from opera_jax.plan.programs import stage_programs  # noqa: E402
from opera_jax.train import state as state_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "gpu_suite_results.json", "results file (JSON)")
flags.DEFINE_bool("smoke", False, "tiny presets: the suite end to end on a CPU")
flags.DEFINE_list("only", None, "run only these parts (kernels, train, sample, reward, grpo, "
                  "memory)")
flags.DEFINE_float("hbm_gb", 141.0, "GiB per GPU, for the planner's estimate (H200: 141)")
flags.DEFINE_float("deadline_s", 570.0, "the whole suite's time; a part that would start with "
                   "less than 30 s left is skipped, a running one is stopped at the deadline")
flags.DEFINE_bool("child", False, "internal: run the memory part and write its figures")

# (script, flags on the GPU, flags for --smoke, budget in seconds on the GPU)
BENCHES = {
    "train": ("bench_train_gpu.py", ["--steps=5"],
              ["--preset=tiny", "--batch=2", "--seq=64", "--steps=2"], 100),
    "sample": ("bench_sampling_gpu.py", ["--reps=2", "--check_layers=2"],
               ["--preset=tiny", "--new_tokens=16", "--batches=1,4", "--check_preset=tiny",
                "--reps=1"], 200),
    "reward": ("bench_reward_gpu.py", ["--repeats=2", "--nounsorted"],
               ["--preset=tiny", "--response=512", "--segments=16", "--reference=128",
                "--prompt=64", "--check_response=256", "--repeats=1"], 110),
    "grpo": ("bench_grpo_gpu.py", ["--nocheck", "--steps=3", "--new_tokens=256"],
             ["--preset=tiny", "--prompts=4", "--n=4", "--new_tokens=32", "--prompt_len=64",
              "--steps=2", "--nocheck"], 150),
}


def _run(name: str, remaining: float) -> dict:
    """A benchmark script as a child process, within its budget and the suite's remaining
    time (the memory part is the suite itself with --only=memory)."""
    if name == "memory":
        cmd = [sys.executable, os.path.abspath(__file__), "--only=memory", "--child",
               f"--out={FLAGS.out}.memory", f"--hbm_gb={FLAGS.hbm_gb}"]
        cmd += ["--smoke"] if FLAGS.smoke else []
        budget = 900 if FLAGS.smoke else remaining
    else:
        script, gpu_args, smoke_args, budget = BENCHES[name]
        cmd = [sys.executable, os.path.join(HERE, script),
               *(smoke_args if FLAGS.smoke else gpu_args)]
        budget = budget * 6 if FLAGS.smoke else min(budget, remaining)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE,
                              timeout=max(budget, 1))
        out, status = proc.stdout + proc.stderr[-3000:], proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        status = "timeout"
    return {"command": " ".join(cmd[1:]), "status": status,
            "seconds": round(time.perf_counter() - t0, 1), "output": out[-6000:]}


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|") and "---" not in line]


def _number(s: str) -> float | None:
    m = re.search(r"-?[\d,]+\.?\d*", s)
    return float(m.group(0).replace(",", "")) if m else None


def figures(name: str, out: str) -> dict:
    """The headline figures of a benchmark's output, with their targets."""
    f: dict = {}
    if name == "train":
        for line in out.splitlines():
            m = re.match(r"(opera_jax \(\w+\)|transformers \(sdpa\))\s+([\d,]+)\s+([\d.]+)\s+"
                         r"([\d.]+)\s+([\d.na]+)%", line.strip())
            if m:
                f[m.group(1)] = {"tokens_per_s": _number(m.group(2)),
                                 "tflops": float(m.group(4)), "pct_ceiling": _number(m.group(5))}
        best = max((v["pct_ceiling"] for k, v in f.items()
                    if k.startswith("opera") and v["pct_ceiling"] is not None), default=None)
        f["target"] = {"what": ">= 45 % of the bf16 matmul ceiling", "value": best,
                       "met": best is not None and best >= 45}
    elif name == "sample":
        rows = [r for r in _table_rows(out) if len(r) == 6 and r[0].isdigit()]
        for batch, who, tps, *_ in rows:
            f[f"{who} batch {batch}"] = _number(tps)
        b1, b64 = f.get("ours sample batch 1"), f.get("ours sample batch 64")
        f["target"] = {"what": ">= 1,500 tokens/s at batch 1, >= 15,000 at batch 64",
                       "value": [b1, b64],
                       "met": bool(b1 and b64 and b1 >= 1500 and b64 >= 15000)}
    elif name == "reward":
        rows = [r for r in _table_rows(out) if len(r) == 5 and r[0] not in ("path",)]
        for path, med, _, ctx, speed in rows:
            f[path] = {"median_s": _number(med), "contexts_per_s": _number(ctx),
                       "slowdown_vs_kernel": _number(speed)}
        naive = f.get("naive (sorted by length)", {}).get("slowdown_vs_kernel")
        f["target"] = {"what": "kernel >= 2x the length-sorted naive path", "value": naive,
                       "met": naive is not None and naive >= 2}
    elif name == "grpo":
        for sec in ("rollout", "reward", "update", "logprob", "step"):
            m = re.search(rf"^\s*{sec}\s+([\d.]+)\s+([\d.]+)%", out, re.M)
            if m:
                f[f"{sec}_s"] = float(m.group(1))
        m = re.search(r"MFU update ([\d.]+)%", out)
        f["mfu_update_pct"] = float(m.group(1)) if m else None
    return f


def kernels() -> dict:
    """Each fused attention path against xla in float32 on the device (flash: float32 inputs;
    cuDNN: bf16 inputs, so its error is bf16's), forward and gradient, then flash vs xla time
    on a prefill shape. Runs before the benchmarks: they rely on these paths."""
    rng = np.random.default_rng(0)
    on_gpu = jax.default_backend() == "gpu"
    interpret = not on_gpu
    out: dict = {}

    def qkv(b, t, s, n, kh, h, dtype=jnp.float32):
        return (jnp.asarray(rng.standard_normal((b, t, n, h)), dtype),
                jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype),
                jnp.asarray(rng.standard_normal((b, s, kh, h)), dtype))

    def reference(q, k, v, qseg, kseg, offset):
        q_slots = offset[:, None] + jnp.arange(q.shape[1])[None]
        kv_slots = jnp.broadcast_to(jnp.arange(k.shape[1]), kseg.shape)
        return attention.xla_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                       v.astype(jnp.float32),
                                       attention.build_mask(qseg, kseg, q_slots, kv_slots))

    def err(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    t, h = (256, 128) if on_gpu else (48, 32)
    seg = np.ones((2, t), np.int32)
    seg[0, : t // 8] = 0          # left padding
    seg[1, t // 2:] = 2           # two packed sequences
    zero = jnp.zeros((2,), jnp.int32)
    q, k, v = qkv(2, t, t, 8, 2, h)
    cases = {"flash packed": (q, k, v, jnp.asarray(seg), jnp.asarray(seg), zero)}
    kseg = np.ones((2, 2 * t), np.int32)
    kseg[:, t + t // 2:] = 0
    cases["flash cached (offset t)"] = (*qkv(2, t // 2, 2 * t, 8, 2, h),
                                        jnp.ones((2, t // 2), jnp.int32), jnp.asarray(kseg),
                                        jnp.full((2,), t, jnp.int32))
    cases["flash decode"] = (*qkv(2, 1, 2 * t, 8, 2, h), jnp.ones((2, 1), jnp.int32),
                             jnp.asarray(kseg), jnp.full((2,), t + t // 2 - 1, jnp.int32))
    for name, args in cases.items():
        fn = lambda q, k, v: flash_gpu.flash_attention(q, k, v, *args[3:],  # noqa: E731
                                                       interpret=interpret)
        want = reference(*args)
        result = {"forward": err(fn(*args[:3]), want)}
        if "decode" not in name:
            loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
            g1 = jax.grad(loss(fn), argnums=(0, 1, 2))(*args[:3])
            g2 = jax.grad(loss(lambda q, k, v: reference(q, k, v, *args[3:])),
                          argnums=(0, 1, 2))(*args[:3])
            result["grad"] = max(err(a, b) for a, b in zip(g1, g2))
        out[name] = result
    if on_gpu:  # cuDNN: bf16 inputs against float32 xla on the same (rounded) values
        q, k, v = qkv(2, t, t, 8, 2, h, jnp.bfloat16)
        right = np.zeros((2, t), np.int32)
        right[0, : t - 37] = 1
        right[1] = 1
        right = jnp.asarray(right)
        got = attention._cudnn_padded(q, k, v, right, right, None)
        mask = right[:, :, None] != 0
        out["cudnn right-padded (bf16)"] = {"forward": err(
            jnp.where(mask[..., None], got, 0), reference(q, k, v, right, right, zero))}
        got = attention._cudnn_causal(q, k, v, None, None, None)
        ones = jnp.ones((2, t), jnp.int32)
        out["cudnn causal (bf16)"] = {"forward": err(got, reference(q, k, v, ones, ones, zero))}
        # Time: flash vs xla, causal prefill B 8, T 4096, 16 heads / 8 KV, bf16.
        q, k, v = qkv(8, 4096, 4096, 16, 8, 128, jnp.bfloat16)
        ones = jnp.ones((8, 4096), jnp.int32)
        zeros8 = jnp.zeros((8,), jnp.int32)
        slots = jnp.broadcast_to(jnp.arange(4096), (8, 4096))
        for name, fn in (("flash", lambda: flash_gpu.flash_attention(q, k, v, ones, ones, zeros8)),
                         ("xla", lambda: attention.attention(
                             q, k, v, q_segment_ids=ones, kv_segment_ids=ones, q_slots=slots,
                             kv_slots=slots, impl="xla"))):
            f = jax.jit(fn)
            f().block_until_ready()
            t0 = time.perf_counter()
            for _ in range(5):
                r = f()
            r.block_until_ready()
            dt = (time.perf_counter() - t0) / 5
            flops = 4 * 8 * 16 * 4096 * 4096 * 128 / 2  # causal half
            out[f"time {name} prefill 8x4096"] = {"ms": round(dt * 1e3, 2),
                                                  "tflops": round(flops / dt / 1e12, 1)}
    return out


def memory() -> dict:
    """The planner's estimate of an SFT step against the GPU's own compile and its measured
    peak (0.6B shape, bf16, remat, batch 4 x 2048; tiny with --smoke)."""
    preset, batch, seq = ("tiny", 4, 128) if FLAGS.smoke else ("qwen3-0.6b", 4, 2048)
    run = SFTRun(model=S.Model(preset=preset, dtype=S.Dtype.BFLOAT16, remat=True),
                 mesh=S.Mesh(num_devices=1), sft=S.SFT(batch_size=batch, seq_len=seq))
    t0 = time.perf_counter()
    estimate = plan(run, gpu_target(1, FLAGS.hbm_gb)).results[0]
    result = {"shape": f"{preset} bf16 remat, batch {batch} x {seq}",
              "planner_estimate_peak_bytes": estimate.peak,
              "planner_estimate_temp_bytes": estimate.temporaries,
              "planner_seconds": round(time.perf_counter() - t0, 1)}
    # The estimate traced attention for a GPU stand-in; on a CPU-only smoke run the device
    # mesh below is the same mesh, and jax would reuse that trace.
    jax.clear_caches()
    device = jax.devices()[0]
    mesh = build.make_mesh(run.mesh, devices=[device])
    stage = stage_programs(run, mesh)
    step = stage.programs[0]
    with sh.activation_mesh(mesh):
        compiled = step.fn.lower(*step.args).compile()
        mem = compiled.memory_analysis()
        result["device"] = device.device_kind
        result["device_compile_peak_bytes"] = (mem.argument_size_in_bytes
                                               + mem.output_size_in_bytes
                                               - mem.alias_size_in_bytes
                                               + mem.temp_size_in_bytes)
        result["device_compile_temp_bytes"] = mem.temp_size_in_bytes
        state_abs, batch_abs = step.args
        params = build.load_params(run.model, mesh)
        tx, _ = state_lib.make_optimizer(run.sft.optim, run.sft.steps)
        state = state_lib.init_state(params, tx, state_abs, seed=0)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 1000, (batch, seq)).astype(np.int32)
        host = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
                "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape).copy(),
                "loss_mask": np.ones_like(tokens)}
        data = {k: jax.device_put(v, batch_abs[k].sharding) for k, v in host.items()}
        before = (device.memory_stats() or {}).get("peak_bytes_in_use")
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics)
        stats = device.memory_stats() or {}
    result["measured_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    result["measured_peak_before_step"] = before
    if result["measured_peak_bytes_in_use"]:
        result["estimate_over_measured"] = round(
            estimate.peak / result["measured_peak_bytes_in_use"], 3)
    result["estimate_over_device_compile"] = round(
        estimate.peak / max(1, result["device_compile_peak_bytes"]), 3)
    result["loss"] = float(metrics["loss"])
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.child:  # the memory part in a process of its own (a budget can stop it)
        with open(FLAGS.out, "w") as f:
            json.dump(memory(), f, indent=1)
        return
    parts = FLAGS.only or ["kernels", *BENCHES, "memory"]
    results = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
               "jax": jax.__version__, "smoke": FLAGS.smoke,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    t0 = time.perf_counter()
    for name in parts:
        remaining = FLAGS.deadline_s - (time.perf_counter() - t0)
        if name == "kernels":
            try:
                results[name] = kernels()
            except Exception as e:  # record and go on: the file is the suite's one output
                results[name] = {"error": f"{type(e).__name__}: {e}"}
        elif remaining < 30 and not FLAGS.smoke:
            results[name] = {"status": "skipped: the suite's deadline"}
        else:
            res = _run(name, remaining)
            if name == "memory" and os.path.exists(f"{FLAGS.out}.memory"):
                with open(f"{FLAGS.out}.memory") as f:
                    res["figures"] = json.load(f)
            else:
                res["figures"] = figures(name, res["output"])
            results[name] = res
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'output'})}",
              flush=True)
        with open(FLAGS.out, "w") as f:  # after every part: a timeout keeps what ran
            json.dump(results, f, indent=1)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    with open(FLAGS.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nsuite done in {results['seconds']} s -> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
