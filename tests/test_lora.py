"""LoRA and QLoRA (model/lora.py, config/build.policy): fresh adapters leave the model as it
was, the update is (alpha / r)·x·A·B, quantized targets equal an independent numpy absmax
quantization, SFT with adapters lowers the loss and checkpoints only the adapters, and the
merged export (orbax → HF directory) gives the adapted model's logits in PyTorch."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opera_jax.config import build
from opera_jax.config import sections as S
from opera_jax.config.runs import GRPORun, SFTRun
from opera_jax.model.hf_io import export_hf
from opera_jax.train import sft
from opera_jax.train.metrics import read_metrics

TOKENS = (jnp.arange(40, dtype=jnp.int32).reshape(2, 20) * 37) % 1000


def one_device():
    return build.make_mesh(S.Mesh(num_devices=1))


def plain_with(params: dict, replace: dict):
    """A plain tiny Qwen3 (HF fixture's architecture) with some weights replaced: `replace`
    maps (layer, module, name) -> numpy weight."""
    params = jax.tree.map(np.asarray, params)
    for (layer, module, name), w in replace.items():
        params["layers"][layer][module][name] = w
    return params


def numpy_absmax(w: np.ndarray, n_in: int, bits: int, group: int) -> np.ndarray:
    """w after symmetric absmax quantization with one scale per `group` input elements of
    each output channel (numpy, float64), dequantized."""
    shape = w.shape
    fan_in = int(np.prod(shape[:n_in]))
    x = w.astype(np.float64).reshape(fan_in // group, group, -1)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(x).max(axis=1, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return (np.clip(np.round(x / scale), -qmax, qmax) * scale).reshape(shape)


@pytest.mark.slow  # the default suite stays under ~10 min on 2 cores
def test_fresh_adapters_leave_the_model_unchanged_and_the_update_is_xab(hf_tiny):
    mesh = one_device()
    model = S.Model(hf_dir=hf_tiny[0], preset=None)
    plain, _ = build.load_model(model, mesh)
    trained = build.policy(model, S.Lora(rank=4, alpha=8.0), mesh, seed=3)
    adapters = trained.init()
    pair = adapters["layers"][1]["self_attn"]["lora"]["q_proj"]
    bound = 1 / np.sqrt(64)  # A ~ uniform(±1/sqrt(fan_in)), B = 0
    assert np.abs(pair["a"]).max() <= bound and np.abs(pair["a"]).min() > 0
    assert not np.any(pair["b"]) and pair["a"].shape == (64, 4) and pair["b"].shape == (4, 4, 32)
    np.testing.assert_array_equal(trained.model(adapters)(TOKENS), plain(TOKENS))
    # a nonzero B on two projections: the same as the plain model with W + (alpha/r)·A·B
    rng = np.random.default_rng(0)
    changed = jax.tree.map(np.asarray, adapters)
    edits = {}
    for layer, module, name in ((1, "self_attn", "q_proj"), (0, "mlp", "down_proj")):
        ab = changed["layers"][layer][module]["lora"][name]
        ab["b"] = rng.normal(0, 0.05, ab["b"].shape).astype(np.float32)
        w = np.asarray(nnx.state(plain)["layers"][layer][module][name][...])
        edits[(layer, module, name)] = w + 2.0 * np.tensordot(ab["a"], ab["b"], axes=1)
    want = nnx.merge(nnx.split(plain)[0], plain_with(nnx.to_pure_dict(nnx.state(plain)), edits))
    got = trained.model(jax.tree.map(jnp.asarray, changed))(TOKENS)
    np.testing.assert_allclose(got, want(TOKENS), atol=2e-5, rtol=1e-5)
    assert float(jnp.abs(got - plain(TOKENS)).max()) > 1e-3  # the update does something


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32)])
def test_quantized_base_equals_an_independent_quantization(hf_tiny, bits, group):
    mesh = one_device()
    model = S.Model(hf_dir=hf_tiny[0], preset=None)
    plain, _ = build.load_model(model, mesh)
    lora = S.Lora(rank=2, targets=("k_proj", "o_proj", "up_proj"),
                  quantize=f"int{bits}", group_size=group)
    trained = build.policy(model, lora, mesh)
    layer = trained.frozen["layers"][0]
    assert layer["self_attn"]["k_proj"].dtype == (jnp.int8 if bits == 8 else jnp.int4)
    assert layer["self_attn"]["q_proj"].dtype == jnp.float32  # not a target: compute dtype
    # o_proj [N, H, D] has two input axes: N·H = 128 input elements per output channel
    assert layer["self_attn"]["scales"]["o_proj"].shape == (128 // (group or 128), 64)
    state = nnx.to_pure_dict(nnx.state(plain))
    edits = {(i, m, n): numpy_absmax(np.asarray(state["layers"][i][m][n]), k, bits,
                                     group or int(np.prod(state["layers"][i][m][n].shape[:k])))
             for i in range(2) for m, n, k in (("self_attn", "k_proj", 1),
                                               ("self_attn", "o_proj", 2), ("mlp", "up_proj", 1))}
    want = nnx.merge(nnx.split(plain)[0], plain_with(state, edits))(TOKENS)
    np.testing.assert_allclose(trained.model(trained.init())(TOKENS), want, atol=2e-5)
    assert float(jnp.abs(want - plain(TOKENS)).max()) > 1e-4  # the quantization is visible


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory):
    """Six SFT steps of int4 QLoRA adapters on the tiny preset (toy traces)."""
    workdir = str(tmp_path_factory.mktemp("lora_sft"))
    run = SFTRun(workdir=workdir, model=S.Model(preset="tiny"), mesh=S.Mesh(num_devices=1),
                 data=S.Data(path="toy:sft:64", num_threads=0),
                 sft=S.SFT(steps=6, batch_size=4, seq_len=256,
                           optim=S.Optim(lr=1e-2, warmup_frac=0.0)),
                 lora=S.Lora(rank=8, alpha=16.0, quantize="int4", group_size=32),
                 checkpoint=S.Checkpoint(every=None, async_save=False))
    state = sft.train(run)
    return run, state


def test_sft_with_adapters_lowers_the_loss_and_checkpoints_only_them(lora_sft):
    run, state = lora_sft
    losses = [r["loss"] for r in read_metrics(run.workdir)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    assert leaves and all("lora" in jax.tree_util.keystr(p) for p, _ in leaves)
    # the checkpoint holds the adapters and their moments, nothing of the base: no saved
    # array (orbax's tree metadata) outside a `lora` dict belongs to a layer or embedding
    meta = json.load(open(os.path.join(run.workdir, "checkpoints", "6", "state", "_METADATA")))
    keys = list(meta["tree_metadata"])
    params = [k for k in keys if k.startswith("('params',")]
    assert len(params) == 2 * 7 * 2  # layers x targets x (A, B)
    base = [k for k in keys if "'lora'" not in k and any(
        name in k for name in ("'layers'", "'embed_tokens'", "'norm'", "'lm_head'"))]
    assert not base, base
    assert sum("'opt_state'" in k and "'lora'" in k for k in keys) == 2 * len(params)  # mu, nu
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    n_base = 2 * (64 * 128 + 2 * 64 * 64 + 128 * 64 + 3 * 64 * 192)  # the targets alone
    assert n_adapter < n_base / 3


def test_merged_export_equals_the_adapted_model(lora_sft, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    run, state = lora_sft
    mesh = one_device()
    adapted = build.policy(run.model, run.lora, mesh).model(state.params)(TOKENS)
    merged, tokenizer, _, step = build.load_run(run.workdir, mesh=mesh)
    assert step == 6 and "lora" not in str(jax.tree.structure(nnx.state(merged)))
    np.testing.assert_allclose(merged(TOKENS), adapted, atol=2e-5, rtol=1e-5)
    out = export_hf(merged, str(tmp_path / "hf"), tokenizer=tokenizer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.as_tensor(np.array(TOKENS))).logits.numpy()
    np.testing.assert_allclose(logits, adapted, atol=1e-4, rtol=1e-4)


def test_lora_section_is_checked():
    with pytest.raises(ValueError, match="lora.targets must be a non-empty subset"):
        S.Lora(rank=4, targets=("q_proj", "lm_head"))
    with pytest.raises(ValueError, match="lora.quantize needs lora.rank"):
        S.Lora(quantize="int8")
    with pytest.raises(ValueError, match="not a multiple of the quantization group size 48"):
        build.lora_abstract(S.Model(preset="tiny"), S.Lora(rank=2, quantize="int4",
                                                           group_size=48), one_device())


@pytest.mark.slow
def test_grpo_with_adapters_uses_the_base_as_reference(tmp_path, hf_tiny, monkeypatch):
    """Two GRPO steps with LoRA adapters: the KL reference is the frozen base itself (the
    reference loader is never called), so the first step (lr 0) has KL 0."""
    from opera_jax.cli import load_config_file
    from opera_jax.config.runs import parse
    from opera_jax.data.jsonl import write_jsonl
    from opera_jax.data.toy_domain import prompt_rows
    from opera_jax.train import grpo

    def no_second_copy(*args, **kwargs):
        raise AssertionError("the reference of a LoRA run is its frozen base")

    monkeypatch.setattr(grpo, "load_reference", no_second_copy)
    c = load_config_file(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                      "grpo_tiny.py"))
    c.workdir, c.model.hf_dir, c.mesh.num_devices = str(tmp_path / "run"), hf_tiny[0], 1
    c.data.path = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(32, seed=0))
    c.data.num_threads, c.validation.every = 0, None
    c.rollout.num_prompts, c.rollout.n, c.rollout.max_new_tokens = 4, 4, 32
    c.grpo.steps, c.lora.rank, c.lora.quantize, c.lora.group_size = 2, 4, "int8", 32
    c.grpo.optim.lr = 1e-2
    run = parse(c)
    assert isinstance(run, GRPORun)
    grpo.train(run)
    rows = read_metrics(run.workdir)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] < 1e-9 < rows[1]["kl"]


def test_lora_shapes_of_an_8b_run_without_allocating():
    """The structure a memory planner reads: adapters, their AdamW state and the int4 base
    of Qwen3-8B, as shapes only (rank 16, every target)."""
    from opera_jax.train import state as state_lib

    mesh = build.make_mesh(S.Mesh())
    _, adapters, _, base = build.lora_abstract(S.Model(preset="qwen3-8b", dtype=S.Dtype.BFLOAT16),
                                               S.Lora(rank=16, quantize="int4"), mesh)
    d, n, k, h, f, layers, r = 4096, 32, 8, 128, 12288, 36, 16
    per_layer = (d * r + r * n * h) + 2 * (d * r + r * k * h) + (n * h * r + r * d) \
        + 2 * (d * r + r * f) + (f * r + r * d)
    assert sum(x.size for x in jax.tree.leaves(adapters)) == layers * per_layer  # 43.6M
    attn = base["layers"][0]["self_attn"]
    assert attn["q_proj"].dtype == jnp.int4 and attn["q_proj"].shape == (d, n, h)
    assert attn["scales"]["q_proj"].shape == (d // 128, n, h)
    assert base["embed_tokens"].dtype == jnp.bfloat16
    tx, _ = state_lib.make_optimizer(S.Optim(), 10)
    opt = state_lib.abstract_state(adapters, tx, mesh).opt_state
    assert sum(x.size for x in jax.tree.leaves(opt) if x.ndim) == 2 * layers * per_layer


def test_engine_samples_a_quantized_adapted_model_like_the_fixed_sampler(hf_tiny):
    """The engine's paged attention path projects through the adapters and the quantized
    o_proj too: with int8 targets and non-zero adapters, its greedy tokens and log-probs are
    the fixed-batch sampler's (the plain attention path), and the adapters change them."""
    from opera_jax.sampling import Sampler
    lora = S.Lora(rank=2, targets=("q_proj", "o_proj", "up_proj"), quantize="int8", group_size=32)
    trained = build.policy(S.Model(hf_dir=hf_tiny[0], preset=None), lora, one_device())
    fresh = trained.init()
    rng = np.random.default_rng(0)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.5 * rng.standard_normal(x.shape).astype(x.dtype)
        if str(path[-1]).strip("[]'\".") == "b" else x, fresh)
    prompts = [[5, 17, 42, 99, 3], [7, 8]]
    kw = dict(max_new_tokens=12, temperature=0.0, n=1, prompt_logprobs=True)
    outs = {}
    for name, params in (("fresh", fresh), ("adapted", adapters)):
        s = Sampler(trained.model(params), pad_id=0)
        ref = s.sample(prompts, **kw)
        got = s.sample(prompts, slots=2, **kw)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-4)
        outs[name] = ref.logprobs
    assert np.abs(outs["fresh"] - outs["adapted"]).max() > 1e-3  # the adapters are used
