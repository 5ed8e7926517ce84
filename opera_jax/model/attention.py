"""One attention function with per-platform backends.

Axis letters (shared with qwen3.py): B batch, T query length, S key length, N query heads,
K kv heads, G query heads per kv head (N = K·G), H head dim.

The mask is always the AND of
  * segments: query i sees key j only if `q_segment_ids[i] == kv_segment_ids[j] != 0`
    (0 marks padding / empty cache slots; distinct ids separate packed sequences);
  * causality by slot: `kv_slots[j] <= q_slots[i]` (slot = index in the key buffer);
  * an optional dense boolean `mask` [B, T, S] for anything else (e.g. prefix cuts).
The fused kernels take the model's slot layout as given: kv_slots = arange(S) and
q_slots = q_slots[:, :1] + arange(T) (a cache's queries follow its end).

Call shapes (`Layout`, static, from the caller) and the backend each takes:

  | call                                   | GPU ("cudnn")                   | TPU ("splash")            |
  | -------------------------------------- | ------------------------------- | ------------------------- |
  | causal, unpadded (training, log-probs) | cuDNN, built-in causal mask     | splash, causal            |
  | right-padded rows (one sequence + pad) | cuDNN with per-row seq lengths  | splash with segment ids   |
  | packed rows, left padding (prefill)    | Pallas flash (flash_gpu.py)     | splash with segment ids   |
  | cached, static offset (reward windows) | Pallas flash                    | splash, causal at offset  |
  | cached, traced offset                  | Pallas flash                    | xla (logged) [1]          |
  | decode, T = 1 against the cache        | Pallas flash (G heads a block)  | decode kernel (decode_tpu)|
  | a dense `mask`                         | xla                             | xla                       |

[1] The reward kernel's chunked prefill unrolls its chunks on a TPU, so their offsets are
static and splash takes them; a traced offset (a `lax.scan` over chunks) would come here.

Backends: "xla" (the reference: einsums, float32 softmax, any mask, everywhere), "cudnn" (the
GPU path above), "flash" (the Pallas GPU kernel for every call shape), "splash" (the TPU path
above); None picks by platform: cudnn on GPU, splash on TPU, xla elsewhere. Kernels run under
`shard_map` when an activation mesh is active (batch over data + fsdp, heads over tensor):
custom calls cannot be partitioned by XLA. A backend that cannot take a call (dtype, shapes,
a dense mask) falls back to "xla" and logs why, once per reason. `for_platform` lets the
planner choose backends for a TPU or GPU it compiles for on a CPU host; for a GPU estimate on CPU
devices the fused kernels are stood in for by `blockwise.py` (their algorithm in XLA loops).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import logging

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from opera_jax import sharding as sh
from opera_jax.model import blockwise, decode_tpu, flash_gpu, splash_tpu

log = logging.getLogger(__name__)

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionImpl(str, enum.Enum):
    XLA = "xla"
    CUDNN = "cudnn"
    FLASH = "flash"
    SPLASH = "splash"


class Layout(str, enum.Enum):
    """What the caller knows about a call's masks, statically (see the module's table)."""

    CAUSAL = "causal"              # no cache, T == S, every segment id 1
    RIGHT_PADDED = "right_padded"  # each row: one sequence (segment 1) then padding (0)
    GENERAL = "general"            # whatever the segment ids and slots say


_TARGET: contextvars.ContextVar[tuple[str, bool, bool] | None] = contextvars.ContextVar(
    "attention_target", default=None)


@contextlib.contextmanager
def for_platform(platform: str | None, *, interpret: bool = False, stand_in: bool = False):
    """Within this block, traced attention picks backends for `platform` ("tpu", "gpu",
    "cpu") whatever this process runs on. `interpret`: Pallas kernels run in the interpreter
    (tests). `stand_in`: the GPU kernels (cuDNN, Pallas flash) are replaced by `blockwise`,
    their algorithm in XLA loops with their memory (the planner's GPU estimate on CPU devices,
    where neither compiler exists). jax caches traces by function and arguments, not by this
    context: clear them after (`plan` does)."""
    token = _TARGET.set(None if platform is None else (platform, interpret, stand_in))
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform a traced call is compiled for: `for_platform`'s, else the active
    activation mesh's devices', else the default backend ("cuda" reads as "gpu")."""
    if _TARGET.get() is not None:
        return _TARGET.get()[0]
    mesh = sh.current_mesh()
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return "gpu" if platform in ("gpu", "cuda") else platform


def _interpret() -> bool:
    """Run Pallas kernels in the interpreter: as `for_platform` says, else when the call
    runs on the CPU (where no Pallas compiler exists)."""
    target = _TARGET.get()
    if target is not None:
        return target[1]
    return target_platform() == "cpu"


def _stand_in() -> bool:
    target = _TARGET.get()
    return bool(target and target[2])


def default_impl(platform: str | None = None) -> AttentionImpl:
    """The fast backend for a platform ("gpu"/"cuda", "tpu", "cpu")."""
    platform = platform or target_platform()
    if platform in ("gpu", "cuda"):
        return AttentionImpl.CUDNN
    if platform == "tpu":
        return AttentionImpl.SPLASH
    return AttentionImpl.XLA


@functools.lru_cache(maxsize=None)
def _warn_once(backend: str, reason: str) -> None:
    log.warning("attention backend %r cannot run this call (%s); using 'xla'", backend, reason)


def build_mask(q_segment_ids, kv_segment_ids, q_slots, kv_slots, mask=None):
    """The boolean mask [B, T, S] described in the module docstring."""
    seg = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (
        kv_segment_ids[:, None, :] != 0)
    causal = kv_slots[:, None, :] <= q_slots[:, :, None]
    out = seg & causal
    if mask is not None:
        out = out & mask
    return out


def xla_attention(q, k, v, mask):
    """Reference grouped-query attention.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool [B, T, S].
    Returns:
      [B, T, N, H] in q's dtype. Fully masked query rows return zeros.
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    # Batch dims (B, K) leading and H minor in both matmuls: on the CPU this is 2.5-4x faster
    # than contracting the [B, S, K, H] layout directly (no per-step relayout of the cache;
    # the transposes cancel against a cache stored as [B, K, S, H]).
    q = jnp.transpose(q.reshape(b, t, kh, n // kh, h), (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    k = jnp.swapaxes(k, 1, 2)  # [B, K, S, H]
    v = jnp.swapaxes(v, 1, 2)
    # Scores and softmax in float32: bf16 logits lose too much for long contexts.
    scores = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    m = mask[:, None, None, :, :]
    scores = jnp.where(m, scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(m, probs, 0.0)  # rows with no visible key give 0, not a uniform average
    out = jnp.einsum("BKGTS,BKSH->BKGTH", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    out = jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]
    return out.reshape(b, t, n, h).astype(q.dtype)




def attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_slots, kv_slots, mask=None,
              impl: AttentionImpl | str | None = None, layout: Layout = Layout.GENERAL,
              q_offset: int | None = None):
    """Masked grouped-query attention, dispatched to a backend.

    Args:
      q: [B, T, N, H] queries (rotary already applied).
      k, v: [B, S, K, H] keys and values (the whole key buffer, cache included).
      q_segment_ids: int [B, T]; kv_segment_ids: int [B, S] (0 = never attended).
      q_slots: int [B, T]; kv_slots: int [B, S] — slot indices for causality.
      mask: optional bool [B, T, S], ANDed with the above.
      impl: backend name or None for the platform default.
      layout: what the caller promises about the segment ids (`Layout`).
      q_offset: the slot of query 0 when it is static (0 without a cache; a cache's end when
        the caller holds it as a Python int); None when traced.
    Returns:
      [B, T, N, H].
    """
    impl = AttentionImpl(impl) if impl is not None else default_impl()
    if impl is AttentionImpl.XLA:
        return _xla(q, k, v, q_segment_ids, kv_segment_ids, q_slots, kv_slots, mask)
    platform = target_platform()
    run, reason = None, None
    if mask is not None:
        reason = "a dense mask goes to xla"
    elif impl in (AttentionImpl.CUDNN, AttentionImpl.FLASH):
        run, reason = _gpu_route(impl, platform, q, k, layout, q_offset)
    elif impl is AttentionImpl.SPLASH:
        run, reason = _tpu_route(platform, q, k, q_offset)
    if run is None:
        _warn_once(impl.value, reason)
        return _xla(q, k, v, q_segment_ids, kv_segment_ids, q_slots, kv_slots, mask)
    return _sharded(run, q, k, v, q_segment_ids, kv_segment_ids, q_slots[:, 0])


def _xla(q, k, v, q_segment_ids, kv_segment_ids, q_slots, kv_slots, mask):
    return xla_attention(q, k, v, build_mask(q_segment_ids, kv_segment_ids, q_slots, kv_slots,
                                             mask))


def _gpu_route(impl, platform, q, k, layout: Layout, q_offset):
    """(kernel taking (q, k, v, q_seg, kv_seg, q_offset), None) or (None, why not)."""
    interpret = _interpret()
    if platform == "gpu" and _stand_in():  # the planner's estimate: the kernels' memory
        return blockwise.blockwise_attention, None
    if platform != "gpu" and not (impl is AttentionImpl.FLASH and interpret):
        return None, f"needs an NVIDIA GPU, platform is {platform}"
    h = q.shape[-1]
    cudnn_ok = (impl is AttentionImpl.CUDNN and not interpret
                and q.dtype in (jnp.bfloat16, jnp.float16) and h <= 128 and h % 8 == 0)
    if cudnn_ok and layout is Layout.CAUSAL:
        return _cudnn_causal, None
    if cudnn_ok and layout is Layout.RIGHT_PADDED and q_offset == 0:
        return _cudnn_padded, None
    # Everything else (and cuDNN's dtypes and head sizes) through the Pallas kernel.
    return functools.partial(flash_gpu.flash_attention, interpret=interpret), None


def _tpu_route(platform, q, k, q_offset):
    interpret = _interpret()
    if platform != "tpu":
        return None, f"needs a TPU, platform is {platform}"
    t, s, h = q.shape[1], k.shape[1], q.shape[-1]
    if h % 128:
        return None, f"head_dim {h} is not a multiple of 128"
    if t == 1:
        if decode_tpu.block_size(s) is None:
            return None, f"decode: {s} cache slots are not a multiple of 128"
        return lambda q, k, v, qs, ks, off: decode_tpu.decode_attention(
            q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), qs, ks, off,
            interpret=interpret), None
    if q_offset is None:
        return None, "splash needs a static query offset (a traced cache end)"
    return lambda q, k, v, qs, ks, off: splash_tpu.splash_attention(
        q, k, v, qs, ks, q_offset=q_offset, interpret=interpret), None


def _cudnn_causal(q, k, v, q_segment_ids, kv_segment_ids, q_offset):
    """cuDNN fused causal self-attention (GQA handled by cuDNN)."""
    del q_segment_ids, kv_segment_ids, q_offset
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _cudnn_padded(q, k, v, q_segment_ids, kv_segment_ids, q_offset):
    """cuDNN causal attention over right-padded rows: per-row query / key lengths. Padding
    queries return zeros, as on the xla path."""
    del q_offset
    q_len = jnp.sum(q_segment_ids != 0, axis=1).astype(jnp.int32)
    kv_len = jnp.sum(kv_segment_ids != 0, axis=1).astype(jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=q_len,
                                       key_value_seq_lengths=kv_len, implementation="cudnn")
    return jnp.where((q_segment_ids != 0)[:, :, None, None], out, 0).astype(q.dtype)


def _sharded(kernel, q, k, v, q_segment_ids, kv_segment_ids, q_offset):
    """`kernel` per shard when an activation mesh is active: rows over the batch axes, heads
    over tensor when it divides both N and K (else heads stay whole)."""
    mesh = sh.current_mesh()
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    b, _, n, _ = q.shape
    kh = k.shape[2]
    batch = sh.logical_to_spec(("batch",), (b,), mesh)[0]
    tensor = mesh.shape["tensor"]
    heads = "tensor" if tensor > 1 and n % tensor == 0 and kh % tensor == 0 else None
    qkv = P(batch, None, heads, None)
    fn = jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch, None),
                                                    P(batch, None), P(batch)),
                       out_specs=qkv, check_vma=False)
    return fn(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
