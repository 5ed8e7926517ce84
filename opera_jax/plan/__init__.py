"""Ahead-of-time planning: compile every program of a stage for a target, before renting it.

    python -m opera_jax.plan --config=configs/grpo_qwen3_8b_tpu.py --topology=v5p-8
    python -m opera_jax.plan --config=configs/grpo_qwen3_8b_gpu8.py --gpus=8 --hbm_gb=139

    result = plan(parse(config), tpu_target("v5p-8"))   # the same from Python
    result.fits, result.peak, result.programs

Modules: targets (TPU accelerator types and GPU sizes) · programs (a stage's jitted programs
with abstract arguments) · report (compile, memory and cost, the fit verdict and advice).
"""

from __future__ import annotations

import dataclasses

import jax

from opera_jax.config import build
from opera_jax.plan.programs import Assumptions, Program, Stage, stage_programs
from opera_jax.plan.report import (Compiled, Verdict, compile_program, table, tree_bytes,
                                   verdict)
from opera_jax.plan.targets import Target, TargetError, gpu_target, tpu_target


@dataclasses.dataclass
class Plan:
    target: Target
    stage: Stage
    results: list[Compiled]
    verdict: Verdict
    margin: float

    @property
    def fits(self) -> bool:
        return self.verdict.fits

    @property
    def programs(self) -> dict[str, int]:
        """Program name -> its peak bytes per device within the stage (resident state beside
        it included)."""
        return {r.name: r.in_stage for r in self.results}

    def summary(self) -> dict:
        """The JSON line the command prints last."""
        return {"fits": self.fits, "target": self.target.name,
                "estimate": self.target.estimate, "stage": self.stage.name,
                "peak_bytes_per_device": self.verdict.peak, "worst_program": self.verdict.worst,
                "hbm_bytes_per_device": self.target.hbm_bytes,
                "budget_bytes_per_device": self.verdict.budget, "margin": self.margin,
                "resident_bytes_per_device": {k: tree_bytes(v)
                                              for k, v in self.stage.resident.items()},
                "programs": self.programs,
                "program_peak_bytes": {r.name: r.peak for r in self.results},
                "flops_per_call": {r.name: r.flops for r in self.results},
                "roofline_s_per_call": {r.name: r.seconds(self.target) for r in self.results},
                "advice": self.verdict.advice, "notes": self.stage.notes}


def plan(run, target: Target, *, margin: float = 0.1, assume: Assumptions = Assumptions(),
         only: tuple[str, ...] | None = None, progress=None) -> Plan:
    """Builds the run's mesh on the target's devices, compiles every program of its stage.

    Args:
      run: a parsed SFTRun or GRPORun.
      target: from `tpu_target` / `gpu_target`.
      margin: share of HBM kept free (fragmentation, the runtime's own buffers).
      assume: what the config leaves open (reward shapes).
      only: compile only these programs (tests); None = all.
      progress: called with each Compiled as it is done (the command prints a line).
    """
    # Traces made for the target (attention chosen for its platform) must not be reused by
    # later calls in this process: jax keys its caches on functions and arguments, not on
    # `attention.for_platform`.
    jax.clear_caches()
    try:
        return _plan(run, target, margin, assume, only, progress)
    finally:
        jax.clear_caches()


def _plan(run, target, margin, assume, only, progress) -> Plan:
    mesh_section = run.mesh
    if mesh_section.num_devices is not None and mesh_section.num_devices > target.num_devices:
        raise TargetError(f"mesh.num_devices={mesh_section.num_devices} > the "
                          f"{target.num_devices} devices of {target.name}")
    mesh = build.make_mesh(mesh_section, devices=target.devices())
    stage = stage_programs(run, mesh, assume)
    results = []
    resident = sum(tree_bytes(v) for v in stage.resident.values())
    if resident > target.hbm_bytes * (1 - margin) and only is None:
        # The verdict is certain before any compile: say so at once (8B state on a 16 GiB
        # chip would otherwise spend many minutes compiling programs that cannot run).
        return Plan(target, stage, [], verdict(stage, [], target, run, margin), margin)
    for p in stage.programs:
        if only is not None and p.name not in only:
            continue
        results.append(compile_program(p, stage, target))
        if progress is not None:
            progress(results[-1])
    return Plan(target, stage, results, verdict(stage, results, target, run, margin), margin)


__all__ = ["Assumptions", "Compiled", "Plan", "Program", "Stage", "Target", "TargetError",
           "gpu_target", "plan", "table", "tpu_target"]
