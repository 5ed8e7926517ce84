"""Low-rank adapters (LoRA) on the decoder's projections, and quantized frozen weights (QLoRA).

A target projection W [*in, *out] (q/k/v/o of attention, gate/up/down of the MLP) computes

    y = x · W + (alpha / r) · (x · A) · B,      A [*in, r],  B [r, *out]

A is drawn uniform(±1/sqrt(fan_in)) (PEFT's kaiming-uniform) and B starts at zero, so a fresh
adapter leaves the model exactly as it was. The adapters are `nnx.LoRAParam`s under each
module's `lora` dict (`layers/i/self_attn/lora/q_proj/{a, b}`); every other weight is the
frozen base. With `QuantSpec`, a target W is stored as int8 or int4 values and float32 scales
(`layers/i/self_attn/scales/q_proj`), one scale per `group_size` input elements of each
output channel (symmetric, absmax), and dequantized to the compute dtype where it is used.

Why not qwix (the library Tunix uses): qwix finds a module's weights by intercepting
`jnp.einsum` and matching the operand to a parameter by identity or, failing that, by shape.
Our projections compute in bf16 over float32 parameters (`w.astype(dtype)`, a new array), and
k_proj and v_proj (like gate_proj and up_proj) share a shape: qwix then silently adds no
adapter to them (measured with qwix 0.1.8 on the tiny preset in bf16: attention adapters on
q_proj and o_proj only), and its rules select modules by path, not the individual projection
weights we target. The code here is explicit instead: `project` is the one place a projection
weight is read.

    spec = LoraSpec(rank=8, alpha=16.0, targets=("q_proj", "v_proj"))
    model = Qwen3(config, lora=spec, rngs=nnx.Rngs(0))             # adapters in the graph
    merged = merge_params(frozen, adapters, spec=spec)                # plain weights, for export
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

# A target's name -> how many of its leading axes are inputs (the contracted ones).
TARGETS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
           "down_proj": 1}
QUANT_DTYPES = {8: jnp.int8, 4: jnp.int4}


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which projections get adapters, and their rank and alpha (a static part of the graph)."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        _check_targets(self.targets)
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Which projections are stored quantized: `bits` 8 or 4, one scale per `group_size`
    input elements of each output channel (None: one per output channel)."""

    bits: int
    group_size: int | None = 128
    targets: tuple[str, ...] = tuple(TARGETS)

    def __post_init__(self):
        _check_targets(self.targets)
        if self.bits not in QUANT_DTYPES:
            raise ValueError(f"quantization bits must be 8 or 4, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"quantization group size must be >= 1, got {self.group_size}")

    @property
    def dtype(self):
        return QUANT_DTYPES[self.bits]


def _check_targets(targets) -> None:
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise ValueError(f"LoRA targets must be a non-empty subset of {', '.join(TARGETS)}; "
                         f"got {', '.join(targets) or 'none'}")


class Adapter(nnx.Module):
    """The low-rank update of one projection weight [*in, *out]: a [*in, r], b [r, *out]."""

    def __init__(self, in_shape, out_shape, in_names, out_names, spec: LoraSpec, *,
                 param_dtype, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(rngs.lora(), (*in_shape, spec.rank), param_dtype, -bound, bound)
        self.a = nnx.LoRAParam(a, logical_axes=(*in_names, "lora_rank"))
        self.b = nnx.LoRAParam(jnp.zeros((spec.rank, *out_shape), param_dtype),
                               logical_axes=("lora_rank", *out_names))
        self.scale = spec.scale


def adapters(shapes: dict, spec: LoraSpec | None, *, param_dtype, rngs: nnx.Rngs):
    """An `nnx.Dict` of `Adapter`s for the targets among `shapes` (name -> (shape, logical
    names)), or None when none is a target."""
    if spec is None or not set(shapes) & set(spec.targets):
        return None
    out = {}
    for name, (shape, names) in shapes.items():
        if name in spec.targets:
            n = TARGETS[name]
            out[name] = Adapter(shape[:n], shape[n:], names[:n], names[n:], spec,
                                param_dtype=param_dtype, rngs=rngs)
    return nnx.Dict(out)


def weight(rngs: nnx.Rngs, name: str, shape, names, *, param_dtype, quant: QuantSpec | None,
           std: float = 0.02) -> nnx.Param:
    """A projection weight: normal(0, std) in `param_dtype`, or zeros in the quantized dtype
    when `quant` targets it (filled by `quantize_params` from full-precision weights)."""
    if quant is not None and name in quant.targets:
        return nnx.Param(jnp.zeros(shape, quant.dtype), logical_axes=names)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype),
                     logical_axes=names)


def scales(shapes: dict, quant: QuantSpec | None):
    """An `nnx.Dict` of the float32 scales [groups, *out] of the quantized targets among
    `shapes` (name -> (shape, logical names)), or None."""
    if quant is None or not set(shapes) & set(quant.targets):
        return None
    out = {}
    for name, (shape, names) in shapes.items():
        if name in quant.targets:
            n = TARGETS[name]
            groups = _groups(name, math.prod(shape[:n]), quant.group_size)
            out[name] = nnx.Param(jnp.ones((groups, *shape[n:]), jnp.float32),
                                  logical_axes=(None, *names[n:]))
    return nnx.Dict(out)


def _groups(name: str, fan_in: int, group_size: int | None) -> int:
    g = fan_in if group_size is None else min(group_size, fan_in)
    if fan_in % g:
        raise ValueError(f"{name}: {fan_in} input elements are not a multiple of the "
                         f"quantization group size {g}")
    return fan_in // g


def quantize(w: jax.Array, n_in: int, bits: int, groups: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax quantization of w [*in, *out] (its first n_in axes are inputs).

    Returns:
      (values in int8 / int4 shaped like w, scales float32 [groups, *out]), with
      w ≈ dequantize(values, scales, n_in, float32).
    """
    shape, out = w.shape, w.shape[n_in:]
    fan_in = math.prod(shape[:n_in])
    qmax = 2 ** (bits - 1) - 1
    w = w.astype(jnp.float32).reshape(groups, fan_in // groups, *out)
    scale = jnp.max(jnp.abs(w), axis=1) / qmax                             # [G, *out]
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero group: any scale, values 0
    values = jnp.clip(jnp.round(w / scale[:, None]), -qmax, qmax)
    return values.astype(QUANT_DTYPES[bits]).reshape(shape), scale


def dequantize(values: jax.Array, scale: jax.Array, n_in: int, dtype) -> jax.Array:
    """values [*in, *out] (int) · their group's scale [groups, *out], in `dtype`."""
    shape, out = values.shape, values.shape[n_in:]
    groups = scale.shape[0]
    w = values.astype(dtype).reshape(groups, -1, *out) * scale.astype(dtype)[:, None]
    return w.reshape(shape)


def project(einsum: str, x: jax.Array, module: nnx.Module, name: str, dtype) -> jax.Array:
    """x times the projection weight `name` of `module`, in the compute dtype: dequantized when
    the module stores it quantized, plus the adapter's low-rank update when it has one.

    Args:
      einsum: "x,W->y" with single-letter axes; W's input letters (those it shares with x)
        come first, e.g. "BTD,DNH->BTNH".
      x: the input [..., *in].
      module: holds `name` and the optional `lora` / `scales` dicts.
    Returns:
      y as the einsum gives it.
    """
    w = getattr(module, name)[...]
    quant = module.scales
    if quant is not None and name in quant:
        w = dequantize(w, quant[name][...], TARGETS[name], dtype)
    else:
        w = w.astype(dtype)
    y = jnp.einsum(einsum, x, w)
    lora = module.lora
    if lora is None or name not in lora:
        return y
    inputs, out = einsum.split("->")
    xs, ws = inputs.split(",")
    n = TARGETS[name]
    mid = "".join(c for c in xs if c not in ws[:n]) + "r"  # x's other axes, then the rank
    adapter = lora[name]
    h = jnp.einsum(f"{xs},{ws[:n]}r->{mid}", x, adapter.a[...].astype(dtype))
    return y + adapter.scale * jnp.einsum(f"{mid},r{ws[n:]}->{out}", h,
                                          adapter.b[...].astype(dtype))


def combine(frozen: dict | None, trainable: dict) -> dict:
    """One params tree (nested dicts) of the frozen base and the trainable params, for
    `nnx.merge`; arrays are shared, not copied. frozen None: `trainable` itself."""
    if frozen is None:
        return trainable
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = combine(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def quantize_params(params: dict, quant: QuantSpec | None, dtype) -> dict:
    """The frozen base of a LoRA run from full-precision params (nested dicts, no adapters):
    every weight cast to `dtype` (the compute dtype), the targets of `quant` quantized into
    values and a module-level `scales` dict (the layout `weight` / `scales` build)."""
    def walk(node):
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                out[key] = walk(value)
            elif quant is not None and key in quant.targets:
                n = TARGETS[key]
                groups = _groups(key, math.prod(value.shape[:n]), quant.group_size)
                out[key], scale = quantize(value, n, quant.bits, groups)
                out.setdefault("scales", {})[key] = scale
            else:
                out[key] = value.astype(dtype)
        return out
    return walk(params)


def merge_params(frozen: dict, adapters: dict, *, spec: LoraSpec, dtype=jnp.float32) -> dict:
    """Plain params (the layout of a model without adapters or quantization) equal to the
    adapted model: W + (alpha / r) · A·B for every adapted target, quantized weights
    dequantized, every weight in `dtype` (export; a LoRA run as a start point)."""
    def walk(base, lora):
        out = {}
        quant = base.get("scales", {})
        for key, value in base.items():
            if key == "scales":
                continue
            if isinstance(value, dict):
                out[key] = walk(value, lora.get(key, {}))
                continue
            w = (dequantize(value, quant[key], TARGETS[key], jnp.float32) if key in quant
                 else value.astype(jnp.float32))
            pair = lora.get("lora", {}).get(key)
            if pair is not None:
                w = w + spec.scale * jnp.tensordot(pair["a"].astype(jnp.float32),
                                                   pair["b"].astype(jnp.float32), axes=1)
            out[key] = w.astype(dtype)
        return out
    return walk(frozen, adapters)
