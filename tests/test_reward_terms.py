"""Reward terms (reward/terms.py) on hand-computed cases: overlong, format, math, a user
function, their weighted sum, and the default (opera alone) equal to the OPERA reward."""

import textwrap

import numpy as np
import pytest

from opera_jax.model.build import init_model
from opera_jax.model.config import Qwen3Config
from opera_jax.reward import RewardConfig, score_token_ids
from opera_jax.reward.config import TermSpec
from opera_jax.reward.scores import math_check
from opera_jax.reward.terms import Terms, format_reward, overlong_penalty
from opera_jax.tokenizer import encode, encode_prompt, load_tokenizer


def test_overlong_penalty_by_hand():
    # L_max = 10, L_cache = 4: 0 up to 6 tokens, then (6 - L) / 4, -1 past 10
    got = overlong_penalty([3, 6, 7, 9, 10, 11], 10, 4)
    np.testing.assert_allclose(got, [0, 0, -0.25, -0.75, -1, -1])
    with pytest.raises(ValueError, match="overlong cache 12"):
        overlong_penalty([1], 10, 12)


def test_format_reward_counts_think_tags():
    assert format_reward("<think>\nhm\n</think>\n\nanswer") == 1.0
    assert format_reward("<think>\nhm, never closed") == 0.0
    assert format_reward("<think>a</think>b</think>") == 0.0
    assert format_reward("</think>a<think>") == 0.0
    assert format_reward("<think>a</think><think>b</think>") == 0.0


def test_term_specs_parse_and_are_checked():
    assert TermSpec.parse("format=0.25") == TermSpec("format", 0.25)
    spec = TermSpec.parse("python:my.rewards:brevity=-0.5")
    assert (spec.name, spec.weight, spec.key) == ("python:my.rewards:brevity", -0.5, "brevity")
    assert RewardConfig().terms == ("opera",)
    with pytest.raises(ValueError, match="the term='lenght' is not one of: opera, math"):
        RewardConfig(terms=("opera", "lenght"))
    with pytest.raises(ValueError, match="weight 'x' is not a number"):
        RewardConfig(terms=("format=x",))
    with pytest.raises(ValueError, match="name each term once"):
        RewardConfig(terms=("format", "format=2"))
    with pytest.raises(ValueError, match="may not be named 'mean'"):
        RewardConfig(terms=("python:m:mean",))
    with pytest.raises(ValueError, match="expected python:module.path:function"):
        RewardConfig(terms=("python:nofunction",))


def test_math_verify_matches_equal_values():
    pytest.importorskip("math_verify")
    check = math_check("math_verify")
    assert check("<think>hm</think>\n\nSo \\boxed{0.5}.", "\\frac{1}{2}") == 1.0
    assert check("<think>hm</think>\n\nSo \\boxed{0.5}.", "1/3") == 0.0
    assert check("<think>\\boxed{0.5}, never closed", "0.5") == 0.0  # only the answer part
    assert math_check("exact")("<think>hm</think>\n\nSo \\boxed{0.5}.", "\\frac{1}{2}") == 0.0


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        def brevity(rows, responses):
            return [1.0 if len(r) < 20 else 0.0 for r in responses]

        def by_source(rows, responses):
            return [float(row["extra_info"]["bonus"]) for row in rows]

        def wrong_length(rows, responses):
            return [0.0]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_weighted_terms_without_the_model(user_module):
    tok = load_tokenizer(None)
    texts = ["<think>\nx\n</think>\n\n\\boxed{4}", "no think block at all, \\boxed{4}",
             "<think>\nlong thinking here\n</think>\n\n\\boxed{5}"]
    response_ids = [encode(tok, t) for t in texts]
    rows = [{"reference": "4", "extra_info": {"bonus": b}} for b in (1, 0, 2)]
    config = RewardConfig(terms=("math=2", "format=0.5", "overlong", "python:my_rewards:brevity",
                                 "python:my_rewards:by_source=-1"), overlong_cache=8)
    terms = Terms(config)
    assert not terms.has_opera
    scored = terms.score(None, tok, prompt_ids=[[1]] * 3, response_ids=response_ids,
                         reference_ids=[[1]] * 3, group_ids=[0, 0, 0],
                         task_types=["writing"] * 3, rows=rows, max_len=32)
    lengths = [len(x) for x in response_ids]
    overlong = [0.0 if n <= 24 else (24 - n) / 8 for n in lengths]
    want = {"math": [1, 1, 0], "format": [1, 0, 1], "overlong": overlong,
            "brevity": [1 if len(t) < 20 else 0 for t in texts], "by_source": [1, 0, 2]}
    assert list(scored.terms) == ["math", "format", "overlong", "brevity", "by_source"]
    for key, values in want.items():
        np.testing.assert_allclose(scored.terms[key], values, rtol=1e-6, err_msg=key)
    total = [2 * m + 0.5 * f + o + b - s for m, f, o, b, s in zip(*want.values())]
    np.testing.assert_allclose(scored.reward, total, rtol=1e-6)
    assert scored.opera is None
    kept = scored.take([2, 0])
    np.testing.assert_allclose(kept.reward, [total[2], total[0]], rtol=1e-6)
    with pytest.raises(ValueError, match="'python:my_rewards:wrong_length' returned 1 values "
                                         "for 3 responses"):
        Terms(RewardConfig(terms=("python:my_rewards:wrong_length",))).score(
            None, tok, prompt_ids=[[1]] * 3, response_ids=response_ids, reference_ids=[[1]] * 3,
            group_ids=[0, 0, 0], task_types=["writing"] * 3, rows=rows, max_len=32)
    with pytest.raises(AttributeError, match="module 'my_rewards' has no 'nothing'"):
        Terms(RewardConfig(terms=("python:my_rewards:nothing",)))
    with pytest.raises(ImportError, match="cannot import 'no_such_module'"):
        Terms(RewardConfig(terms=("python:no_such_module:f",)))


def test_default_terms_are_the_opera_reward():
    tok = load_tokenizer(None)
    model = init_model(Qwen3Config.preset("tiny"), seed=0)
    prompt = encode_prompt(tok, "Describe the lamp.")
    responses = ["<think>\nIt is red.\n\nWait, it is blue.\n</think>\n\nBlue.",
                 "<think>\nRed.\n</think>\n\nRed.", "<think>\nHmm.\n\nBut green.\n</think>\n\nGreen."]
    ids = [encode(tok, t) for t in responses]
    reference = encode(tok, "The lamp is blue.")
    args = ([prompt] * 3, ids, [reference] * 3, [0, 0, 0], ["writing"] * 3)
    config = RewardConfig(group_size=3, buckets_per_octave=2)
    want = score_token_ids(model, tok, *args, config=config)
    got = Terms(config).score(model, tok, prompt_ids=args[0], response_ids=ids,
                              reference_ids=args[2], group_ids=args[3], task_types=args[4],
                              rows=[{}] * 3, max_len=64)
    np.testing.assert_array_equal(got.reward, want.reward)
    np.testing.assert_array_equal(got.terms["opera"], want.reward)
    np.testing.assert_array_equal(got.opera.rank_score, want.rank_score)
