"""The loss variants (Dr. GRPO, DAPO, GSPO, KL estimators) and DAPO's dynamic sampling, on
hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax.config.parse import ConfigError, from_config, to_config
from opera_jax.config.sections import Loss
from opera_jax.reward.terms import Scored
from opera_jax.rollout.batch import Rollout
from opera_jax.rollout.dynamic_sampling import collect_batch, informative_groups
from opera_jax.train.grpo import step_seed
from opera_jax.train.grpo_loss import group_advantages, grpo_loss, kl_estimate


def loss_of(logp, old, adv, mask=None, ref=None, **cfg):
    logp = jnp.asarray(logp, jnp.float32)
    logp = logp[None] if logp.ndim == 1 else logp
    old = jnp.broadcast_to(jnp.asarray(old, jnp.float32), logp.shape)
    mask = jnp.ones_like(logp) if mask is None else jnp.asarray(mask, jnp.float32)
    ref = None if ref is None else jnp.broadcast_to(jnp.asarray(ref, jnp.float32), logp.shape)
    return grpo_loss(logp, old, ref, jnp.atleast_1d(jnp.asarray(adv, jnp.float32)), mask,
                     Loss(**cfg))


def test_dr_grpo_advantages_are_centred_not_scaled():
    adv = group_advantages([1.0, 2.0, 3.0, 0.0, 0.0, 1.0, 5.0], [0, 0, 0, 1, 1, 1, 2],
                           std_normalize=False)
    np.testing.assert_allclose(adv, [-1, 0, 1, -1 / 3, -1 / 3, 2 / 3, 0], rtol=1e-6)


def test_dr_grpo_token_sum_norm_divides_by_sequences_times_the_constant():
    # two responses: 3 tokens of pg -1 (A = 1, ratio 1) and 1 token of pg +2 (A = -2)
    logp = jnp.zeros((2, 4))
    mask = [[1, 1, 1, 0], [0, 1, 0, 0]]
    kw = dict(kl_coef=0.0)
    total = -3 + 2
    loss, _ = loss_of(logp, 0.0, [1.0, -2.0], mask, aggregation="token_sum_norm",
                      norm_constant=8, **kw)
    assert float(loss) == pytest.approx(total / (2 * 8))
    assert float(loss_of(logp, 0.0, [1.0, -2.0], mask, **kw)[0]) == pytest.approx(total / 4)
    assert float(loss_of(logp, 0.0, [1.0, -2.0], mask, aggregation="seq_mean", **kw)[0]
                 ) == pytest.approx((-1 + 2) / 2)
    # a row without response tokens is not a sequence
    loss, _ = loss_of(jnp.zeros((3, 4)), 0.0, [1.0, -2.0, 5.0], mask + [[0, 0, 0, 0]],
                      aggregation="token_sum_norm", norm_constant=8, **kw)
    assert float(loss) == pytest.approx(total / (2 * 8))
    with pytest.raises(ValueError, match="needs loss.norm_constant"):
        loss_of(logp, 0.0, [1.0, -2.0], mask, aggregation="token_sum_norm", **kw)


def test_dapo_clip_higher_is_asymmetric():
    # A = 1: ratio e^0.24 = 1.2712 is inside 1 + 0.28 (kept), but clipped at 1.2 by default
    loss, m = loss_of([0.24], [0.0], 1.0, clip_high=0.28, kl_coef=0.0)
    assert float(loss) == pytest.approx(-math.exp(0.24), abs=1e-6) and float(m["clip_frac"]) == 0
    loss, m = loss_of([0.24], [0.0], 1.0, kl_coef=0.0)
    assert float(loss) == pytest.approx(-1.2, abs=1e-6) and float(m["clip_frac"]) == 1
    # ratio e^0.3 = 1.3499 > 1.28: clipped at 1.28
    assert float(loss_of([0.3], [0.0], 1.0, clip_high=0.28, kl_coef=0.0)[0]) == pytest.approx(
        -1.28, abs=1e-6)
    # A = -1, ratio e^-0.5 = 0.6065: the low side still clips at 1 - 0.2 -> max(0.6065, 0.8)
    assert float(loss_of([-0.5], [0.0], -1.0, clip_high=0.28, kl_coef=0.0)[0]) == pytest.approx(
        0.8, abs=1e-6)


def test_gspo_sequence_ratio_value_and_gradient():
    # one sequence, log-ratios 0.3 and -0.1: s = exp(0.1) = 1.10517, A = 1
    logp, old = jnp.asarray([[0.3, -0.1]]), jnp.zeros((1, 2))
    s = math.exp(0.1)
    cfg = dict(ratio="sequence", kl_coef=0.0, aggregation="seq_mean", dual_clip=None)
    loss, m = loss_of(logp, old, 1.0, **cfg)
    assert float(loss) == pytest.approx(-s, abs=1e-6) and float(m["clip_frac"]) == 0
    assert float(m["ratio_mean"]) == pytest.approx(s, abs=1e-6)
    # d/dlogp_t of -A·exp(mean_t log-ratio) = -A·s / L on both tokens
    grad = jax.grad(lambda x: loss_of(x, old, 1.0, **cfg)[0])(logp)
    np.testing.assert_allclose(grad, [[-s / 2, -s / 2]], rtol=1e-5)
    # clipped per sequence: s = 1.105 > 1 + 0.05 -> -1.05, no gradient
    loss, m = loss_of(logp, old, 1.0, clip_low=0.05, clip_high=0.05, **cfg)
    assert float(loss) == pytest.approx(-1.05, abs=1e-6) and float(m["clip_frac"]) == 1
    grad = jax.grad(lambda x: loss_of(x, old, 1.0, clip_low=0.05, clip_high=0.05, **cfg)[0])(logp)
    np.testing.assert_array_equal(grad, [[0.0, 0.0]])
    # the token-level ratio of the same tokens: e^0.3 clips at 1.2, e^-0.1 = 0.9048 does not
    loss, _ = loss_of(logp, old, 1.0, kl_coef=0.0)
    assert float(loss) == pytest.approx((-1.2 - math.exp(-0.1)) / 2, abs=1e-6)
    # padding does not enter the mean: a masked third token changes nothing
    loss, _ = loss_of(jnp.asarray([[0.3, -0.1, 5.0]]), jnp.zeros((1, 3)), 1.0, [[1, 1, 0]], **cfg)
    assert float(loss) == pytest.approx(-s, abs=1e-6)


def test_kl_estimators_by_hand():
    zero, one = jnp.float32(0.0), jnp.float32(1.0)
    # d = log π_ref − log π = 1
    assert float(kl_estimate(zero, one, "k1")) == pytest.approx(-1.0)
    assert float(kl_estimate(zero, one, "k2")) == pytest.approx(0.5)
    assert float(kl_estimate(zero, one, "k3")) == pytest.approx(math.e - 2, abs=1e-6)
    # d = -0.5
    half = jnp.float32(0.5)
    assert float(kl_estimate(half, zero, "k1")) == pytest.approx(0.5)
    assert float(kl_estimate(half, zero, "k2")) == pytest.approx(0.125)
    assert float(kl_estimate(half, zero, "k3")) == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-6)
    # in the loss: A = 0, so the loss is β · kl; kl_coef 0 is "KL off"
    for est, value in (("k1", -1.0), ("k2", 0.5), ("k3", math.e - 2)):
        loss, m = loss_of([0.0], [0.0], 0.0, ref=[1.0], kl_coef=0.5, kl_estimator=est)
        assert float(loss) == pytest.approx(0.5 * value, abs=1e-6)
        assert float(m["kl"]) == pytest.approx(value, abs=1e-6)
    loss, m = loss_of([0.0], [0.0], 0.0, ref=[1.0], kl_coef=0.0)
    assert float(loss) == 0.0 and float(m["kl"]) == 0.0


def test_dual_clip_off():
    # A = -1, ratio e^2 = 7.389: capped at 3 by default, uncapped with dual_clip None
    assert float(loss_of([2.0], [0.0], -1.0, kl_coef=0.0)[0]) == pytest.approx(3.0, abs=1e-6)
    for off in (None, math.inf):  # None in a config file, inf on the command line
        loss, m = loss_of([2.0], [0.0], -1.0, kl_coef=0.0, dual_clip=off)
        assert float(loss) == pytest.approx(math.exp(2.0), abs=1e-5)
        assert float(m["dual_clip_frac"]) == 0.0


def test_loss_section_keys_parse_and_are_checked():
    c = to_config(Loss())
    c.kl_estimator, c.ratio, c.aggregation = "k2", "sequence", "token_sum_norm"
    loss = from_config(Loss, c)
    assert (loss.kl_estimator.value, loss.ratio.value, loss.aggregation.value) == (
        "k2", "sequence", "token_sum_norm")
    c.kl_estimator = "k4"
    with pytest.raises(ConfigError, match="config.kl_estimator='k4' is not one of: k1, k2, k3"):
        from_config(Loss, c)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        Loss(dual_clip=0.5)


def fake_round(rewards_per_group, n=2, offset=0):
    """A Rollout + Scored of groups with the given rewards (rows tagged by prompt id)."""
    rewards = np.asarray([r for g in rewards_per_group for r in g], np.float32)
    count = len(rewards)
    group_ids = np.arange(count, dtype=np.int32) // n
    ro = Rollout(tokens=np.arange(count, dtype=np.int32)[:, None] + 100 * offset,
                 segment_ids=np.ones((count, 1), np.int32), mask=np.ones((count, 1), np.float32),
                 old_logprobs=np.zeros((count, 1), np.float32),
                 prompts=[f"p{offset}.{g}" for g in group_ids], prompt_ids=[[1]] * count,
                 response_ids=[np.asarray([5])] * count, reference_ids=[[2]] * count,
                 task_types=["writing"] * count, group_ids=group_ids,
                 finish_reason=np.zeros((count,), np.int32), num_samples=n,
                 rows=[{"id": f"{offset}.{g}"} for g in group_ids])
    return ro, Scored(reward=rewards, terms={"opera": rewards}, opera=None)


def test_dynamic_sampling_drops_equal_groups_and_refills():
    rounds = [[[1, 1], [0, 1], [2, 2]], [[3, 3], [0, 2], [5, 5]], [[1, 0], [4, 4], [6, 7]]]
    calls = []

    def sample_and_score(rows, sampling_round):
        calls.append((rows, sampling_round))
        return fake_round(rounds[sampling_round], offset=sampling_round)

    batches = iter(["batch0", "batch1", "batch2", "batch3"])
    ro, scored, m = collect_batch(sample_and_score, batches, num_prompts=3, dynamic=True,
                                  max_rounds=4)
    # round 0 keeps 1 group, round 1 one more, round 2 two more: 3 kept, the 4th cut off
    assert calls == [("batch0", 0), ("batch1", 1), ("batch2", 2)]
    assert [r["id"] for r in ro.rows] == ["0.1", "0.1", "1.1", "1.1", "2.0", "2.0"]
    np.testing.assert_array_equal(scored.reward, [0, 1, 0, 2, 1, 0])
    np.testing.assert_array_equal(ro.group_ids, [0, 0, 1, 1, 2, 2])
    assert ro.tokens[:, 0].tolist() == [2, 3, 102, 103, 200, 201]
    assert m == {"sampling/rounds": 3.0, "sampling/informative_frac": 4 / 9,
                 "sampling/filled_groups": 0.0}
    # out of rounds: filled with the equal-reward groups, in order
    ro, scored, m = collect_batch(lambda rows, k: fake_round(rounds[k], offset=k),
                                  iter(range(9)), num_prompts=3, dynamic=True, max_rounds=1)
    assert [r["id"] for r in ro.rows] == ["0.1", "0.1", "0.0", "0.0", "0.2", "0.2"]
    assert m["sampling/filled_groups"] == 2.0 and m["sampling/rounds"] == 1.0
    # without dynamic sampling: the first rollout as it is
    ro, scored, m = collect_batch(lambda rows, k: fake_round(rounds[k], offset=k),
                                  iter(range(9)), num_prompts=3, dynamic=False, max_rounds=4)
    assert m == {} and scored.reward.tolist() == [1, 1, 0, 1, 2, 2]
    assert informative_groups(np.asarray([1.0, 1.0, 0.0, 1.0]), np.asarray([0, 0, 1, 1])) == [1]


def test_extra_sampling_rounds_draw_new_seeds_and_round_0_keeps_the_old_one():
    rng = np.asarray([3, 4], np.uint32)
    old = int(np.random.SeedSequence([3, 4, 7]).generate_state(1)[0] & 0x7FFFFFFF)
    assert step_seed(rng, 7) == step_seed(rng, 7, 0) == old
    assert len({step_seed(rng, 7, k) for k in range(4)}) == 4


@pytest.mark.slow
def test_pulse_with_variants(tmp_path, hf_tiny):
    """Two GRPO steps with DAPO's dynamic sampling and clip-higher, GSPO's sequence ratio, k2
    KL, Dr. GRPO's aggregation and reward terms: finite metrics, each term logged."""
    import os

    from opera_jax.cli import load_config_file
    from opera_jax.config.runs import parse
    from opera_jax.data.jsonl import write_jsonl
    from opera_jax.data.toy_domain import prompt_rows
    from opera_jax.train import grpo
    from opera_jax.train.metrics import read_metrics

    c = load_config_file(os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                                      "grpo_tiny.py"))
    c.workdir = str(tmp_path / "run")
    c.model.hf_dir = hf_tiny[0]
    c.mesh.num_devices = 1
    c.data.path = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(64, seed=0))
    c.data.num_threads = 0
    c.rollout.num_prompts, c.rollout.n, c.rollout.max_new_tokens = 4, 4, 32
    c.grpo.steps, c.validation.every = 2, None
    c.grpo.dynamic_sampling, c.grpo.max_sampling_rounds = True, 2
    c.loss.clip_high, c.loss.ratio, c.loss.kl_estimator = 0.28, "sequence", "k2"
    c.loss.aggregation, c.loss.std_normalize = "token_sum_norm", False
    c.reward.terms = ("opera", "format=0.5", "overlong")
    grpo.train(parse(c))
    rows = read_metrics(c.workdir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(np.isfinite(v) for v in r.values()), r
        assert {"reward/opera", "reward/format", "reward/overlong", "sampling/rounds"} <= set(r)
        assert r["reward/mean"] == pytest.approx(
            r["reward/opera"] + 0.5 * r["reward/format"] + r["reward/overlong"], abs=1e-5)
        assert 1 <= r["sampling/rounds"] <= 2
