"""opera_jax: OPERA (perplexity-based reflective alignment) for Qwen3 in JAX.

Public API:
  load_pretrained(path, *, dtype="float32", mesh=None) -> (model, tokenizer)
  export_hf(model, out_dir, *, tokenizer=None, dtype=None)
  init_model(config, *, mesh=None, seed=0, dtype="float32")
  Qwen3, Qwen3Config, KVCache, make_mesh
"""

from opera_jax.model.build import init_model
from opera_jax.model.config import Qwen3Config
from opera_jax.model.hf_io import export_hf, load_pretrained
from opera_jax.model.qwen3 import KVCache, Qwen3
from opera_jax.sharding import make_mesh

__version__ = "0.1.0"

__all__ = ["KVCache", "Qwen3", "Qwen3Config", "export_hf", "init_model", "load_pretrained",
           "make_mesh"]
