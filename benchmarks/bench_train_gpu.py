"""Training forward+backward tokens/s and MFU: opera_jax vs transformers, same GPU, same run.

Qwen3-0.6B shape with random weights, bf16, batch 8 × 2048 tokens (GPU_NOTES.md's peer setup).
Steps, in one process:
  1. measure the bf16 matmul ceiling (8192³ through jnp);
  2. build a random transformers Qwen3ForCausalLM, save_pretrained, load it with
     `opera_jax.load_pretrained` and check logits against PyTorch (correctness first);
  3. time jitted value_and_grad of the mean token NLL (chunked float32 log-probs), for each
     attention backend;
  4. time PyTorch forward+backward (SDPA, bf16) on the same shapes;
  5. print a table: tokens/s, TFLOP/s, % of the measured ceiling.

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_train_gpu.py
    python benchmarks/bench_train_gpu.py --preset=tiny --batch=2 --seq=64 --steps=2  # CPU smoke
"""

import os
import tempfile
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from opera_jax import Qwen3Config, load_pretrained  # noqa: E402
from opera_jax.tokenizer import load_tokenizer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "qwen3-0.6b", "Qwen3Config preset")
flags.DEFINE_integer("batch", 8, "rows per step")
flags.DEFINE_integer("seq", 2048, "tokens per row")
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_list("impls", None, "attention backends to time (default: cudnn,xla on a GPU, "
                  "xla on a CPU)")
flags.DEFINE_bool("torch", True, "also time transformers (--notorch: opera_jax only)")


def timeit(fn, steps, sync):
    fn()
    sync(fn())  # two warm-ups: compile, then autotune caches
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    sync(out)
    return (time.perf_counter() - t0) / steps


def matmul_ceiling(n=8192, steps=10):
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    dt = timeit(lambda: f(a), steps, lambda o: o.block_until_ready())
    return 2 * n ** 3 / dt / 1e12


def hf_model(cfg, path, device, dtype):
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                         if k not in ("architectures", "model_type")})
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.Qwen3ForCausalLM(hf_cfg).to(dtype=dtype)
    model.save_pretrained(path)
    load_tokenizer(None).save_pretrained(path)
    return model.to(device)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    cfg = Qwen3Config.preset(FLAGS.preset)
    if FLAGS.preset == "tiny":
        cfg = cfg.replace(vocab_size=1024)
    flops_tok = 3 * cfg.flops_per_token(FLAGS.seq)  # forward + backward (2× forward)
    ceiling = matmul_ceiling() if on_gpu else float("nan")
    rows = []

    with tempfile.TemporaryDirectory() as path:
        ref = hf_model(cfg, path, device, torch.bfloat16 if on_gpu else torch.float32)
        dtype = "bfloat16" if on_gpu else "float32"
        rng = np.random.RandomState(0)
        # seq + 1 tokens: the model sees exactly `seq` inputs, predicting the next token at each.
        tokens_np = rng.randint(0, cfg.vocab_size, (FLAGS.batch, FLAGS.seq + 1)).astype(np.int32)

        # 1. correctness: logits against PyTorch on a short batch
        model, _ = load_pretrained(path, dtype=dtype)
        probe = tokens_np[:2, :128]
        with torch.no_grad():
            probe_ids = torch.tensor(probe, device=device, dtype=torch.long)
            want = ref(probe_ids).logits.float().cpu().numpy()
        got = np.asarray(model(jnp.asarray(probe)))
        err = np.abs(got - want).max() / np.abs(want).max()
        agree = (got.argmax(-1) == want.argmax(-1)).mean()
        print(f"logits vs torch: max rel err {err:.2e}, argmax agreement {agree:.3f}")
        assert agree > 0.9, "opera_jax and transformers disagree; not timing"

        # 2. opera_jax fwd+bwd per attention backend
        impls = FLAGS.impls or (["cudnn", "xla"] if on_gpu else ["xla"])
        tokens = jnp.asarray(tokens_np)
        for impl in impls:
            model, _ = load_pretrained(path, dtype=dtype, attention_impl=impl)
            graphdef, state = nnx.split(model)

            def loss_fn(state, tokens):
                m = nnx.merge(graphdef, state)
                hidden = m(tokens[:, :-1], return_hidden=True)
                return -m.logprobs(hidden, tokens[:, 1:], chunk_size=1024).mean()

            step = jax.jit(jax.value_and_grad(loss_fn))
            dt = timeit(lambda: step(state, tokens), FLAGS.steps,
                        lambda o: jax.block_until_ready(o))
            rows.append((f"opera_jax ({impl})", FLAGS.batch * FLAGS.seq / dt, dt))
            del model, state

        # 3. transformers fwd+bwd
        if FLAGS.torch:
            ref.train()
            ids = torch.tensor(tokens_np[:, :-1], device=device, dtype=torch.long)
            sync = (lambda o: torch.cuda.synchronize()) if device == "cuda" else (lambda o: None)

            def torch_step():
                ref.zero_grad(set_to_none=True)
                loss = ref(ids, labels=ids).loss
                loss.backward()
                return loss

            dt = timeit(torch_step, FLAGS.steps, sync)
            rows.append(("transformers (sdpa)", FLAGS.batch * FLAGS.seq / dt, dt))

    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}, "
          f"{FLAGS.preset}, batch {FLAGS.batch} × seq {FLAGS.seq}, "
          f"matmul ceiling {ceiling:.0f} TFLOP/s")
    print(f"{'what':<24} {'tokens/s':>10} {'ms/step':>9} {'TFLOP/s':>9} {'% ceiling':>10}")
    for name, tps, dt in rows:
        tflops = tps * flops_tok / 1e12
        print(f"{name:<24} {tps:>10,.0f} {dt * 1e3:>9.1f} {tflops:>9.1f} "
              f"{100 * tflops / ceiling:>9.1f}%")


if __name__ == "__main__":
    app.run(main)
