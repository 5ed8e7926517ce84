"""From typed sections to the objects a stage runs on: the mesh, the model, its tokenizer.

Every stage builds these the same way, here:

    mesh = make_mesh(run.mesh)
    graphdef, abstract = abstract_params(run.model, mesh)   # shapes + shardings, no memory
    params = load_params(run.model, mesh)                   # checkpoint | hf_dir | random preset
    tokenizer = load_model_tokenizer(run.model)
    model, tokenizer, saved, step = load_run(run_dir)       # a trainer's checkpoint as a model
    pol = policy(run.model, run.lora, mesh, seed=run.seed)  # what a trainer trains (LoRA or all)

A LoRA run's checkpoint holds its adapters only: wherever it is read as a model (`load_run`,
`model.checkpoint` of a later stage, export) its base is rebuilt from the run's saved `model`
section and the adapters are merged in, so the base (an `hf_dir`) must still be where it was.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from opera_jax import sharding as sh
from opera_jax.checkpoint import Checkpointer, checkpoint_dir
from opera_jax.config import sections as S
from opera_jax.config.parse import from_config
from opera_jax.model import build
from opera_jax.model import lora as lora_lib
from opera_jax.model.config import Qwen3Config
from opera_jax.model.hf_io import load_hf_model
from opera_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def make_mesh(mesh: S.Mesh, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over the first `num_devices` devices (all when None) of
    `devices` (default `jax.devices()`; the planner passes a target's compile-only devices)."""
    devices = list(jax.devices() if devices is None else devices)
    if mesh.num_devices is not None:
        if not 1 <= mesh.num_devices <= len(devices):
            raise ValueError(f"mesh.num_devices={mesh.num_devices}, but {len(devices)} "
                             f"device(s) are available")
        devices = devices[:mesh.num_devices]
    fsdp = -1 if mesh.fsdp is None else mesh.fsdp
    return sh.make_mesh(mesh.data, fsdp, mesh.tensor, devices=devices)


def architecture(model: S.Model) -> Qwen3Config:
    """The architecture: `hf_dir`'s config.json, else `preset`."""
    if model.hf_dir is not None:
        return Qwen3Config.from_hf_dir(model.hf_dir)
    if model.preset is None:
        raise ValueError("model.hf_dir and model.preset are both unset: name a checkpoint "
                         "directory or a preset")
    return Qwen3Config.preset(model.preset)


def model_kwargs(model: S.Model) -> dict:
    """Keyword arguments of `Qwen3(...)` from the section."""
    return dict(dtype=model.dtype.value, param_dtype=model.param_dtype.value,
                remat=model.remat,
                attention_impl=None if model.attention_impl is None else model.attention_impl.value)


def abstract_params(model: S.Model, mesh: Mesh):
    """(graphdef, params as ShapeDtypeStructs carrying their shardings); nothing allocated."""
    abstract = build.abstract_model(architecture(model), **model_kwargs(model))
    graphdef, state = nnx.split(abstract, nnx.Param)
    shardings = nnx.to_pure_dict(build.param_shardings(abstract, mesh))
    shapes = nnx.to_pure_dict(state)
    return graphdef, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def load_params(model: S.Model, mesh: Mesh) -> dict:
    """The initial parameters, created in their shards: from `model.checkpoint` (an Orbax
    run), else `model.hf_dir`, else random `preset` weights."""
    if model.checkpoint is not None:
        _, abstract = abstract_params(model, mesh)
        return checkpoint_params(model.checkpoint, abstract, step=model.checkpoint_step)
    kwargs = model_kwargs(model)
    if model.hf_dir is not None:
        qwen = load_hf_model(model.hf_dir, mesh=mesh, **kwargs)
    else:
        qwen = build.init_model(architecture(model), mesh=mesh, seed=model.init_seed, **kwargs)
    return nnx.to_pure_dict(nnx.state(qwen, nnx.Param))


def load_model(model: S.Model, mesh: Mesh):
    """(the `Qwen3`, its tokenizer) as the section describes."""
    graphdef, _ = abstract_params(model, mesh)
    return nnx.merge(graphdef, load_params(model, mesh)), load_model_tokenizer(model)


def load_model_tokenizer(model: S.Model):
    """The checkpoint directory's tokenizer, or the embedded tiny one for a preset."""
    return load_tokenizer(model.hf_dir)


def checkpoint_params(path: str, abstract: dict, *, step: int | None = None) -> dict:
    """The parameters of an Orbax run (its dir or checkpoints/), read into the shardings and
    dtypes of `abstract`; `step` None = the newest readable checkpoint. A LoRA run's adapters
    are merged into its base (module docstring)."""
    ckpt = Checkpointer(checkpoint_dir(path), keep=None, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory!r}")
        log.info("parameters from %s step %d", path, step)
        saved = ckpt.saved_config(step)
        lora = from_config(S.Lora, saved.get("lora", {}), f"{path}: saved config.lora")
        if lora.rank is None:
            return ckpt.restore_params(step, abstract)
        model = from_config(S.Model, saved["model"], f"{path}: saved config.model")
        mesh = jax.tree.leaves(abstract)[0].sharding.mesh
        pol = policy(model, lora, mesh)
        adapters = ckpt.restore_params(step, pol.abstract)
    finally:
        ckpt.close()
    merge = jax.jit(lambda f, a: jax.tree.map(
        lambda x, t: x.astype(t.dtype), lora_lib.merge_params(f, a, spec=lora_spec(lora)),
        abstract), out_shardings=jax.tree.map(lambda t: t.sharding, abstract))
    return merge(pol.frozen, adapters)


def lora_spec(lora: S.Lora) -> lora_lib.LoraSpec:
    return lora_lib.LoraSpec(rank=lora.rank, alpha=lora.alpha, targets=lora.targets)


def quant_spec(lora: S.Lora) -> lora_lib.QuantSpec | None:
    if lora.quantize is None:
        return None
    bits = {S.Quant.INT8: 8, S.Quant.INT4: 4}[lora.quantize]
    return lora_lib.QuantSpec(bits=bits, group_size=lora.group_size, targets=lora.targets)


@dataclasses.dataclass
class Policy:
    """What a trainer trains, from the `model` and `lora` sections (see `policy`).

    Attributes:
      graphdef: the model's graph (with adapters under LoRA).
      abstract: the trainable params as ShapeDtypeStructs carrying their shardings: every
        weight, or the adapters only.
      frozen: LoRA: the frozen base (nested dicts of sharded arrays in the compute dtype, the
        targets quantized with `lora.quantize`); None when every weight trains.
      base_graphdef: LoRA: the graph of the base alone, the KL reference; else None.
    """

    graphdef: Any
    abstract: dict
    frozen: dict | None
    base_graphdef: Any
    initial: Callable[[], dict]  # the initial trainable params

    def init(self) -> dict:
        """The trainable params to start from (the model section's weights, or fresh
        adapters: B = 0, so the adapted model starts as the base)."""
        return self.initial()

    def params(self, trainable: dict) -> dict:
        """The whole params tree of the model (the frozen base shared, not copied)."""
        return lora_lib.combine(self.frozen, trainable)

    def model(self, trainable: dict):
        """The `Qwen3` with these trainable params (over the frozen base)."""
        return nnx.merge(self.graphdef, self.params(trainable))


def lora_abstract(model: S.Model, lora: S.Lora, mesh: Mesh):
    """The shapes of a LoRA run, nothing loaded or allocated (memory planning, restores).

    Returns:
      (graphdef of the adapted model, adapters, graphdef of the base, frozen base): the
      params as nested dicts of ShapeDtypeStructs carrying their shardings; the base in the
      compute dtype with its quantized targets (int8 / int4 values, float32 scales).
    """
    spec, quant = lora_spec(lora), quant_spec(lora)
    arch, kwargs = architecture(model), model_kwargs(model)
    kwargs["param_dtype"] = kwargs["dtype"]  # the frozen base: compute dtype (adapters below)
    adapted = build.abstract_model(arch, **{**model_kwargs(model), "lora": spec, "quant": quant})
    graphdef, adapters = nnx.split(adapted, nnx.LoRAParam, ...)[:2]
    base = build.abstract_model(arch, **kwargs, quant=quant)

    def sds(state, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))

    return (graphdef, sds(adapters, build.param_shardings(adapters, mesh)),
            nnx.split(base)[0], sds(nnx.state(base), build.param_shardings(base, mesh)))


def policy(model: S.Model, lora: S.Lora, mesh: Mesh, *, seed: int = 0) -> Policy:
    """The trained model of a stage: every weight (`lora.rank` None), or LoRA adapters (in
    `model.param_dtype`, drawn from `seed`) over a frozen base loaded like any start point
    (`load_params`), cast to the compute dtype and quantized as `lora.quantize` says."""
    if lora.rank is None:
        graphdef, abstract = abstract_params(model, mesh)
        return Policy(graphdef, abstract, None, None, lambda: load_params(model, mesh))
    graphdef, abstract, base_graphdef, base = lora_abstract(model, lora, mesh)
    quant, kwargs = quant_spec(lora), model_kwargs(model)
    freeze = jax.jit(lambda p: lora_lib.quantize_params(p, quant, kwargs["dtype"]),
                     out_shardings=jax.tree.map(lambda x: x.sharding, base), donate_argnums=0)
    frozen = freeze(load_params(model, mesh))
    return Policy(graphdef, abstract, frozen, base_graphdef, lambda: build.init_adapters(
        architecture(model), mesh=mesh, seed=seed, **{**kwargs, "lora": lora_spec(lora)}))


def saved_model_section(path: str, step: int | None = None) -> tuple[S.Model, int]:
    """The `model` section a trainer's checkpoint was saved with, and the checkpoint's step."""
    ckpt = Checkpointer(checkpoint_dir(path), keep=None, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory!r}")
        saved = ckpt.saved_config(step)
    finally:
        ckpt.close()
    if "model" not in saved:
        raise ValueError(f"{path}: the checkpoint's saved config has no model section")
    return from_config(S.Model, saved["model"], f"{path}: saved config.model"), step


def load_run(path: str, *, step: int | None = None, mesh: Mesh | None = None,
             dtype: S.Dtype | None = None):
    """A trainer's checkpoint as a model.

    The saved config names the architecture (`model.hf_dir` or `model.preset`) and tokenizer;
    only the parameters are read, each straight into the sharding of the devices at hand, so
    a checkpoint written on 8 devices restores on 1 and the other way round.

    Args:
      path: a run dir or its checkpoints/ folder.
      step: checkpoint step (None: the newest).
      mesh: devices to restore onto (None: all devices, fsdp over them).
      dtype: compute dtype override (default: the run's `model.dtype`).
    Returns:
      (model, tokenizer, saved model section, step).
    """
    model, step = saved_model_section(path, step)
    if dtype is not None:
        model = dataclasses.replace(model, dtype=S.Dtype(dtype))
    mesh = mesh or make_mesh(S.Mesh())
    graphdef, abstract = abstract_params(model, mesh)
    params = checkpoint_params(path, abstract, step=step)
    return nnx.merge(graphdef, params), load_model_tokenizer(model), model, step


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_source(path: str, *, dtype: S.Dtype = S.Dtype.FLOAT32, mesh: Mesh | None = None):
    """(model, tokenizer) from an HF directory or a trainer's run directory."""
    mesh = mesh or make_mesh(S.Mesh())
    if is_hf_dir(path):
        return load_model(S.Model(hf_dir=path, preset=None, dtype=S.Dtype(dtype)), mesh)
    model, tokenizer, _, step = load_run(path, mesh=mesh, dtype=dtype)
    log.info("%s: checkpoint step %d", path, step)
    return model, tokenizer
