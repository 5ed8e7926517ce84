"""GRPO steps at the Qwen3-0.6B shape on one GPU: the real loop, split into rollout / reward /
update, with MFU; first a check of the old log-probs on the GPU's bf16 path.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_grpo_gpu.py
    python benchmarks/bench_grpo_gpu.py --preset=tiny --prompts=4 --n=4 --new_tokens=32 \\
        --prompt_len=64 --steps=2                                  # dry run on a CPU

The GPU image lacks ml_collections, grain and tensorboardX (GPU_NOTES.md): carry them as
cp312 wheels (the device tool's README: pip download … -d .whl; then, on the machine,
pip install --target /tmp/site .whl/*.whl and PYTHONPATH=/tmp/site).

Model: random weights of `--preset`, final-norm scale raised so logits have std ~3 (random
init gives near-uniform distributions, which would hide log-prob differences), exported as an
HF directory with the embedded tiny tokenizer and trained from there (model.hf_dir), bf16
compute, float32 master weights, per-layer remat. Prompts: the toy domain through the chat
template (writing rows only). Responses are random tokens (no think blocks, so the reward
scores c_full and c_0 only: a lower bound on its cost; ids beyond the tiny tokenizer decode to
"").

1. Check (one RL step each, one mini-batch, so the update sees on-policy data): with
   `grpo.old_logprobs` = sampler, then recompute, print approx_kl_old (½·mean log-ratio²),
   ratio_mean and clip_frac of that mini-batch: how far the sampler's bf16 decode log-probs
   (and the no-grad recomputation) are from the update's own forward. Recompute is `auto`'s
   choice for bf16; the sampler's would save a forward pass if this is ~0.
2. Timing: `--steps` RL steps with `--minibatches` updates each (old log-probs recomputed, KL
   to the frozen reference); the first step compiles and is left out. Prints per-section
   median seconds, the reward's share, generated tokens/s and MFU (against `--peak_flops`,
   default 989e12: H100 / H200 dense bf16).
Expect ~6-8 min on an H100 (mostly compiling the 28-layer sampler, reward kernel, log-prob
and update programs); use timeout 600.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import opera_jax  # noqa: E402
from opera_jax import cli  # noqa: E402
from opera_jax.config.runs import parse  # noqa: E402
from opera_jax.data.jsonl import write_jsonl  # noqa: E402
from opera_jax.data.toy_domain import prompt_rows  # noqa: E402
from opera_jax.tokenizer import load_tokenizer  # noqa: E402
from opera_jax.train.grpo import train  # noqa: E402
from opera_jax.train.metrics import read_metrics  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "qwen3-0.6b", "Qwen3Config preset (random weights)")
flags.DEFINE_integer("prompts", 16, "prompts per RL step")
flags.DEFINE_integer("n", 8, "responses per prompt")
flags.DEFINE_integer("new_tokens", 512, "max new tokens per response")
flags.DEFINE_integer("prompt_len", 128, "max prompt tokens (after the chat template)")
flags.DEFINE_integer("minibatches", 4, "optimizer updates per RL step")
flags.DEFINE_integer("grad_accum", 2, "micro-batches per update")
flags.DEFINE_integer("steps", 4, "RL steps of the timing run (the first compiles; not timed)")
flags.DEFINE_float("peak_flops", 989e12, "one device's peak FLOP/s, for MFU")
flags.DEFINE_bool("check", True, "first check the old log-probs (--nocheck: timing only)")

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                      "grpo_qwen3_0p6b_gpu.py")


def peaked_hf_dir(preset: str, out: str) -> str:
    """Random `preset` weights with logits of std ~3, written as an HF directory."""
    cfg = opera_jax.Qwen3Config.preset(preset)
    model = opera_jax.init_model(cfg, seed=0, dtype="float32")
    scale = 3.0 / (0.02 * cfg.hidden_size ** 0.5)
    model.norm.scale.set_value(model.norm.scale.get_value() * scale)
    return opera_jax.export_hf(model, out, tokenizer=load_tokenizer())


def config_for(args, workdir: str, hf_dir: str, data: str):
    """The GPU config file's run, sized by the flags `args`, from `hf_dir` on `data`."""
    c = cli.load_config_file(CONFIG)
    c.workdir, c.model.hf_dir, c.data.path = workdir, hf_dir, data
    c.model.checkpoint = None
    c.rollout.max_prompt_len = args.prompt_len
    c.rollout.num_prompts, c.rollout.n = args.prompts, args.n
    c.rollout.max_new_tokens = args.new_tokens
    c.rollout.prompts_per_call = None
    c.grpo.steps = args.steps
    c.grpo.num_minibatches, c.grpo.grad_accum = args.minibatches, args.grad_accum
    c.grpo.peak_flops = args.peak_flops
    c.validation.every = None
    c.checkpoint.every = None  # the final checkpoint only
    c.checkpoint.async_save = False
    return c


def bench(args) -> None:
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
          f"{args.preset}, {args.prompts} prompts x {args.n}, {args.new_tokens} new tokens, "
          f"prompts <= {args.prompt_len} tokens", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = peaked_hf_dir(args.preset, os.path.join(tmp, "hf"))
        # Writing prompts only: math rows would change the reward's shapes from step to step.
        data = write_jsonl(os.path.join(tmp, "prompts.jsonl"),
                           prompt_rows(512, seed=0, math_fraction=0.0))
        if args.check:
            for mode in ("sampler", "recompute"):
                c = config_for(args, os.path.join(tmp, f"check-{mode}"), hf_dir, data)
                c.grpo.steps, c.grpo.num_minibatches, c.grpo.grad_accum = 1, 1, args.grad_accum
                c.grpo.old_logprobs = mode
                train(parse(c))
                r = read_metrics(c.workdir)[-1]
                print(f"check old_logprobs={mode:>9}: approx_kl_old {r['approx_kl_old']:.3e}, "
                      f"ratio_mean {r['ratio_mean']:.6f}, clip_frac {r['clip_frac']:.4f} "
                      f"(on-policy: want ~0, 1, 0)", flush=True)
        c = config_for(args, os.path.join(tmp, "timing"), hf_dir, data)
        train(parse(c))
        rows = [r for r in read_metrics(c.workdir) if "time/step_s" in r][1:]
    step = statistics.median(r["time/step_s"] for r in rows)
    print(f"\n{'section':>8} {'median s':>9} {'share':>6}")
    for name in ("rollout", "reward", "update", "logprob", "step"):
        s = statistics.median(r[f"time/{name}_s"] for r in rows)
        print(f"{name:>8} {s:>9.3f} {s / step:>6.1%}")
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    print(f"\ngenerated tokens/s {med('tokens_per_s'):,.0f} (rollout alone "
          f"{med('throughput/rollout_tokens_per_s'):,.0f}); update tokens/s "
          f"{med('throughput/update_tokens_per_s'):,.0f}; MFU update {med('mfu/update'):.1%}, "
          f"rollout {med('mfu/rollout'):.1%}; mean response {med('response/len'):.0f} tokens; "
          f"{len(rows)} timed steps")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run_main(lambda: bench(FLAGS))


if __name__ == "__main__":
    app.run(main)
