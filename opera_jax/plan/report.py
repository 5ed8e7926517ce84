"""Compile a stage's programs for a target, and judge whether the stage fits.

Per program, per device, from the compiled program's `memory_analysis()`: arguments, outputs
(less what aliases a donated argument), temporaries, and its peak = arguments + outputs −
aliased + temporaries. Its peak in the stage adds the resident buffers alive beside it that
are not its arguments (the optimizer moments while the sampler runs, the reference while the
update runs, …). The stage fits when the largest of those is within the device's HBM less
`margin`.

FLOPs and bytes come from `cost_analysis()`, per device. XLA counts the body of a loop once,
so a program whose work is one outer loop (decode steps, micro-batches, reward steps) is
multiplied by its trip count; inner loops (the log-prob chunks, a micro-batch's layers under
remat) are not, so FLOPs are a lower bound. Time is the roofline: max(FLOPs / peak FLOP/s,
bytes / HBM bandwidth) per call, times its calls per stage step.

GPU estimates compile for CPU devices. The CPU compiler fuses less and schedules differently,
and it has neither cuDNN nor Triton: attention runs `model/blockwise.py`, the flash algorithm in
XLA loops, whose memory (no T x S scores; q, k, v, output and log-sum-exp saved for the
backward pass) is that of the fused kernels; its FLOPs count one key block (XLA counts a loop
body once), so attention FLOPs are undercounted. Arguments and outputs are exact; the
temporaries are the CPU compiler's buffer assignment, which runs high: it computes bf16 matmuls
in float32 (their operands and results are float32 buffers) and all-gathers fsdp weights before
casting them. The compile keeps jax.checkpoint's barriers (`ESTIMATE_OPTIONS`), without which the
CPU compiler undoes remat. Not measured against a GPU yet (benchmarks/gpu_suite.py's memory
part makes that comparison on an H200); benchmarks/RESULTS.md compares it with the TPU
compiler's figures for the same programs and mesh.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax

from opera_jax import sharding as sh
from opera_jax.model import attention
from opera_jax.plan.programs import Program, Stage
from opera_jax.plan.targets import GiB, Target


# The CPU compiler drops jax.checkpoint's optimization barriers early (its
# "cse_barrier_expander" pass), after which CSE merges the backward pass's recomputation with
# the forward pass: remat is silently undone, and a GPU estimate would keep every layer's
# activations. Keeping the barriers (as XLA:GPU and XLA:TPU do) keeps remat.
ESTIMATE_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


@dataclasses.dataclass
class Compiled:
    """One program's figures per device (bytes, FLOPs, seconds)."""

    name: str
    shapes: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    live: int            # resident bytes alive beside it
    flops: float         # per call
    bytes_accessed: float
    calls: int
    compile_s: float

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def in_stage(self) -> int:
        return self.peak + self.live

    def seconds(self, target: Target) -> float:
        """Roofline time of one call."""
        return max(self.flops / target.peak_flops, self.bytes_accessed / target.hbm_bandwidth)


def tree_bytes(tree) -> int:
    """Bytes per device of an abstract (or concrete) pytree: each leaf's shard."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def compile_program(p: Program, stage: Stage, target: Target) -> Compiled:
    """Lowers and compiles `p` for the target's devices (under the stage's activation mesh and
    the target's attention platform) and reads its memory and cost analyses."""
    t0 = time.perf_counter()
    live = sum(tree_bytes(stage.resident[k]) for k in p.live)
    # Pallas's TPU lowering asks the default device for the chip's tiling and generation;
    # here that is the CPU, so the target's first device is made the default while lowering.
    default = stage.mesh.devices.flat[0] if target.platform == "tpu" else None
    with sh.activation_mesh(stage.mesh), attention.for_platform(
            target.platform, stand_in=target.estimate), jax.default_device(default):
        lowered = p.fn.lower(*p.args, **p.kwargs)
        try:
            compiled = lowered.compile(ESTIMATE_OPTIONS if target.estimate else None)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            # The TPU compiler refuses a program whose temporaries exceed HBM: it does not
            # fit, and the message says by how much.
            return Compiled(name=p.name, shapes=f"{p.shapes} (compile refused: out of HBM)",
                            arguments=tree_bytes(p.args),
                            outputs=0, aliased=0, temporaries=_exhausted_bytes(str(e), target),
                            live=live, flops=0.0, bytes_accessed=0.0, calls=p.calls,
                            compile_s=time.perf_counter() - t0)
    elapsed = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else {}
    return Compiled(name=p.name, shapes=p.shapes, arguments=mem.argument_size_in_bytes,
                    outputs=mem.output_size_in_bytes, aliased=mem.alias_size_in_bytes,
                    temporaries=mem.temp_size_in_bytes, live=live,
                    flops=float(cost.get("flops", 0.0)) * p.loop_trips,
                    bytes_accessed=float(cost.get("bytes accessed", 0.0)) * p.loop_trips,
                    calls=p.calls, compile_s=elapsed)


def _exhausted_bytes(message: str, target: Target) -> int:
    """The temporaries a RESOURCE_EXHAUSTED compile error names ("... HLO temporaries (37.43G)
    exceeds available HBM ..."), or the whole HBM when it names none: over budget either way."""
    found = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    if found is None:
        return target.hbm_bytes
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def size(n: float) -> str:
    """Bytes for the table: GiB from 1 GiB up, MiB below."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2 ** 20:.1f} MiB"


def table(stage: Stage, results: list[Compiled], target: Target) -> list[str]:
    """The per-program table, bytes per device."""
    lines = [f"| program | call shape | args | outputs | temps | peak | in stage | "
             f"TFLOP/call | roofline s/call | calls/step | compile s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        lines.append(f"| {r.name} | {r.shapes} | {size(r.arguments)} | "
                     f"{size(r.outputs - r.aliased)} | {size(r.temporaries)} | {size(r.peak)} | "
                     f"{size(r.in_stage)} | {r.flops / 1e12:.3g} | {r.seconds(target):.3g} | "
                     f"{r.calls} | {r.compile_s:.0f} |")
    return lines


@dataclasses.dataclass
class Verdict:
    fits: bool
    peak: int            # largest in-stage peak per device
    worst: str           # its program
    budget: int          # HBM less the margin
    advice: list[str]


def verdict(stage: Stage, results: list[Compiled], target: Target, run,
            margin: float) -> Verdict:
    """Whether the stage fits, and if not what to change (from the worst program's kind).
    Without results (not compiled: the resident state alone is over budget) the peak is the
    resident state."""
    budget = int(target.hbm_bytes * (1 - margin))
    if not results:
        resident = sum(tree_bytes(v) for v in stage.resident.values())
        return Verdict(resident <= budget, resident, "resident state", budget,
                       _advice(stage, None, target, run, budget))
    worst = max(results, key=lambda r: r.in_stage)
    fits = worst.in_stage <= budget
    advice: list[str] = []
    if not fits:
        advice = _advice(stage, worst, target, run, budget)
    return Verdict(fits, worst.in_stage, worst.name, budget, advice)


def _advice(stage: Stage, worst: Compiled | None, target: Target, run, budget: int) -> list[str]:
    resident = sum(tree_bytes(v) for v in stage.resident.values())
    total_resident = resident * target.num_devices  # sharded state, summed over devices
    out = []
    if resident > budget:
        need = math.ceil(total_resident / budget)
        out.append(f"the resident state alone ({gib(resident)} GiB per device: params, "
                   f"optimizer{', reference' if 'reference' in stage.resident else ''}) "
                   f"exceeds {gib(budget)} GiB: shard it over more devices (fsdp over >= "
                   f"{need} devices of this size), or a larger target")
    if worst is None:
        out.append("programs not compiled: the resident state is over budget before any runs")
        return out
    over = worst.in_stage - budget
    name = worst.name.removeprefix("val_")
    model = run.model
    if name in ("prefill", "decode"):
        ppc = run.rollout.prompts_per_call or run.rollout.num_prompts
        out.append(f"{worst.name} needs {gib(over)} GiB more: fewer rows per sampler call "
                   f"(rollout.prompts_per_call={max(1, ppc // 2)}; now {ppc} x "
                   f"{run.rollout.n} rows) or more devices on the batch axis (mesh.fsdp / "
                   f"mesh.data)")
    elif name in ("update", "old_logprobs", "ref_logprobs", "train_step"):
        if not model.remat:
            out.append("model.remat=True (rematerialise each layer in the backward pass)")
        if name == "train_step":
            accum, cur, rows = "sft.grad_accum", run.sft.grad_accum, run.sft.batch_size
            splits = cur
        else:
            accum, cur = "grpo.grad_accum", run.grpo.grad_accum
            rows = run.rollout.num_prompts * run.rollout.n
            splits = cur * run.grpo.num_minibatches
        shards = sh.batch_shards(stage.mesh)
        if rows // (splits * 2) >= shards and rows % (splits * 2) == 0:
            out.append(f"{worst.name} needs {gib(over)} GiB more: smaller micro-batches "
                       f"({accum}={cur * 2}) or more fsdp devices")
        else:  # halving the micro-batch would leave a batch shard without a row
            out.append(f"{worst.name} needs {gib(over)} GiB more: its micro-batch is already "
                       f"{rows // splits} rows over {shards} batch shards, so shorter rows "
                       f"(sequence length), tensor parallelism (mesh.tensor) or a larger "
                       f"target")
    elif name == "reward":
        out.append(f"reward needs {gib(over)} GiB more: reward.batch_size="
                   f"{max(1, run.reward.batch_size // 2)}, reward.contexts_per_step="
                   f"{max(1, run.reward.contexts_per_step // 2)} or reward.prefill_chunk="
                   f"{max(128, run.reward.prefill_chunk // 2)}")
    return out
