"""HF checkpoint export round trip and the loader's errors for bad input."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import make_hf_qwen3
from opera_jax import export_hf, load_pretrained
from opera_jax.model import ConfigError
from opera_jax.model import safetensors_io
from opera_jax.model.hf_io import CheckpointError, load_hf_model


@pytest.mark.parametrize("shard_bytes", [4 << 30, 200_000])
def test_export_round_trip(hf_tiny_untied, tmp_path, shard_bytes):
    path, ref = hf_tiny_untied
    model, tok = load_pretrained(path)
    out = export_hf(model, tmp_path / "export", tokenizer=tok, max_shard_bytes=shard_bytes)
    names = os.listdir(out)
    assert "config.json" in names and "tokenizer_config.json" in names
    if shard_bytes < 1 << 20:
        assert "model.safetensors.index.json" in names
        assert sum(n.endswith(".safetensors") for n in names) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor(np.random.RandomState(0).randint(0, 1024, (2, 11)))
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), ref(ids).logits.numpy(), atol=1e-5)
        ours = np.asarray(model(jnp.asarray(ids.numpy(), jnp.int32)))
        assert np.abs(back(ids).logits.numpy() - ours).max() <= 1e-4
    tok2 = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok2("Wait, but")["input_ids"] == tok("Wait, but")["input_ids"]


def test_export_bfloat16_reloads(hf_tiny, tmp_path):
    model, tok = load_pretrained(hf_tiny[0])
    out = export_hf(model, tmp_path / "bf16", dtype="bfloat16")
    st = safetensors_io.SafetensorsFile(os.path.join(out, "model.safetensors"))
    arr = st.get("model.embed_tokens.weight")
    assert arr.dtype.name == "bfloat16"
    back = load_hf_model(out)  # weights only: no tokenizer was exported here
    np.testing.assert_array_equal(np.asarray(back.embed_tokens[...]),
                                  np.asarray(model.embed_tokens[...].astype(jnp.bfloat16).astype(jnp.float32)))


@pytest.fixture
def ckpt_copy(hf_tiny, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_tiny[0], dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(path, fn):
    st = safetensors_io.SafetensorsFile(str(path / "model.safetensors"))
    tensors = fn({k: np.array(st.get(k)) for k in st.keys()})
    del st
    safetensors_io.write(str(path / "model.safetensors"), tensors)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path)


def test_missing_weights(ckpt_copy):
    os.remove(ckpt_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(ckpt_copy)


def test_other_architecture(ckpt_copy):
    _edit_config(ckpt_copy, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ConfigError, match=r"architectures=\['MistralForCausalLM'\] is not "
                                          r"supported.*Qwen3ForCausalLM, LlamaForCausalLM"):
        load_pretrained(ckpt_copy)


def test_family_weights_must_match(ckpt_copy):
    """A Qwen3 checkpoint relabelled Llama: its q/k norms are unexpected tensors."""
    _edit_config(ckpt_copy, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(CheckpointError, match=r"unexpected.*self_attn\.q_norm\.weight"):
        load_pretrained(ckpt_copy)


def test_bad_json_names_line(ckpt_copy):
    (ckpt_copy / "config.json").write_text('{\n  "vocab_size": 1024,\n  oops\n}')
    with pytest.raises(ConfigError, match=r"config.json: line 3"):
        load_pretrained(ckpt_copy)


def test_missing_tensor(ckpt_copy):
    _rewrite_weights(ckpt_copy, lambda t: {k: v for k, v in t.items()
                                           if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(ckpt_copy)


def test_unexpected_tensor(ckpt_copy):
    _rewrite_weights(ckpt_copy, lambda t: {**t, "model.layers.2.mlp.up_proj.weight":
                                           t["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.2\.mlp\.up_proj\.weight"):
        load_pretrained(ckpt_copy)


def test_shape_mismatch_names_tensor_and_shapes(ckpt_copy):
    _rewrite_weights(ckpt_copy, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight":
                                           np.zeros((32, 64), np.float32)})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has "
                                              r"shape \(32, 64\), config\.json implies \(64, 64\)"):
        load_pretrained(ckpt_copy)


def test_index_pointing_to_missing_shard(tmp_path):
    make_hf_qwen3(tmp_path, tie=True, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[0]
    os.remove(victim)
    with pytest.raises(CheckpointError, match=victim.name + ".*is missing"):
        load_pretrained(tmp_path)
