"""The Qwen3 decoder in Flax NNX, also running Llama 3.x and Qwen2.5 (config.Family).

Axis letters, used in einsum strings, shape comments and logical sharding names:
  B batch, T query length, S key length (cache slots), N query heads, K kv heads,
  G query heads per kv head, H head dim, D model dim, F ffn dim, V vocab, L layers.

Matches Hugging Face `Qwen3ForCausalLM`: RMSNorm (float32 statistics), grouped-query attention
with a per-head RMSNorm on q and k before rotary embeddings (rotate-half layout), SwiGLU MLP,
tied or untied LM head, no biases. The other families differ only in attention:
`LlamaForCausalLM` has no q/k norm and may scale its rotary frequencies (llama3),
`Qwen2ForCausalLM` has no q/k norm and adds biases to q, k and v.

Masking (see attention.py): tokens attend causally (by slot) to keys with the same nonzero
segment id. Segment id 0 marks padding; distinct ids separate packed sequences. Left padding =
segment 0 on the pads, 1 elsewhere, with positions counting from the first real token.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from opera_jax.model import attention as attn_lib
from opera_jax.model import lora as lora_lib
from opera_jax.model.config import Qwen3Config, RopeScaling
from opera_jax.model.lora import LoraSpec, QuantSpec, project
from opera_jax.model.logprobs import token_logprobs
from opera_jax.model.paged import PagedKVCache, PagedLayer
from opera_jax.sharding import constrain


def _param(rngs: nnx.Rngs, shape, names, dtype, *, std: float = 0.02, ones: bool = False):
    value = jnp.ones(shape, dtype) if ones else std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=names)


class RMSNorm(nnx.Module):
    """x · rsqrt(mean(x²) + eps) · scale, statistics in float32 (as HF Qwen3RMSNorm)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs, names=("norm",)):
        self.eps = eps
        self.scale = _param(rngs, (dim,), names, param_dtype, ones=True)

    def __call__(self, x):
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(dtype) * xf.astype(dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None):
    """Inverse frequencies float32 [H/2]; with `scaling`, Llama 3's long-context version.

    The llama3 branch follows transformers' `_compute_llama3_parameters` step for step in
    float32 (same band edges; values within an ulp).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept; the band
    # between interpolates smoothly from one to the other.
    scaled = jnp.where(wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor,
                       inv_freq)
    smooth = ((old_len / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < old_len / scaling.high_freq_factor) & ~(
        wavelen > old_len / scaling.low_freq_factor)
    return jnp.where(medium, smoothed, scaled)


def rotary(x, positions, theta: float, scaling: RopeScaling | None = None):
    """Rotary embedding, HF rotate-half layout. x: [B, T, N, H]; positions: int [B, T]."""
    h = x.shape[-1]
    inv_freq = rope_frequencies(h, theta, scaling)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values, one array per layer.

    Slots [0, end) are written; new tokens go to [end, end + T). `segment_ids` gives each slot's
    segment (0 = empty or masked): callers may replace it to hide slots (e.g. cut a context).

    Layout: one [B, K, S, H] buffer per layer (not one stacked [L, ...] array, and heads before
    slots). A decode step then updates each buffer in place and the attention matmuls read it
    where it lies; slicing a layer out of a stacked array copied the whole cache every step.
    """

    k: tuple[jax.Array, ...]  # L × [B, K, S, H]
    v: tuple[jax.Array, ...]  # L × [B, K, S, H]
    segment_ids: jax.Array  # int32 [B, S]
    end: jax.Array  # int32 [] — slots written so far (shared by all rows); a Python int
    # when the caller knows it statically (fused kernels then know where the queries sit)

    LOGICAL_AXES = ("batch", "act_kv_heads", "cache_seq", "head_dim")  # of each k / v buffer
    SLOT_AXIS = 2

    @classmethod
    def init(cls, config: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   end=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]

    def map_kv(self, fn) -> "KVCache":
        """The cache with `fn` applied to every layer's k and v buffer [B, K, S, H]."""
        return self.replace(k=tuple(map(fn, self.k)), v=tuple(map(fn, self.v)))


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, attention_impl, rngs: nnx.Rngs,
                 lora: LoraSpec | None = None, quant: QuantSpec | None = None):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.rope_theta = cfg.rope_theta
        self.rope_scaling = cfg.rope_scaling
        shapes = {"q_proj": ((d, n, h), ("embed", "heads", "head_dim")),
                  "k_proj": ((d, k, h), ("embed", "kv_heads", "head_dim")),
                  "v_proj": ((d, k, h), ("embed", "kv_heads", "head_dim")),
                  "o_proj": ((n, h, d), ("heads", "head_dim", "embed"))}
        w = lambda name: lora_lib.weight(rngs, name, *shapes[name], param_dtype=param_dtype,
                                         quant=quant)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = map(w, shapes)
        # Adapters and quantization scales of the projections (model/lora.py), None without.
        self.lora = lora_lib.adapters(shapes, lora, param_dtype=param_dtype, rngs=rngs)
        self.scales = lora_lib.scales(shapes, quant)
        # Family-specific parts, None where the family has none: q/k norms (Qwen3), q/k/v
        # biases (Qwen2). Each is assigned once: NNX fixes an attribute's kind on assignment.
        norm = lambda: RMSNorm(h, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs,
                               names=("head_dim",))
        bias = lambda heads, name: _param(rngs, (heads, h), (name, "head_dim"), param_dtype)
        self.q_norm = norm() if cfg.qk_norm else None
        self.k_norm = norm() if cfg.qk_norm else None
        self.q_bias = bias(n, "heads") if cfg.attention_bias else None
        self.k_bias = bias(k, "kv_heads") if cfg.attention_bias else None
        self.v_bias = bias(k, "kv_heads") if cfg.attention_bias else None

    def __call__(self, x, *, positions, segment_ids, mask, layer_cache, layout, q_offset):
        """x: [B, T, D]; layout / q_offset: static hints for the fused kernels (attention.py).

        layer_cache: None, or (this layer's k [B,K,S,H], v, kv_segment_ids [B,S], end). The new
        keys/values are written into the buffers in place (one dynamic-update-slice each) and
        the updated buffers are returned.
        """
        dt = self.dtype
        q, k, v = self._project_qkv(x, positions)
        q = constrain(q, ("batch", "seq", "act_heads", "head_dim"))
        k = constrain(k, ("batch", "seq", "act_kv_heads", "head_dim"))
        b, t = x.shape[:2]
        if isinstance(layer_cache, PagedLayer):  # paged KV (sampling engine): writes + attends
            out, new_kv = layer_cache.attend(q, k, v)
            return project("BTNH,NHD->BTD", out, self, "o_proj", dt), new_kv
        if layer_cache is None:
            slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            keys, values, kv_seg, kv_slots, q_slots = k, v, segment_ids, slots, slots
            new_kv = None
        else:
            ck, cv, kv_seg, end = layer_cache
            zero = jnp.zeros((), jnp.int32)
            start = (zero, zero, end, zero)
            ck = jax.lax.dynamic_update_slice(ck, jnp.swapaxes(k, 1, 2).astype(ck.dtype), start)
            cv = jax.lax.dynamic_update_slice(cv, jnp.swapaxes(v, 1, 2).astype(cv.dtype), start)
            s = ck.shape[2]
            kv_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            q_slots = end + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            new_kv = (ck, cv)
            # [B, S, K, H] for the backends; xla_attention's own transpose cancels this one.
            keys = jnp.swapaxes(ck, 1, 2).astype(dt)
            values = jnp.swapaxes(cv, 1, 2).astype(dt)
        out = attn_lib.attention(q, keys, values, q_segment_ids=segment_ids,
                                 kv_segment_ids=kv_seg, q_slots=q_slots, kv_slots=kv_slots,
                                 mask=mask, impl=self.attention_impl, layout=layout,
                                 q_offset=q_offset)  # [B, T, N, H]
        y = project("BTNH,NHD->BTD", out, self, "o_proj", dt)
        return y, new_kv

    def _project_qkv(self, x, positions):
        """q [B, T, N, H], k and v [B, T, K, H] from x [B, T, D]: biases, q/k norms, rotary."""
        dt = self.dtype
        q = project("BTD,DNH->BTNH", x, self, "q_proj", dt)
        k = project("BTD,DKH->BTKH", x, self, "k_proj", dt)
        v = project("BTD,DKH->BTKH", x, self, "v_proj", dt)
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotary(q, positions, self.rope_theta, self.rope_scaling)
        k = rotary(k, positions, self.rope_theta, self.rope_scaling)
        return q, k, v


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs,
                 lora: LoraSpec | None = None, quant: QuantSpec | None = None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype = dtype
        shapes = {"gate_proj": ((d, f), ("embed", "mlp")), "up_proj": ((d, f), ("embed", "mlp")),
                  "down_proj": ((f, d), ("mlp", "embed"))}
        w = lambda name: lora_lib.weight(rngs, name, *shapes[name], param_dtype=param_dtype,
                                         quant=quant)
        self.gate_proj, self.up_proj, self.down_proj = map(w, shapes)
        self.lora = lora_lib.adapters(shapes, lora, param_dtype=param_dtype, rngs=rngs)
        self.scales = lora_lib.scales(shapes, quant)

    def __call__(self, x):  # [B, T, D]
        dt = self.dtype
        gate = project("BTD,DF->BTF", x, self, "gate_proj", dt)
        up = project("BTD,DF->BTF", x, self, "up_proj", dt)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"))
        return project("BTF,FD->BTD", h, self, "down_proj", dt)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, attention_impl, rngs: nnx.Rngs,
                 lora: LoraSpec | None = None, quant: QuantSpec | None = None):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, dtype=dtype, attention_impl=attention_impl, lora=lora,
                                   quant=quant, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, dtype=dtype, lora=lora, quant=quant, **kw)

    def __call__(self, x, *, positions, segment_ids, mask, layer_cache, layout, q_offset):
        h, new_kv = self.self_attn(self.input_layernorm(x), positions=positions,
                                   segment_ids=segment_ids, mask=mask, layer_cache=layer_cache,
                                   layout=layout, q_offset=q_offset)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "seq", "act_embed")), new_kv


def positions_from_segment_ids(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment: [B, T] → [B, T] (pads: 0 before the first)."""
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), ~same], axis=1)
    idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


class Qwen3(nnx.Module):
    """Decoder LM of any `config.Family` (the name is historical).

    Args:
      config: architecture.
      dtype: compute dtype (activations, matmul inputs). Softmax, norms' statistics and
        log-probs are float32 regardless.
      param_dtype: storage dtype of the parameters.
      attention_impl: "xla" | "cudnn" | "splash" | None (platform default).
      remat: rematerialise each layer in the backward pass (saves activation memory).
      lora: low-rank adapters on the projections (model/lora.py; drawn from the `lora` rng
        stream, else `default`); None = none.
      quant: projections stored quantized (QLoRA's frozen base; values filled by
        `lora.quantize_params`); None = none.
    """

    def __init__(self, config: Qwen3Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention_impl: str | None = None, remat: bool = False, rngs: nnx.Rngs,
                 lora: LoraSpec | None = None, quant: QuantSpec | None = None):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.remat = remat
        d, v = config.hidden_size, config.vocab_size
        self.embed_tokens = _param(rngs, (v, d), ("vocab", "embed"), param_dtype)
        self.layers = nnx.List([
            DecoderLayer(config, dtype=self.dtype, param_dtype=param_dtype,
                         attention_impl=attention_impl, rngs=rngs, lora=lora, quant=quant)
            for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(d, config.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else _param(
            rngs, (d, v), ("embed", "vocab"), param_dtype)

    def head_weight(self) -> jax.Array:
        """[D, V] output projection in the compute dtype."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.dtype)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, mask: jax.Array | None = None,
                 cache: KVCache | None = None, return_hidden: bool = False,
                 right_padded: bool = False) -> Any:
        """Runs the decoder.

        Args:
          tokens: int32 [B, T].
          positions: int [B, T] rotary positions. Default: position within the segment when
            `segment_ids` is given, else 0..T-1 (plus `cache.end` with a cache).
          segment_ids: int [B, T]; 0 = padding. Default: all ones.
          mask: optional bool [B, T, S] ANDed with the causal/segment mask (S = T without a
            cache, the cache length with one).
          cache: a KVCache; the new keys/values are written at slots [end, end + T). Or a
            paged.PagedKVCache (row b's new tokens at positions starts[b] + t, see paged.py).
          return_hidden: return final-normed hidden states [B, T, D] instead of logits.
          right_padded: the caller promises every row is one sequence (segment 1) followed by
            padding (0), starting at slot 0: fused kernels then take per-row lengths.
        Returns:
          logits float32 [B, T, V] (or hidden [B, T, D]); with a cache, (that, new_cache).
        """
        b, t = tokens.shape
        causal = segment_ids is None and mask is None and cache is None and positions is None
        layout = (attn_lib.Layout.CAUSAL if causal else attn_lib.Layout.RIGHT_PADDED
                  if right_padded else attn_lib.Layout.GENERAL)
        # The queries' first slot when static: 0 without a cache, a cache's end held as a
        # Python int (the reward kernel's windows); None when traced.
        q_offset = 0 if cache is None else cache.end if isinstance(cache.end, int) else None
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            if cache is not None:
                positions = cache.end + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            else:
                positions = positions_from_segment_ids(segment_ids)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(self.dtype)  # [B, T, D]
        x = constrain(x, ("batch", "seq", "act_embed"))

        paged = isinstance(cache, PagedKVCache)  # its own layout: model/paged.py
        if cache is not None and not paged:
            kv_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                  (0, cache.end))
        if cache is not None:
            ck, cv = list(cache.k), list(cache.v)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layer(i, ck[i], cv[i]) if paged else (
                ck[i], cv[i], kv_seg, cache.end)
            kwargs = dict(positions=positions, segment_ids=segment_ids, mask=mask,
                          layer_cache=layer_cache, layout=layout, q_offset=q_offset)
            if self.remat and cache is None:
                x, kv = nnx.remat(lambda lyr, y: lyr(y, **kwargs))(layer, x)
            else:
                x, kv = layer(x, **kwargs)
            if kv is not None:
                ck[i], cv[i] = kv
        x = self.norm(x)
        out = x if return_hidden else jnp.einsum(
            "BTD,DV->BTV", x, self.head_weight(), preferred_element_type=jnp.float32)
        if cache is None:
            return out
        if paged:
            return out, cache.replace(k=tuple(ck), v=tuple(cv))
        new_cache = KVCache(k=tuple(ck), v=tuple(cv), segment_ids=kv_seg, end=cache.end + t)
        return out, new_cache

    def logprobs(self, hidden: jax.Array, targets: jax.Array, *, chunk_size: int = 512,
                 temperature: float | jax.Array = 1.0, return_entropy: bool = False):
        """float32 log p(targets) from hidden states [B, T, D]; see logprobs.token_logprobs."""
        return token_logprobs(hidden, targets, self.head_weight(), chunk_size=chunk_size,
                              temperature=temperature, return_entropy=return_entropy)
