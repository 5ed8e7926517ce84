"""Llama 3.x and Qwen2.5 in the same decoder, against transformers' LlamaForCausalLM and
Qwen2ForCausalLM (random weights, float32): logits past the llama3 rope scaling's original
context, export round trip, KV cache, greedy sampling, the reward kernel, config errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import LLAMA3_ROPE, make_hf_model
from opera_jax import export_hf, load_pretrained, make_mesh
from opera_jax import tokenizer as tk
from opera_jax.model import ConfigError, Family, KVCache, Qwen3, Qwen3Config, RopeScaling
from opera_jax.model.qwen3 import rope_frequencies
from opera_jax.reward import RewardConfig, score_token_ids
from opera_jax.sampling import Sampler, token_bytes
from opera_jax.sharding import activation_mesh

TOL = 1e-4
EOS, PAD = 1021, 1019  # the embedded tokenizer's <|im_end|> and pad
CHECKPOINTS = {  # name -> make_hf_model arguments
    "llama_tied": dict(family="llama", tie=True, seed=10, rope_scaling=LLAMA3_ROPE),
    "llama_untied": dict(family="llama", tie=False, seed=11, rope_scaling=LLAMA3_ROPE),
    "qwen2": dict(family="qwen2", tie=False, seed=12),
}
# The sampler and reward tests compile the most: one checkpoint per family.
ONE_PER_FAMILY = ["llama_tied", "qwen2"]
SUPPORTED = "Qwen3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (path, torch reference, our model, tokenizer), each built once."""
    built = {}

    def get(name):
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            ref = make_hf_model(path, **CHECKPOINTS[name], bos_token_id=None, eos_token_id=EOS,
                                pad_token_id=PAD)
            built[name] = (str(path), ref, *load_pretrained(path))
        return built[name]
    return get


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_transformers_past_original_context(checkpoint, name):
    _, ref, model, _ = checkpoint(name)
    cfg = model.config
    assert cfg.family is Family(CHECKPOINTS[name]["family"])
    assert not cfg.qk_norm and cfg.attention_bias == (cfg.family is Family.QWEN2)
    assert (cfg.rope_scaling is not None) == (cfg.family is Family.LLAMA)
    assert cfg.num_params == sum(p.numel() for p in ref.parameters())
    ids = np.random.RandomState(0).randint(0, 1024, (2, 96))  # 3× the original 32 positions
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert np.abs(got - _torch_logits(ref, ids)).max() <= TOL


def test_rope_scaling_is_not_a_no_op(checkpoint):
    """Without the scaling the same weights agree at position 0 only: llama3 scaling changes
    the frequencies themselves, so it acts at every position (not only past 32)."""
    _, ref, model, _ = checkpoint("llama_tied")
    plain = Qwen3(model.config.replace(rope_scaling=None), rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(model))
    ids = np.random.RandomState(1).randint(0, 1024, (1, 96))
    diff = np.abs(np.asarray(plain(jnp.asarray(ids, jnp.int32))) - _torch_logits(ref, ids))
    diff = diff.max(-1)[0]  # [T]
    assert diff[0] <= TOL and diff[1:].max() > 10 * TOL


@pytest.mark.parametrize("theta,head_dim,factor,original", [
    (500_000.0, 128, 8.0, 8192),  # Llama 3.1
    (500_000.0, 64, 32.0, 8192),  # Llama 3.2 1B
    (10_000.0, 32, 8.0, 32),  # the tiny test model
])
def test_rope_frequencies_equal_transformers(theta, head_dim, factor, original):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(rope_type="llama3", rope_theta=theta, factor=factor, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position_embeddings=original)
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                   head_dim=head_dim, max_position_embeddings=16 * original,
                                   rope_parameters=params)
    want = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")[0].numpy()
    got = np.asarray(rope_frequencies(head_dim, theta, RopeScaling(factor, 1.0, 4.0, original)))
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)  # within an ulp
    plain = np.asarray(rope_frequencies(head_dim, theta))
    assert (got == plain).any() and (got < plain).any()  # some kept, some stretched


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_export_reloads_in_transformers(checkpoint, name, tmp_path):
    _, ref, model, tok = checkpoint(name)
    out = export_hf(model, tmp_path / "export", tokenizer=tok)
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["architectures"] == [model.config.family.architecture]
    assert written["model_type"] == model.config.family.value
    assert Qwen3Config.from_hf_dir(out) == model.config
    back = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(back) is type(ref)
    ids = np.random.RandomState(2).randint(0, 1024, (2, 80))
    np.testing.assert_allclose(_torch_logits(back, ids), _torch_logits(ref, ids), atol=1e-5)
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    assert np.abs(_torch_logits(back, ids) - ours).max() <= TOL


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "llama_tied" else n
                                  for n in CHECKPOINTS])
def test_kv_cache_step_equals_full_forward(checkpoint, name):
    _, _, model, _ = checkpoint(name)
    ids = jnp.asarray(np.random.RandomState(3).randint(0, 1024, (2, 48)), jnp.int32)
    full = np.asarray(model(ids))
    cache = KVCache.init(model.config, 2, 64)
    _, cache = model(ids[:, :47], cache=cache)
    step, cache = model(ids[:, 47:], cache=cache)  # position 47: past the original 32
    assert int(cache.end) == 48
    assert np.abs(np.asarray(step)[:, 0] - full[:, 47]).max() <= TOL


def test_biases_load_sharded(checkpoint):
    """q/k/v biases carry logical axes: split over `tensor` like their heads; same logits."""
    path, _, single, _ = checkpoint("qwen2")
    mesh = make_mesh(2, 2, 2)
    sharded, _ = load_pretrained(path, mesh=mesh)
    attn = sharded.layers[0].self_attn
    assert attn.q_bias[...].sharding.spec == P("tensor", None)  # [N=4, H]
    assert {s.data.shape for s in attn.k_bias[...].addressable_shards} == {(1, 32)}  # [K=2, H]
    ids = np.random.RandomState(5).randint(0, 1024, (4, 24)).astype(np.int32)
    with activation_mesh(mesh):
        tokens = jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp"))))
        got = jax.jit(lambda m, t: m(t))(sharded, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(single(jnp.asarray(ids))), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_greedy_sampler_matches_transformers_generate(checkpoint, name):
    _, ref, model, tok = checkpoint(name)
    prompts = [np.random.RandomState(4).randint(0, 1000, n).tolist() for n in (7, 19)]
    sampler = Sampler(model, token_pieces=token_bytes(tok), eos_ids=[EOS], pad_id=PAD)
    out = sampler.sample(prompts, max_new_tokens=24, temperature=0.0)  # to position 42
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24,
                            do_sample=False)[:, width:].numpy()
    for r in range(len(prompts)):
        tokens, _ = out.row(r)
        assert tokens.tolist() == want[r, :len(tokens)].tolist()
        assert len(tokens) == 24 or tokens[-1] == EOS


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_reward_kernel_equals_naive(checkpoint, name):
    _, _, model, tok = checkpoint(name)
    prompts = ["Write a poem about rain.", "Give me advice."]
    responses = ["<think>\nOkay, a poem.\n\nHmm, the smell of rain.\n\nBut short.\n</think>\n\n"
                 "Rain on the roof.", "<think>\nSleep.\n\nWait, also walk.</think>Walk."]
    references = ["Rain taps on the roof tonight.", "Sleep well and walk daily."]
    args = ([tk.encode(tok, tk.apply_chat_template(tok, p)) for p in prompts],
            [tk.encode(tok, y) for y in responses], [tk.encode(tok, a) for a in references],
            [0, 1])
    config = RewardConfig(min_bucket=128)
    kernel = score_token_ids(model, tok, *args, config=config)
    naive = score_token_ids(model, tok, *args, config=config.replace(lp_impl="naive"))
    assert [len(s) for s in kernel.lp_segments] == [3, 2]
    for field in ("lp_full", "lp_initial"):
        np.testing.assert_allclose(kernel[field], naive[field], rtol=0, atol=1e-5)
    for k, n in zip(kernel.lp_segments, naive.lp_segments):
        np.testing.assert_allclose(k, n, rtol=0, atol=1e-5)


# ---- config.json: families, rope layouts, errors ----

def _raw(family: Family, **changes) -> dict:
    raw = Qwen3Config.preset("tiny").replace(family=family).to_hf_dict()
    raw.update(changes)
    return raw


@pytest.mark.parametrize("arch,model_type", [("MistralForCausalLM", "mistral"),
                                             ("Qwen3MoeForCausalLM", "qwen3_moe")])
def test_unsupported_architecture_names_file_and_supported(tmp_path, arch, model_type):
    (tmp_path / "config.json").write_text(json.dumps(
        _raw(Family.QWEN3, architectures=[arch], model_type=model_type)))
    with pytest.raises(ConfigError) as e:
        load_pretrained(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg and arch in msg and SUPPORTED in msg


def test_family_from_model_type_without_architectures():
    for family in Family:
        raw = _raw(family)
        del raw["architectures"]
        assert Qwen3Config.from_hf_dict(raw).family is family
    with pytest.raises(ConfigError, match=f"model_type='mistral' is not supported.*{SUPPORTED}"):
        Qwen3Config.from_hf_dict({**raw, "model_type": "mistral"}, source="/x/config.json")


def test_rope_scaling_read_from_either_layout():
    want = Qwen3Config.preset("tiny-llama")
    legacy = want.to_hf_dict()  # rope_scaling + rope_theta beside it
    assert legacy["rope_scaling"]["rope_type"] == "llama3"
    assert Qwen3Config.from_hf_dict(legacy) == want
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**legacy["rope_scaling"], "rope_theta": legacy["rope_theta"]}
    assert Qwen3Config.from_hf_dict(v5) == want
    # transformers' fallback: original_max_position_embeddings = max_position_embeddings
    del v5["rope_parameters"]["original_max_position_embeddings"]
    assert Qwen3Config.from_hf_dict(v5).rope_scaling.original_max_position_embeddings == 4096


@pytest.mark.parametrize("family,change,msg", [
    (Family.LLAMA, dict(attention_bias=True), "attention_bias=true is not supported for Llama"),
    (Family.LLAMA, dict(mlp_bias=True), "mlp_bias=true"),
    (Family.LLAMA, dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling="),
    (Family.LLAMA, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     r"lacks \['low_freq_factor', 'high_freq_factor'\]"),
    (Family.QWEN2, dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    (Family.QWEN2, dict(model_type="llama"), "does not match"),
])
def test_rejected_family_configs(family, change, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        Qwen3Config.from_hf_dict(_raw(family, **change), source="/x/config.json")
    assert "/x/config.json" in str(e.value)


def test_presets():
    # Published parameter counts (model cards): 1.24B, 8.03B, 0.49B, 7.61B.
    counts = {"llama3.2-1b": 1_235_814_400, "llama3.1-8b": 8_030_261_248,
              "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512}
    for name, count in counts.items():
        cfg = Qwen3Config.preset(name)
        assert cfg.num_params == count, name
        assert Qwen3Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    # q/k/v biases: one add per element per layer on top of the matmuls
    llama, qwen2 = Qwen3Config.preset("tiny-llama"), Qwen3Config.preset("tiny-qwen2")
    assert qwen2.flops_per_token(10) - llama.flops_per_token(10) == 2 * (4 + 2 * 2) * 32
