"""The ahead-of-time planner: targets, per-device bytes against hand computation, the verdict
and the command's exit statuses. TPU compiles need libtpu (the `[tpu]` extra) and are slow."""

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dataclasses

from opera_jax import sharding as sh
from opera_jax.cli import load_config_file
from opera_jax.config.runs import parse
from opera_jax.model import Qwen3Config
from opera_jax.model import config as model_config
from opera_jax.model import attention as A
from opera_jax.plan import Program, Stage, gpu_target, plan, tpu_target
from opera_jax.plan.report import _exhausted_bytes, compile_program, tree_bytes
from opera_jax.plan.targets import GiB, TargetError

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (.[tpu])")


@pytest.mark.parametrize("name,devices,hosts,hbm,topology", [
    ("v5p-8", 4, 1, 95, "v5p:2x2x1"),
    ("v5p-32", 16, 4, 95, "v5p:2x2x4"),
    ("v4-8", 8, 1, 16, "v4:2x2x1"),        # compile-only v4: one device per TensorCore
    ("v5litepod-1", 1, 1, 16, "v5e:1x1"),
    ("v5litepod-8", 8, 1, 16, "v5e:2x4"),
    ("v6e-8", 8, 1, 32, "v6e:2x4"),
    ("v6e-16", 16, 4, 32, "v6e:4x4"),
])
def test_tpu_accelerator_types(name, devices, hosts, hbm, topology):
    t = tpu_target(name)
    assert (t.num_devices, t.hosts, t.hbm_bytes, t.topology) == (devices, hosts, hbm * GiB,
                                                                  topology)


@pytest.mark.parametrize("bad", ["v5p-6", "v7-8", "h100", "v6e-3"])
def test_unknown_tpu_types_are_bad_input(bad):
    with pytest.raises(TargetError):
        tpu_target(bad)


def _sft_tiny(**overrides):
    c = load_config_file(os.path.join(ROOT, "configs", "sft_tiny.py"))
    c.model.dtype = "float32"
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return parse(c)


def _hand_param_bytes(cfg: Qwen3Config, fsdp: int, itemsize: int) -> int:
    """Matrices are split over fsdp on their model dimension; norm scales are replicated."""
    norms = cfg.num_hidden_layers * (2 * cfg.hidden_size + 2 * cfg.head_dim) + cfg.hidden_size
    return (cfg.num_params - norms) * itemsize // fsdp + norms * itemsize


def test_sft_plan_bytes_match_hand_computation():
    run = _sft_tiny(**{"sft.batch_size": 8, "sft.seq_len": 128, "sft.grad_accum": 2})
    result = plan(run, gpu_target(4, hbm_gb=1))
    cfg = Qwen3Config.preset("tiny")
    params = _hand_param_bytes(cfg, 4, 4)
    assert result.summary()["resident_bytes_per_device"]["params"] == params
    # AdamW: two float32 moments per parameter, sharded like it (+ a few scalars).
    opt = result.summary()["resident_bytes_per_device"]["optimizer"]
    assert 2 * params <= opt <= 2 * params + 64
    (step,) = result.results
    # Arguments: the state and this device's quarter of four int32 [8, 128] batch arrays.
    batch = 4 * (8 // 4) * 128 * 4
    assert params + opt + batch <= step.arguments <= params + opt + batch + 64
    assert step.aliased >= params + opt  # the state is donated and updated in place
    assert result.fits and result.verdict.peak == step.in_stage == step.peak
    # Forward + backward FLOPs per device: at least 3 x forward of the model's matmuls.
    tokens = 8 * 128 / 4
    assert step.flops >= 0.9 * 3 * tokens * 2 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size)


def test_gpu_estimate_keeps_remat(monkeypatch):
    """The CPU compiler drops jax.checkpoint's barriers unless told not to, and CSE then
    merges the recomputation into the forward pass: remat=True compiled to the same
    temporaries as remat=False (the 8B update read 257 GiB instead of 72). With remat the
    backward keeps one layer's activations, not all eight."""
    wide = dataclasses.replace(Qwen3Config.preset("tiny"), num_hidden_layers=8, hidden_size=256,
                               intermediate_size=768)
    monkeypatch.setitem(model_config.PRESETS, "tiny-8x256", wide)
    temps = {}
    for remat in (False, True):
        run = _sft_tiny(**{"model.preset": "tiny-8x256", "model.remat": remat,
                           "sft.batch_size": 2, "sft.seq_len": 1024, "sft.grad_accum": 1})
        (step,) = plan(run, gpu_target(1, hbm_gb=8)).results
        temps[remat] = step.temporaries
    # Without remat: 8 layers x 2,048 tokens x ~20 float32 activations of 256-768 values.
    assert temps[False] > 300 * 2 ** 20
    assert temps[True] < 0.5 * temps[False], temps


@pytest.mark.slow  # the default suite stays under ~10 min on 2 cores
def test_grpo_plan_has_every_program_and_resident_state():
    c = load_config_file(os.path.join(ROOT, "configs", "grpo_tiny.py"))
    c.model.dtype = "bfloat16"  # bf16 compute: old log-probs recomputed
    c.validation.every = None
    result = plan(parse(c), gpu_target(2, hbm_gb=1), only=("prefill", "decode", "update",
                                                           "old_logprobs", "ref_logprobs"))
    assert [r.name for r in result.results] == ["prefill", "decode", "old_logprobs",
                                                 "ref_logprobs", "update"]
    resident = result.summary()["resident_bytes_per_device"]
    cfg = Qwen3Config.preset("tiny")
    assert resident["params"] == _hand_param_bytes(cfg, 2, 4)   # float32 master weights
    assert resident["reference"] == _hand_param_bytes(cfg, 2, 2)  # bf16 compute dtype
    by = {r.name: r for r in result.results}
    # The decode reads the KV cache: 8 prompts x 4 samples over 2 devices, prompt bucket 64 +
    # capacity 64 slots, 2 layers x (k, v) x [rows, K, slots, H] in bf16.
    rows, slots = 8 * 4 // 2, 64 + 64
    cache = cfg.num_hidden_layers * 2 * rows * cfg.num_key_value_heads * slots * cfg.head_dim * 2
    assert by["decode"].arguments >= cache + resident["params"]
    assert by["decode"].live == resident["optimizer"] + resident["reference"]
    assert by["update"].live == resident["reference"]


def _cli(*args, env=None):
    cmd = [sys.executable, "-m", "opera_jax.plan", *args]
    # The planner compiles what a run compiles: without conftest's "highest" matmul precision
    # (Mosaic rejects bf16 matmuls at that precision).
    base = {k: v for k, v in os.environ.items() if k != "JAX_DEFAULT_MATMUL_PRECISION"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3000,
                          env={**base, **(env or {})})


def test_cli_too_small_target_exits_1_with_advice():
    out = _cli("--config=configs/sft_tiny.py", "--gpus=2", "--hbm_gb=0.002",
               "--config.sft.seq_len=512")
    assert out.returncode == 1, out.stderr[-2000:]
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["fits"] is False and last["peak_bytes_per_device"] > 0.9 * 0.002 * GiB
    assert set(last["programs"]) == {"train_step"}
    assert last["hbm_bytes_per_device"] == int(0.002 * GiB)
    assert "advice:" in out.stdout


def test_engine_rollouts_are_planned_as_the_fixed_sampler_and_say_so():
    c = load_config_file(os.path.join(ROOT, "configs", "grpo_tiny.py"))
    notes = {}
    for engine in (True, False):
        c.rollout.engine = engine
        result = plan(parse(c), gpu_target(1, hbm_gb=1), only=("prefill",))
        assert [r.name for r in result.results] == ["prefill"]
        notes[engine] = [n for n in result.summary()["notes"] if "engine" in n]
    assert notes[False] == [] and "paged pool" in notes[True][0]


def test_advice_never_asks_for_fewer_rows_than_batch_shards():
    small = gpu_target(2, hbm_gb=0.002)
    roomy = plan(_sft_tiny(**{"sft.batch_size": 8, "sft.grad_accum": 1, "sft.seq_len": 256}),
                 small)
    assert not roomy.fits
    assert any("sft.grad_accum=2" in a for a in roomy.verdict.advice), roomy.verdict.advice
    # 2 rows on 2 devices: grad_accum=2 would leave a device without a row (the trainer
    # refuses it), so the advice names what can still change.
    tight = plan(_sft_tiny(**{"sft.batch_size": 2, "sft.grad_accum": 1, "sft.seq_len": 256}),
                 small)
    assert not tight.fits
    (line,) = [a for a in tight.verdict.advice if "needs" in a]
    assert "grad_accum" not in line and "already 2 rows over 2 batch shards" in line


@pytest.mark.parametrize("args", [["--topology=v9-8"], ["--gpus=2"], [],
                                  ["--gpus=2", "--hbm_gb=8", "--config.sft.batch_size=3"]])
def test_cli_bad_input_exits_2(args):
    out = _cli("--config=configs/sft_tiny.py", *args)
    assert out.returncode == 2, (out.stdout[-1000:], out.stderr[-2000:])


# ---- slow: real TPU programs through libtpu; every config's own plan commands ----

def _plan_commands(path: str) -> list[list[str]]:
    """The `python -m opera_jax.plan …` commands in a config file's docstring."""
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    doc = doc.replace("\\\n", " ")
    return [shlex.split(m)[3:] for m in re.findall(r"python -m opera_jax\.plan [^\n]*", doc)]


CONFIG_PLANS = [(name, cmd) for name in sorted(os.listdir(os.path.join(ROOT, "configs")))
                if name.endswith(".py")
                for cmd in _plan_commands(os.path.join(ROOT, "configs", name))]


def test_configs_that_name_a_target_carry_a_plan_command():
    named = {name for name, _ in CONFIG_PLANS}
    assert {"grpo_qwen3_8b_tpu.py", "grpo_qwen3_8b_gpu8.py", "grpo_qwen3_0p6b_gpu.py"} <= named


@pytest.mark.slow
@pytest.mark.parametrize("name,cmd", CONFIG_PLANS, ids=[f"{n}:{' '.join(c[1:])}"
                                                        for n, c in CONFIG_PLANS])
def test_every_config_fits_its_named_target(name, cmd):
    if any(a.startswith("--topology") for a in cmd) and not HAS_LIBTPU:
        pytest.skip("libtpu not installed")
    out = _cli(*cmd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["fits"] is True


@pytest.mark.slow
@needs_libtpu
def test_tpu_kernels_compile_for_a_real_topology():
    """Splash (packed rows, a reward window at a static offset) and the decode kernel, sharded
    over a v5p-8 mesh, compile with Mosaic for the TPU: no fallback to xla is logged."""
    target = tpu_target("v5p-8")
    mesh = jax.sharding.Mesh(np.array(target.devices()).reshape(4, 1, 1),
                             ("data", "fsdp", "tensor"))
    spec = lambda *names: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*names))  # noqa: E731
    sds = lambda shape, dt, *names: jax.ShapeDtypeStruct(shape, dt, sharding=spec(*names))  # noqa: E731
    b, n, kh, h = 8, 8, 2, 128
    q = sds((b, 256, n, h), jnp.bfloat16, "data")
    kv = sds((b, 384, kh, h), jnp.bfloat16, "data")
    seg_q, seg_kv = sds((b, 256), jnp.int32, "data"), sds((b, 384), jnp.int32, "data")
    cache = sds((b, 1024, kh, h), jnp.bfloat16, "data")

    def attend(q, k, v, a, c, q_slots, q_offset):
        return A.attention(q, k, v, q_segment_ids=a, kv_segment_ids=c, q_slots=q_slots,
                           kv_slots=jnp.arange(k.shape[1])[None], impl="splash",
                           q_offset=q_offset)

    # Default matmul precision, as a run has (conftest asks for "highest", which Mosaic
    # rejects for bf16 matmuls).
    with sh.activation_mesh(mesh), A.for_platform("tpu"), jax.default_matmul_precision(
            "default"):
        window = jax.jit(lambda q, k, v, a, c: attend(
            q, k, v, a, c, 128 + jnp.arange(256)[None] + jnp.zeros((b, 1), jnp.int32),
            128)).lower(q, kv, kv, seg_q, seg_kv).compile()
        decode = jax.jit(lambda q, k, v, a, c, s: attend(q, k, v, a, c, s, None)).lower(
            sds((b, 1, n, h), jnp.bfloat16, "data"), cache, cache,
            sds((b, 1), jnp.int32, "data"), sds((b, 1024), jnp.int32, "data"),
            sds((b, 1), jnp.int32, "data")).compile()
    for compiled in (window, decode):
        assert "tpu_custom_call" in compiled.as_text()


@pytest.mark.slow
@needs_libtpu
def test_tpu_decode_kernel_compiles_on_one_chip():
    """On a one-chip target nothing runs under shard_map, and Mosaic's lowering asks the
    default device (here the CPU) for the chip's generation: the planner makes the target's
    device the default while it compiles (before: "Unsupported TPU device kind: cpu")."""
    target = tpu_target("v6e-1")
    mesh = jax.sharding.Mesh(np.array(target.devices()).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=spec)  # noqa: E731
    b, n, kh, h, s = 4, 16, 8, 128, 1024

    @jax.jit
    def decode(q, k, v, a, c, slots):
        return A.attention(q, k, v, q_segment_ids=a, kv_segment_ids=c, q_slots=slots,
                           kv_slots=jnp.arange(s)[None], impl="splash", q_offset=None)

    args = (sds((b, 1, n, h), jnp.bfloat16), sds((b, s, kh, h), jnp.bfloat16),
            sds((b, s, kh, h), jnp.bfloat16), sds((b, 1), jnp.int32), sds((b, s), jnp.int32),
            sds((b, 1), jnp.int32))
    stage = Stage("decode", {}, [], [], mesh)
    with jax.default_matmul_precision("default"):
        result = compile_program(Program("decode", "one step", decode, args), stage, target)
    # The cache (2 x 4 x 1,024 x 8 x 128 bf16 = 16 MiB) is among the arguments.
    assert result.arguments >= 2 * b * s * kh * h * 2


def test_a_compile_refused_for_memory_reads_the_temporaries_it_names():
    target = gpu_target(1, 80)
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
               "temporaries (37.43G) exceeds available HBM (31.25G).")
    assert _exhausted_bytes(message, target) == int(37.43 * 2 ** 30)
    assert _exhausted_bytes("temporaries (512.5M) exceed", target) == int(512.5 * 2 ** 20)
    assert _exhausted_bytes("RESOURCE_EXHAUSTED: no figure", target) == 80 * 2 ** 30
