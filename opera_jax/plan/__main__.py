"""`python -m opera_jax.plan --config=CONFIG (--topology=TPU_TYPE | --gpus=N --hbm_gb=G)`.

Compiles every jitted program of the config's stage for the target ahead of time and prints,
per program and per device, arguments, outputs, temporaries, peak bytes, FLOPs per call and a
roofline time; then the resident state, whether the stage fits in HBM less `--margin`, what to
change if it does not, and last one JSON line (`fits`, `peak_bytes_per_device`,
`hbm_bytes_per_device`, `programs`: name -> peak bytes in the stage, …).

    python -m opera_jax.plan --config=configs/grpo_qwen3_8b_tpu.py --topology=v5p-8
    python -m opera_jax.plan --config=configs/grpo_qwen3_8b_gpu8.py --gpus=8 --hbm_gb=139
    python -m opera_jax.plan --config=configs/sft_tiny.py --topology=v5litepod-1 \\
        --config.sft.seq_len=4096

TPU targets need libtpu (`pip install -e ".[tpu]"`), which compiles for a TPU topology on any
machine. GPU targets compile for N fake CPU devices: an estimate (plan/report.py says how far).
Exit status: 0 the stage fits, 1 it does not, 2 bad input (config, target).
"""

import json
import logging
import sys

import jax
from absl import app, flags

from opera_jax import cli
from opera_jax.config.runs import parse
from opera_jax.config.setups import grpo_tiny
from opera_jax.plan import Assumptions, TargetError, gpu_target, plan, table, tpu_target
from opera_jax.plan.report import gib, size, tree_bytes

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, "Cloud TPU accelerator type: v4-8, v5p-8, v5p-32, "
                    "v5litepod-1/4/8, v6e-1/4/8, …")
flags.DEFINE_integer("gpus", None, "plan for this many GPUs (an estimate on CPU devices)")
flags.DEFINE_float("hbm_gb", None, "GiB of memory per GPU (with --gpus): 80 H100, 139 H200")
flags.DEFINE_float("peak_tflops", None, "per-GPU dense bf16 TFLOP/s (default 989: H100/H200)")
flags.DEFINE_float("margin", 0.1, "share of HBM kept free")
flags.DEFINE_integer("reference_tokens", Assumptions.reference_tokens,
                     "reference answer tokens the reward scores (an assumption)")
flags.DEFINE_integer("segments", Assumptions.segments,
                     "paragraph cuts K per response the reward scores (an assumption)")
flags.DEFINE_list("programs", None, "compile only these programs (default: all)")


def _target():
    if (FLAGS.topology is None) == (FLAGS.gpus is None):
        raise TargetError("name one target: --topology=TPU_TYPE or --gpus=N --hbm_gb=G")
    if FLAGS.topology is not None:
        return tpu_target(FLAGS.topology)
    if FLAGS.hbm_gb is None:
        raise TargetError("--gpus needs --hbm_gb (GiB per GPU)")
    peak = None if FLAGS.peak_tflops is None else FLAGS.peak_tflops * 1e12
    return gpu_target(FLAGS.gpus, FLAGS.hbm_gb, peak_flops=peak)


def run_plan() -> int:
    if not 0 <= FLAGS.margin < 1:
        raise TargetError(f"--margin must be in [0, 1), got {FLAGS.margin}")
    target = _target()
    run = parse(FLAGS.config)
    assume = Assumptions(reference_tokens=FLAGS.reference_tokens, segments=FLAGS.segments)
    kind = ("estimate: compiled for CPU devices standing in for GPUs" if target.estimate
            else f"compiled by libtpu for {target.topology}")
    print(f"plan: {FLAGS.config.get('workdir', '')} stage on {target.name}: "
          f"{target.num_devices} devices on {target.hosts} host(s), "
          f"{gib(target.hbm_bytes)} GiB HBM, {target.peak_flops / 1e12:.0f} TFLOP/s, "
          f"{target.hbm_bandwidth / 1e12:.2f} TB/s per device ({kind})", flush=True)
    result = plan(run, target, margin=FLAGS.margin, assume=assume,
                  only=tuple(FLAGS.programs) if FLAGS.programs else None,
                  progress=lambda r: print(f"  compiled {r.name} in {r.compile_s:.0f} s",
                                           flush=True))
    mesh = result.stage.mesh
    print(f"mesh: {dict(mesh.shape)}")
    for note in result.stage.notes:
        print(f"note: {note}")
    print()
    if result.results:
        print("\n".join(table(result.stage, result.results, target)))
    else:
        print("no program compiled: the resident state alone is over the budget")
    print()
    print("resident per device: " + ", ".join(
        f"{k} {size(tree_bytes(v))}" for k, v in result.stage.resident.items()))
    v = result.verdict
    step = sum(r.seconds(target) * r.calls for r in result.results)
    print(f"roofline per stage step (programs x calls): {step:.1f} s")
    print(f"peak in stage: {gib(v.peak)} GiB per device ({v.worst}) against "
          f"{gib(v.budget)} GiB ({gib(target.hbm_bytes)} GiB HBM less {FLAGS.margin:.0%}): "
          f"{'FITS' if v.fits else 'DOES NOT FIT'}")
    for line in v.advice:
        print(f"advice: {line}")
    print(json.dumps(result.summary()))
    return 0 if result.fits else 1


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Not cli.run_main: the planner saves nothing, so SIGTERM simply ends it.
    logging.getLogger("opera_jax").setLevel(logging.INFO)
    try:
        status = run_plan()
    except cli.USER_ERRORS + (ValueError,) as e:  # bad config, target or batch shapes
        print(f"error: {e}", file=sys.stderr)
        status = 2
    sys.exit(status)


def _fake_gpus(argv) -> None:
    """For a GPU target, N fake CPU devices stand in for the GPUs: set before anything starts
    the backend (loading the config file may)."""
    for arg in argv:
        if arg.startswith("--gpus="):
            count = arg.split("=", 1)[1]
            if count.isdigit() and int(count) > 0:
                jax.config.update("jax_num_cpu_devices", int(count))


if __name__ == "__main__":
    _fake_gpus(sys.argv)
    cli.define_config(grpo_tiny, sys.argv)
    app.run(main, flags_parser=cli.parse_flags)
