"""GRPO pieces on a random tiny Qwen3 (float32, one device): the rollout's token layout, the
sampler's log-probs against a recomputation, the on-policy first update, gradient accumulation,
guiding-word counting and the reward-curve plot."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opera_jax import Qwen3Config, init_model, make_mesh
from opera_jax.data.toy_domain import prompt_rows
from opera_jax.sampling import Sampler
from opera_jax.tokenizer import load_tokenizer, special_token_ids
from opera_jax.config.build import abstract_params, load_params
from opera_jax.config.parse import ConfigError
from opera_jax.config.runs import parse
from opera_jax.config.setups import grpo_tiny
from opera_jax.config.sections import Loss, Model
from opera_jax.data.pipeline import TokenizePrompt
from opera_jax.reward.segments import keyword_regex
from opera_jax.rollout.batch import sample_rollout
from opera_jax.train import grpo, plots
from opera_jax.train.state import TrainState

N, NEW, SEQ = 2, 24, 96


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer()
    model = init_model(Qwen3Config.preset("tiny"), seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    ids = special_token_ids(tok)
    sampler = Sampler(model, eos_ids=[ids["eos"]], pad_id=ids["pad"])
    tokenize = TokenizePrompt(tok, max_prompt_len=SEQ - NEW)
    rows = [tokenize(r) for r in prompt_rows(4, seed=5)]
    ro = sample_rollout(sampler, rows, n=N, seq_len=SEQ, max_new_tokens=NEW, seed=11)
    return tok, graphdef, params, sampler, rows, ro


def test_rollout_layout(setup):
    tok, _, _, sampler, rows, ro = setup
    assert ro.tokens.shape == (4 * N, SEQ) and list(ro.group_ids) == [0, 0, 1, 1, 2, 2, 3, 3]
    for r in range(4 * N):
        prompt, response = rows[r // N]["prompt_ids"], ro.response_ids[r]
        p, m = len(prompt), len(response)
        assert 1 <= m <= NEW
        np.testing.assert_array_equal(ro.tokens[r, :p], prompt)
        np.testing.assert_array_equal(ro.tokens[r, p:p + m], response)
        assert (ro.tokens[r, p + m:] == sampler.pad_id).all()
        assert ro.segment_ids[r].sum() == p + m and ro.segment_ids[r, :p + m].all()
        # the mask marks the positions that predict response tokens: p-1 .. p+m-2
        np.testing.assert_array_equal(np.flatnonzero(ro.mask[r]), np.arange(p - 1, p + m - 1))
        assert (ro.old_logprobs[r][ro.mask[r] == 0] == 0).all()
        assert (ro.old_logprobs[r][ro.mask[r] == 1] < 0).all()
    # the two samples of a prompt differ (seeded per row)
    assert any(not np.array_equal(ro.response_ids[2 * i], ro.response_ids[2 * i + 1])
               for i in range(4))


def test_chunked_rollout_keeps_the_row_layout(setup):
    _, _, _, sampler, rows, ro = setup
    chunked = sample_rollout(sampler, rows, n=N, seq_len=SEQ, max_new_tokens=NEW,
                                     seed=11, prompts_per_call=2)
    assert chunked.tokens.shape == ro.tokens.shape
    np.testing.assert_array_equal(chunked.group_ids, ro.group_ids)
    # call 0 (prompts 0-1) uses the same seed as the unchunked call: the same samples
    np.testing.assert_array_equal(chunked.tokens[:2 * N], ro.tokens[:2 * N])


def test_sampler_logprobs_equal_a_recomputation(setup):
    _, graphdef, params, _, _, ro = setup
    fn = grpo.cached_logprobs(graphdef, 2, 64, None)
    lp = np.asarray(fn(params, jnp.asarray(ro.tokens)))
    on = ro.mask == 1
    np.testing.assert_allclose(lp[on], ro.old_logprobs[on], rtol=0, atol=2e-5)
    assert np.abs(lp[on]).mean() > 1.0  # a random model: real log-probs, not zeros


def _state(params, tx):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(0)))


def _batch(ro, advantages, mask=None):
    mask = ro.mask if mask is None else mask
    return {"tokens": jnp.asarray(ro.tokens), "mask": jnp.asarray(mask), "old_logprobs": jnp.asarray(ro.old_logprobs),
            "advantages": jnp.asarray(advantages, jnp.float32)}


def test_first_update_is_on_policy(setup):
    """One mini-batch: the ratio is exactly the sampler's, so nothing is clipped."""
    _, graphdef, params, _, _, ro = setup
    tx = optax.sgd(0.0)
    step = grpo.make_update_step(graphdef, tx, lambda s: 0.0, num_minibatches=1, grad_accum=1,
                                 chunk_size=64, loss_config=Loss(kl_coef=0.0))
    adv = np.array([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0, 0.0], np.float32)
    _, m = jax.jit(step)(_state(params, tx), _batch(ro, adv))
    assert abs(float(m["ratio_mean"]) - 1.0) < 1e-4
    assert float(m["approx_kl_old"]) < 1e-9 and float(m["clip_frac"]) == 0.0
    assert float(m["loss_tokens"]) == ro.mask.sum()
    # ratio 1: pg_loss = -(token-weighted mean advantage)
    tokens = ro.mask.sum(1)
    assert float(m["pg_loss"]) == pytest.approx(-(adv * tokens).sum() / tokens.sum(), abs=1e-4)
    assert 0 < float(m["entropy"]) <= np.log(1024) + 1e-3


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_gradient_accumulation_gives_the_mini_batch_gradient(setup, aggregation):
    """SGD(lr 1) moves params by −grad: A = 1 and A = 4 micro-batches must agree, with
    micro-batches of very different token counts."""
    _, graphdef, params, _, _, ro = setup
    mask = ro.mask.copy()
    for r in (0, 4):  # rows of micro-batch 0 (of 4, strided): keep 3 response tokens each
        on = np.flatnonzero(mask[r])
        mask[r, on[3:]] = 0
    adv = np.array([1.5, -1.0, 0.5, -0.5, 2.0, -2.0, 0.3, -0.3], np.float32)
    config = Loss(kl_coef=0.0, aggregation=aggregation)
    tx = optax.sgd(1.0)
    moved = []
    for accum in (1, 4):
        step = grpo.make_update_step(graphdef, tx, lambda s: 1.0, num_minibatches=1,
                                     grad_accum=accum, chunk_size=64, loss_config=config)
        state, m = jax.jit(step)(_state(jax.tree.map(jnp.copy, params), tx),
                                 _batch(ro, adv, mask))
        moved.append(jax.tree.map(lambda a, b: np.asarray(a - b), params, state.params))
        assert float(m["loss_tokens"]) == mask.sum()
    norm = optax.tree.norm(moved[0])
    assert norm > 1e-4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * norm),
                 *moved)


def test_guiding_words_are_whole_words_counted_once():
    pattern = keyword_regex(("But", "Wait", "Hmm", "However", "Wait a minute"))
    text = "Wait a  minute, an attribute. but BUT however! Hmmm. Wait."
    assert pattern.findall(text) == ["Wait a  minute", "but", "BUT", "however", "Wait"]


def test_reward_plot_keeps_the_last_row_of_each_step(tmp_path):
    rows = [{"step": 0, "val_reward/mean": 0.1},
            {"step": 1, "reward/mean": 0.2, "reward/std": 0.1, "reward/rank": 0.5},
            {"step": 2, "reward/mean": 0.9, "reward/std": 0.1},
            {"step": 2, "reward/mean": 0.3, "reward/std": 0.1, "val_reward/mean": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    merged = plots.latest_per_step(rows)
    assert [r["step"] for r in merged] == [0, 1, 2]
    assert merged[2]["reward/mean"] == 0.3 and merged[2]["val_reward/mean"] == 0.4
    path = plots.plot_rewards(str(tmp_path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert plots.plot_rewards(str(tmp_path / "missing")) is None


def test_config_checks_name_the_numbers():
    c = grpo_tiny()
    c.rollout.num_prompts, c.rollout.n, c.grpo.num_minibatches = 3, 2, 4
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match="6 responses per step"):
        grpo.check_config(parse(c), mesh)
    c.grpo.num_minibatches = 3
    grpo.check_config(parse(c), mesh)
    c.grpo.old_logprobs = "cached"
    with pytest.raises(ConfigError, match="config.grpo.old_logprobs='cached' is not one of: "
                       "auto, sampler, recompute"):
        parse(c)


def test_rollout_reads_the_training_arrays_without_a_copy():
    """What train() does each step: the sampler gets the state's sharded params re-wrapped."""
    model = Model(preset="tiny")
    mesh = make_mesh(1, -1, 1)  # the 8 fake devices, fsdp
    graphdef, _ = abstract_params(model, mesh)
    params = load_params(model, mesh)
    sampler = Sampler(nnx.merge(graphdef, params), pad_id=0, mesh=mesh)
    sampler.set_params(nnx.state(nnx.merge(graphdef, params)))
    leaves = jax.tree.leaves(params)
    assert len(leaves) == len(jax.tree.leaves(sampler.params))
    assert all(a is b for a, b in zip(leaves, jax.tree.leaves(sampler.params)))
    assert leaves[0].sharding.num_devices == 8
