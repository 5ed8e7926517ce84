"""Hugging Face checkpoints (Qwen3, Llama 3.x, Qwen2.5) ⇄ sharded NNX parameters.

Loading reads `config.json` and `model.safetensors` (or the shards listed in
`model.safetensors.index.json`) one tensor at a time: each tensor is memory-mapped, converted
to the target layout and dtype, and every device receives only its own shard
(`jax.make_array_from_callback`), so host memory stays near the largest tensor.

Exporting writes config.json, safetensors (split into shards above `max_shard_bytes`, with an
index), generation_config.json and the tokenizer files, which `transformers` loads as is.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from opera_jax.model import safetensors_io
from opera_jax.model.build import abstract_model, param_shardings
from opera_jax.model.config import Qwen3Config
from opera_jax.model.qwen3 import Qwen3
from opera_jax.outputs import output_dir
from opera_jax.sharding import to_host
from opera_jax.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# ---- the name map: HF tensor name <-> our parameter path, with layout transforms ----
# Each entry: HF suffix, our path suffix, to_ours(hf_array, cfg), to_hf(our_array, cfg).
# HF linear weights are [out, in]; ours are [in, out] with heads split out ([D, N, H] etc.).


def _t(w, cfg):
    return w.T


# einops on numpy gives views: the memory-mapped tensor is only read slice by slice later.
def _split_heads_in(w, cfg):
    return einops.rearrange(w, "(N H) D -> D N H", H=cfg.head_dim)


def _merge_heads_in(w, cfg):
    return einops.rearrange(w, "D N H -> (N H) D")


def _split_heads_out(w, cfg):
    return einops.rearrange(w, "D (N H) -> N H D", H=cfg.head_dim)


def _merge_heads_out(w, cfg):
    return einops.rearrange(w, "N H D -> D (N H)")


def _same(w, cfg):
    return w


def _split_bias(b, cfg):
    return einops.rearrange(b, "(N H) -> N H", H=cfg.head_dim)


def _merge_bias(b, cfg):
    return einops.rearrange(b, "N H -> (N H)")


_LAYER_MAP: list[tuple[str, tuple[str, ...], Callable, Callable]] = [
    ("input_layernorm.weight", ("input_layernorm", "scale"), _same, _same),
    ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), _same, _same),
    ("self_attn.q_proj.weight", ("self_attn", "q_proj"), _split_heads_in, _merge_heads_in),
    ("self_attn.k_proj.weight", ("self_attn", "k_proj"), _split_heads_in, _merge_heads_in),
    ("self_attn.v_proj.weight", ("self_attn", "v_proj"), _split_heads_in, _merge_heads_in),
    ("self_attn.o_proj.weight", ("self_attn", "o_proj"), _split_heads_out, _merge_heads_out),
]
# Per family, after _LAYER_MAP: Qwen3's q/k norms, Qwen2's q/k/v biases.
_QK_NORM_MAP = [
    ("self_attn.q_norm.weight", ("self_attn", "q_norm", "scale"), _same, _same),
    ("self_attn.k_norm.weight", ("self_attn", "k_norm", "scale"), _same, _same),
]
_BIAS_MAP = [
    ("self_attn.q_proj.bias", ("self_attn", "q_bias"), _split_bias, _merge_bias),
    ("self_attn.k_proj.bias", ("self_attn", "k_bias"), _split_bias, _merge_bias),
    ("self_attn.v_proj.bias", ("self_attn", "v_bias"), _split_bias, _merge_bias),
]
_MLP_MAP = [
    ("mlp.gate_proj.weight", ("mlp", "gate_proj"), _t, _t),
    ("mlp.up_proj.weight", ("mlp", "up_proj"), _t, _t),
    ("mlp.down_proj.weight", ("mlp", "down_proj"), _t, _t),
]


def name_map(cfg: Qwen3Config) -> dict[str, tuple[tuple, Callable, Callable]]:
    """HF tensor name -> (our state path, to_ours, to_hf), for every tensor of `cfg`."""
    out = {"model.embed_tokens.weight": (("embed_tokens",), _same, _same),
           "model.norm.weight": (("norm", "scale"), _same, _same)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head",), _t, _t)
    layer_map = (_LAYER_MAP + (_QK_NORM_MAP if cfg.qk_norm else [])
                 + (_BIAS_MAP if cfg.attention_bias else []) + _MLP_MAP)
    for i in range(cfg.num_hidden_layers):
        for hf, ours, fwd, bwd in layer_map:
            out[f"model.layers.{i}.{hf}"] = (("layers", i) + ours, fwd, bwd)
    return out


def hf_shape(cfg: Qwen3Config, name: str) -> tuple[int, ...]:
    """The shape HF stores tensor `name` with, for config `cfg`."""
    d, f, v, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    n, k = cfg.num_attention_heads, cfg.num_key_value_heads
    suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
    return {
        "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (n * h, d), "self_attn.k_proj.weight": (k * h, d),
        "self_attn.v_proj.weight": (k * h, d), "self_attn.o_proj.weight": (d, n * h),
        "self_attn.q_norm.weight": (h,), "self_attn.k_norm.weight": (h,),
        "self_attn.q_proj.bias": (n * h,), "self_attn.k_proj.bias": (k * h,),
        "self_attn.v_proj.bias": (k * h,),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }[suffix]


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold a loadable model."""


# Tensors some checkpoints carry that the model does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _weight_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file holding it."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: no valid 'weight_map' ({e})") from e
        out = {}
        for name, file in weight_map.items():
            full = os.path.join(path, file)
            if not os.path.isfile(full):
                raise CheckpointError(f"{index} lists {file} for {name!r}, but {full} is missing")
            out[name] = full
        return out
    if os.path.isfile(single):
        return {name: single for name in safetensors_io.SafetensorsFile(single).keys()}
    if any(f.endswith(".bin") for f in os.listdir(path)):
        raise CheckpointError(f"{path}: only PyTorch .bin weights found; save with "
                              "safe_serialization=True (safetensors) to load here")
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf_model(path: str | os.PathLike, *, dtype="float32", param_dtype=None,
                  mesh: Mesh | None = None, attention_impl=None, remat=False) -> Qwen3:
    """Loads a local HF directory of a supported family into a (sharded) `Qwen3` decoder.

    Args:
      path: directory with config.json and safetensors weights.
      dtype: compute dtype; param_dtype: storage dtype (default: dtype). Weights are cast on
        load.
      mesh: shard parameters over this mesh (None: device 0).
    Raises:
      FileNotFoundError: missing directory / config.json.
      ConfigError: not a supported architecture (config.Family), or an unsupported option.
      CheckpointError: missing, unexpected or wrongly shaped tensors (named in the message).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    cfg = Qwen3Config.from_hf_dir(path)
    files = _weight_files(path)
    names = name_map(cfg)
    present = {n for n in files if not n.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings and "lm_head.weight" in present:
        present.discard("lm_head.weight")  # a tied checkpoint may still store the copy
    missing = sorted(set(names) - present)
    unexpected = sorted(present - set(names))
    if missing:
        raise CheckpointError(f"{path}: tensor(s) missing from the checkpoint: {_short(missing)}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor(s) for config.json's architecture: "
                              f"{_short(unexpected)}")

    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype,
                              attention_impl=attention_impl, remat=remat)
    graphdef, state = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh)
    open_files: dict[str, safetensors_io.SafetensorsFile] = {}
    for hf_name, (ours, to_ours, _) in names.items():
        file = files[hf_name]
        st = open_files.setdefault(file, safetensors_io.SafetensorsFile(file))
        shape = st.shape(hf_name)
        want = hf_shape(cfg, hf_name)
        if shape != want:
            raise CheckpointError(f"{file}: tensor {hf_name!r} has shape {shape}, config.json "
                                  f"implies {want}")
        var = _at(state, ours)
        host = to_ours(st.get(hf_name), cfg)  # a view of the memory map, no copy yet
        target = var.get_value()
        var.set_value(_to_device(host, target.dtype, _at(shardings, ours)))
    return nnx.merge(graphdef, state)


def _to_device(host: np.ndarray, dtype, sharding) -> jax.Array:
    """Each device gets its slice of `host`, cast on the host slice by slice."""
    np_dtype = np.dtype(dtype)
    return jax.make_array_from_callback(
        host.shape, sharding, lambda idx: np.ascontiguousarray(host[idx], dtype=np_dtype))


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" … ({len(names)} in all)" if len(names) > n else "")


def export_hf(model: Qwen3, out_dir: str | os.PathLike, *, tokenizer=None, dtype=None,
              max_shard_bytes: int = 4 << 30, overwrite: bool = False) -> str:
    """Writes `model` as a HF directory of its family (e.g. LlamaForCausalLM); returns the path.

    The files go into a fresh directory that then replaces `out_dir` (outputs.output_dir): an
    interrupted export leaves `out_dir` as it was, and no file of an earlier export survives
    next to the new ones.

    Args:
      model: the model (any sharding; gathered tensor by tensor).
      out_dir: the output directory; one that holds files is refused unless `overwrite`.
      tokenizer: a transformers tokenizer to save alongside (with its chat template).
      dtype: dtype of the written tensors (default: the parameters' dtype).
      max_shard_bytes: split into model-0000i-of-0000n.safetensors above this size.
      overwrite: replace a non-empty `out_dir` as a whole.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    with output_dir(out_dir, overwrite=overwrite, what="export",
                    flag="overwrite=True (--overwrite)") as tmp:
        _write_hf(model, tmp, tokenizer=tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return out_dir


def _write_hf(model: Qwen3, out_dir: str | None, *, tokenizer, dtype, max_shard_bytes: int):
    """The files of `export_hf`; `out_dir` None (processes other than 0) only takes part in
    gathering the tensors, which is collective across processes."""
    cfg = model.config
    state = nnx.state(model)
    names = name_map(cfg)
    out_dtype = np.dtype(dtype) if dtype is not None else None

    def nbytes(name):
        var = _at(state, names[name][0]).get_value()
        return int(np.prod(var.shape)) * (out_dtype or np.dtype(var.dtype)).itemsize

    # Plan the shards from shapes alone, then gather and write one shard at a time, so the
    # host holds at most one shard (not the whole model).
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        if shards[-1] and size + nbytes(name) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(name)

    def host_tensors(shard):
        for name in shard:
            ours, _, to_hf = names[name]
            arr = to_hf(np.asarray(to_host(_at(state, ours).get_value())), cfg)
            yield name, np.ascontiguousarray(arr if out_dtype is None else arr.astype(out_dtype))

    if out_dir is None:
        for shard in shards:
            for _ in host_tensors(shard):
                pass
        return
    if len(shards) == 1:
        safetensors_io.write(os.path.join(out_dir, "model.safetensors"), host_tensors(shards[0]))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors_io.write(os.path.join(out_dir, file), host_tensors(shard))
            weight_map.update({name: file for name in shard})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(map(nbytes, names))},
                       "weight_map": weight_map}, f, indent=2)
    written = out_dtype or np.dtype(_at(state, ("embed_tokens",)).get_value().dtype)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = str(written)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    gen = {k: v for k, v in (("bos_token_id", hf_cfg.get("bos_token_id")),
                             ("eos_token_id", hf_cfg.get("eos_token_id"))) if v is not None}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load_pretrained(path: str | os.PathLike, *, dtype="float32", mesh: Mesh | None = None,
                    param_dtype=None, attention_impl=None, remat=False):
    """Loads a HF Qwen3, Llama 3.x or Qwen2.5 directory: returns `(model, tokenizer)`.

    The tokenizer comes from the same directory with local files only (never a hub call).
    See `load_hf_model` for the arguments and errors.
    """
    model = load_hf_model(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                          attention_impl=attention_impl, remat=remat)
    return model, load_tokenizer(os.fspath(path))
