"""Device mesh and the one table that maps logical axis names to mesh axes.

Model code names array axes logically ("batch", "embed", "heads", …) and never builds a Mesh.
This module turns those names into `NamedSharding`s for a concrete mesh with axes
`data`, `fsdp`, `tensor`:

* parameters are sharded over `fsdp` on their model dimension and over `tensor` on heads / ffn /
  vocab (Megatron-style); activations' batch axis goes over `data` and `fsdp`;
* an axis whose size the mesh axes do not divide is replicated instead (e.g. 8 KV heads on a
  tensor axis of 16), so every preset runs on every mesh.

`with activation_mesh(mesh):` makes `constrain(x, names)` inside traced model code emit sharding
constraints; outside it `constrain` is the identity, so single-device code pays nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The one table: logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "cache_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    "lora_rank": None,  # LoRA adapters (model/lora.py): the small rank axis is replicated
}


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1, meaning "all remaining devices"."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
                         f"{math.prod(sizes)} devices, {len(devices)} available")
    try:
        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # odd topologies / fake CPU devices: plain row-major order is fine
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """PartitionSpec for logical axis names; drops mesh axes that do not divide `shape`."""
    spec = []
    used: set[str] = set()
    for i, name in enumerate(names):
        target = LOGICAL_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} is not in sharding.LOGICAL_RULES")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used)  # a mesh axis shards one dim at most
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            if shape is not None and axes:
                if shape[i] % math.prod(mesh.shape[a] for a in axes):
                    axes = tuple(a for a in axes if shape[i] % mesh.shape[a] == 0)[:1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def batch_shards(mesh: Mesh | None) -> int:
    """Devices along the logical batch axis (data × fsdp) of `mesh`; 1 without a mesh."""
    if mesh is None or mesh.size == 1:
        return 1
    return math.prod(mesh.shape[a] for a in ("data", "fsdp"))


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def state_shardings(state, mesh: Mesh):
    """NamedSharding for every Variable in an nnx.State (from its `logical_axes` metadata)."""
    def one(v):
        names = v.get_metadata().get("logical_axes") or (None,) * len(v.get_value().shape)
        return named_sharding(mesh, names, v.get_value().shape)
    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """Within this block, `constrain` shards activations over `mesh`."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE_MESH.reset(token)


def current_mesh() -> Mesh | None:
    return _ACTIVE_MESH.get()


def to_host(tree):
    """`jax.device_get` that also works across processes: an array spread over other
    processes' devices (not fully addressable, not replicated) is gathered to every process
    first (`process_allgather`, a collective: every process must call it). Single-process:
    exactly `jax.device_get`."""
    def gather(x):
        if (isinstance(x, jax.Array) and not x.is_fully_addressable
                and not x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x
    return jax.device_get(jax.tree.map(gather, tree))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; identity without an active mesh."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))
