"""One attention function with per-platform backends.

Axis letters (shared with qwen3.py): B batch, T query length, S key length, N query heads,
K kv heads, G query heads per kv head (N = K·G), H head dim.

The mask is always the AND of
  * segments: query i sees key j only if `q_segment_ids[i] == kv_segment_ids[j] != 0`
    (0 marks padding / empty cache slots; distinct ids separate packed sequences);
  * causality by slot: `kv_slots[j] <= q_slots[i]` (slot = index in the key buffer);
  * an optional dense boolean `mask` [B, T, S] for anything else (e.g. prefix cuts).

Backends:
  * "xla"    — the reference: plain einsums, any mask, float32 softmax. Runs everywhere.
  * "cudnn"  — `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs, for
               plain causal self-attention (training on unpadded rows, prefill).
  * "splash" — Pallas splash attention on TPU.
  * None     — pick by platform: cudnn on GPU, splash on TPU, xla elsewhere.
A backend that cannot take the request (dtype, mask kind, shapes) falls back to "xla" and logs
why once per reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import logging

import jax
import jax.numpy as jnp

from opera_jax import sharding as sh

log = logging.getLogger(__name__)

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionImpl(str, enum.Enum):
    XLA = "xla"
    CUDNN = "cudnn"
    SPLASH = "splash"


_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("platform", default=None)


@contextlib.contextmanager
def for_platform(platform: str | None):
    """Within this block, traced attention picks backends for `platform` ("tpu", "gpu", "cpu")
    whatever this process runs on: the planner compiles TPU programs on a CPU host."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def target_platform() -> str:
    """The platform a traced call is compiled for: `for_platform`'s, else the active
    activation mesh's devices', else the default backend."""
    if _PLATFORM.get() is not None:
        return _PLATFORM.get()
    mesh = sh.current_mesh()
    if mesh is not None:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


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


def _cudnn_attention(q, k, v):
    """cuDNN fused causal self-attention (q, k, v [B, T, N|K, H]; GQA handled by cuDNN)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def splash_attention(q, k, v, q_segment_ids, kv_segment_ids, *, interpret: bool = False):
    """Pallas splash attention (TPU), causal with segment ids; q [B, T, N, H], k/v [B, T, K, H].

    Differs from the xla path only on padding rows (segment 0), whose outputs are unused:
    splash lets pads attend to pads where xla returns zeros. `interpret=True` runs the kernel
    in the Pallas interpreter (any platform; tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as sk, splash_attention_mask as sm)

    b, t, n, h = q.shape
    kh = k.shape[2]
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(n)])
    kernel = sk.make_splash_mha_single_device(mask, interpret=interpret)
    # splash wants [N, T, H] per example and expects pre-scaled q.
    qt = jnp.swapaxes(q * (h ** -0.5), 1, 2)
    kt = jnp.swapaxes(jnp.repeat(k, n // kh, axis=2), 1, 2)
    vt = jnp.swapaxes(jnp.repeat(v, n // kh, axis=2), 1, 2)
    seg = sk.SegmentIds(q=q_segment_ids, kv=kv_segment_ids)
    out = jax.vmap(kernel)(qt, kt, vt, segment_ids=seg)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def attention(q, k, v, *, q_segment_ids, kv_segment_ids, q_slots, kv_slots, mask=None,
              impl: AttentionImpl | str | None = None, prefill_causal: bool = False):
    """Masked grouped-query attention, dispatched to a backend.

    Args:
      q: [B, T, N, H] queries (rotary already applied).
      k, v: [B, S, K, H] keys and values (the whole key buffer, cache included).
      q_segment_ids: int [B, T]; kv_segment_ids: int [B, S] (0 = never attended).
      q_slots: int [B, T]; kv_slots: int [B, S] — slot indices for causality.
      mask: optional bool [B, T, S], ANDed with the above.
      impl: backend name or None for the platform default.
      prefill_causal: the caller promises T == S, q_slots == kv_slots == arange and every
        segment id nonzero and equal within a row (plain causal self-attention): lets fused
        kernels use their built-in causal mask.
    Returns:
      [B, T, N, H].
    """
    impl = AttentionImpl(impl) if impl is not None else default_impl()
    if impl is not AttentionImpl.XLA:
        reason = _unsupported(impl, q, k, mask, prefill_causal)
        if reason is None:
            if impl is AttentionImpl.CUDNN:
                return _cudnn_attention(q, k, v)
            return splash_attention(q, k, v, q_segment_ids, kv_segment_ids)
        _warn_once(impl.value, reason)
    return xla_attention(q, k, v, build_mask(q_segment_ids, kv_segment_ids, q_slots, kv_slots,
                                             mask))


def _unsupported(impl: AttentionImpl, q, k, mask, prefill_causal: bool) -> str | None:
    """Why `impl` cannot take this call, or None if it can."""
    platform = target_platform()
    if impl is AttentionImpl.CUDNN:
        if platform not in ("gpu", "cuda"):
            return f"needs an NVIDIA GPU, platform is {platform}"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN takes bf16/fp16, got {q.dtype}"
        if q.shape[-1] > 128 or q.shape[-1] % 8:
            return f"head_dim {q.shape[-1]} not supported by cuDNN"
        if not prefill_causal or mask is not None:
            # Padding, packing, cache and prefix-cut masks go to xla: a dense mask turns into
            # a dense bias in cuDNN, and fully masked rows are not defined there.
            return "the cuDNN path takes plain causal self-attention only"
        return None
    if impl is AttentionImpl.SPLASH:
        if platform != "tpu":
            return f"needs a TPU, platform is {platform}"
        if not prefill_causal or mask is not None:
            return "splash takes causal self-attention with segment ids only"
        if q.shape[1] % 128:
            return f"sequence length {q.shape[1]} is not a multiple of 128"
        if q.shape[-1] % 128:
            return f"head_dim {q.shape[-1]} is not a multiple of 128"
        return None
    return None
