"""End to end: `score_texts` / `score_token_ids` on the tiny tokenizer and a random tiny Qwen3."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from opera_jax import tokenizer as tk
from opera_jax.reward import (Context, RewardConfig, has_keyword, naive_reference_logprobs,
                              parse_think_block, reflection_count, score_texts, score_token_ids)
from test_reward_kernel import tiny_model

TOL = 1e-5
# One length bucket for every text here, so the tests share compiled shapes.
CONFIG = RewardConfig(min_bucket=128)

PROMPTS = ["Write a poem about rain.", "Write a poem about rain.", "Give me advice.",
           "Give me advice."]
RESPONSES = [
    "<think>\nOkay, a poem.\n\nHmm, maybe the smell of rain.\n\nBut keep it short.\n"
    "</think>\n\nRain on the roof.",
    "<think>\nThe attribute of rain.\n\n\nWait a minute, rhyme!\n \n\nDone.\n\n</think>\n\n"
    "Drip, drop.",
    "<think>\nSleep.\n\nHowever, also walk.</think>Walk and sleep.",
    "Just sleep.",  # no think block at all
]
REFERENCES = ["Rain taps on the roof tonight.", "Rain taps on the roof tonight.",
              "Sleep well and walk daily.", "Sleep well and walk daily."]
GROUPS = [0, 0, 1, 1]


@pytest.fixture(scope="module")
def tok():
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.fixture(scope="module")
def result(model, tok):
    return score_texts(model, tok, PROMPTS, RESPONSES, REFERENCES, GROUPS, config=CONFIG)


def test_result_follows_the_formula(result):
    for name in ("reward", "rank_score", "reflection_score", "lp_full", "lp_initial"):
        assert result[name].dtype == np.float32 and result[name].shape == (4,)
    assert [len(s) for s in result.lp_segments] == [3, 3, 2, 0]
    for i, y in enumerate(RESPONSES):
        flags = [has_keyword(s.text, CONFIG.keywords) for s in parse_think_block(y).segments]
        count = reflection_count(result.lp_initial[i], result.lp_segments[i], flags)
        assert result.reflection_count[i] == count
        np.testing.assert_allclose(result.reflection_score[i], np.tanh(count / 2), rtol=1e-6)
    for a, b in [(0, 1), (2, 3)]:  # groups of two: the higher LP(c_full) ranks 1, the other 0
        assert sorted([result.rank_score[a], result.rank_score[b]]) == [0.0, 1.0]
        assert result.rank_score[a] == float(result.lp_full[a] > result.lp_full[b])
    np.testing.assert_allclose(result.reward, 0.3 * result.rank_score
                               + 0.7 * result.reflection_score, rtol=1e-6)
    assert result.reflection_score[3] == 0.0


def test_kernel_equals_naive_end_to_end(model, tok, result):
    naive = score_texts(model, tok, PROMPTS, RESPONSES, REFERENCES, GROUPS,
                        config=CONFIG.replace(lp_impl="naive"))
    for name in ("lp_full", "lp_initial"):
        np.testing.assert_allclose(result[name], naive[name], rtol=0, atol=TOL)
    for a, b in zip(result.lp_segments, naive.lp_segments):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
    np.testing.assert_array_equal(result.reward, naive.reward)


def test_contexts_are_the_text_definition(model, tok, result):
    """LP(c_k) = LP under chat_template(x) + y[:b_k] (text cut, tokenized), for every k."""
    x = tk.encode(tok, tk.apply_chat_template(tok, PROMPTS[1]))
    y, a = RESPONSES[1], tk.encode(tok, REFERENCES[1])
    block = parse_think_block(y)
    cuts = [len(y), block.initial_cut] + [s.cut for s in block.segments]
    rows = [x + tk.encode(tok, y[:b]) for b in cuts]
    lps = naive_reference_logprobs(model, rows, [a] * len(rows),
                                   [[Context(len(r))] for r in rows])
    want = np.concatenate(lps)
    got = np.concatenate([[result.lp_full[1], result.lp_initial[1]], result.lp_segments[1]])
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_missing_think_tag_uses_prompt_plus_think(model, tok, result):
    x = tk.encode(tok, tk.apply_chat_template(tok, PROMPTS[3]))
    think = tk.special_token_ids(tok)["think_open"]
    want = naive_reference_logprobs(model, [x + [think]], [tk.encode(tok, REFERENCES[3])],
                                    [[Context(len(x) + 1)]])[0]
    np.testing.assert_allclose(result.lp_initial[3], want[0], rtol=0, atol=TOL)


@pytest.mark.parametrize("response", [
    "<think></think>Answer.",  # empty think block
    "<think>\n\n \n</think>Answer.",  # no paragraphs
    "<think>\nHmm, a thought that never ends\n\nBut",  # missing </think>: truncated
])
def test_no_segments(model, tok, response):
    out = score_texts(model, tok, ["Q"], [response], ["Ref."], [0], config=CONFIG)
    assert len(out.lp_segments[0]) == 0 and out.reflection_count[0] == 0
    assert np.isfinite(out.lp_full[0]) and np.isfinite(out.lp_initial[0])
    # A group of one ranks 1.0.
    assert out.rank_score[0] == 1.0 and out.reward[0] == pytest.approx(0.3)


def test_ties_take_the_lower_rank(model, tok):
    out = score_texts(model, tok, ["Q"] * 3, [RESPONSES[0], RESPONSES[0], RESPONSES[2]],
                      ["Ref."] * 3, ["g"] * 3, config=CONFIG)
    assert out.lp_full[0] == out.lp_full[1]
    assert out.rank_score[0] == out.rank_score[1] == (0.5 if out.lp_full[0] > out.lp_full[2]
                                                      else 0.0)


def test_math_path(model, tok):
    responses = ["<think>\nadd\n</think>\\boxed{4}", "<think>\n\\boxed{4}\n</think>4",
                 RESPONSES[0]]
    out = score_texts(model, tok, ["2+2?", "2+2?", PROMPTS[0]], responses,
                      ["4", "4", REFERENCES[0]], [0, 0, 1], ["math", "math", "writing"],
                      config=CONFIG)
    assert list(out.reward[:2]) == [1.0, 0.0]
    assert list(out.rank_score[:2]) == [0.0, 0.0] and list(out.reflection_score[:2]) == [0, 0]
    assert np.isnan(out.lp_full[:2]).all() and np.isfinite(out.lp_full[2])
    assert out.rank_score[2] == 1.0  # alone in its group


def test_token_ids_path_equals_text_path(model, tok, result):
    prompt_ids = [tk.encode(tok, tk.apply_chat_template(tok, p)) for p in PROMPTS]
    eos = tk.special_token_ids(tok)["eos"]
    response_ids = [tk.encode(tok, y) + [eos] for y in RESPONSES]  # trailing eos is dropped
    reference_ids = [tk.encode(tok, a) for a in REFERENCES]
    out = score_token_ids(model, tok, prompt_ids, response_ids, reference_ids, GROUPS,
                          config=CONFIG)
    np.testing.assert_array_equal(out.reward, result.reward)
    np.testing.assert_allclose(out.lp_full, result.lp_full, rtol=0, atol=TOL)


def test_reference_scorer(model, tok, result):
    frozen = tiny_model(1)
    config = CONFIG.replace(scorer="reference")
    with pytest.raises(ValueError, match="reference_model"):
        score_texts(model, tok, PROMPTS, RESPONSES, REFERENCES, GROUPS, config=config)
    out = score_texts(model, tok, PROMPTS, RESPONSES, REFERENCES, GROUPS, config=config,
                      reference_model=frozen)
    direct = score_texts(frozen, tok, PROMPTS, RESPONSES, REFERENCES, GROUPS, config=CONFIG)
    np.testing.assert_array_equal(out.lp_full, direct.lp_full)
    assert not np.allclose(out.lp_full, result.lp_full)


def test_empty_reference_is_an_error(model, tok):
    with pytest.raises(ValueError, match="sample 1: empty reference"):
        score_texts(model, tok, ["Q", "Q"], ["a", "b"], ["Ref.", ""], [0, 0], config=CONFIG)
    with pytest.raises(ValueError, match="sample 0: empty reference"):
        score_texts(model, tok, ["Q"], ["\\boxed{1}"], ["  "], [0], ["math"], config=CONFIG)


def test_group_size_is_checked(model, tok):
    with pytest.raises(ValueError, match="group_size"):
        score_texts(model, tok, PROMPTS, RESPONSES, REFERENCES, [0, 0, 0, 1],
                    config=CONFIG.replace(group_size=2))


def test_non_finite_lp_names_the_sample(tok):
    model = tiny_model(2, tie_word_embeddings=False)
    seqs = [tk.encode(tok, tk.apply_chat_template(tok, p)) + tk.encode(tok, y) + tk.encode(tok, a)
            for p, y, a in zip(PROMPTS, RESPONSES, REFERENCES)]
    only_in_2 = sorted(set(seqs[2]) - set().union(*seqs[:2], *seqs[3:]))[0]
    model.embed_tokens[...] = model.embed_tokens[...].at[only_in_2].set(jnp.nan)
    with pytest.raises(FloatingPointError, match=r"sample 2 \(group 1\): LP under c_full"):
        score_texts(model, tok, PROMPTS, RESPONSES, REFERENCES, GROUPS, config=CONFIG)


@pytest.mark.parametrize("lp_impl", ["kernel", "naive"])
def test_identical_responses_tie_exactly_in_any_scoring_batch(model, tok, lp_impl):
    """Copies of one response in a group of 8 (A×4, B×2, C×2, interleaved) get the same LP and
    reward whatever scoring batch each copy lands in, so the rank's ties hold: a copy ranks by
    the responses strictly below it."""
    a, b, c = RESPONSES[0], RESPONSES[1], "<think>\nRain.\n\nBut sun.\n</think>\n\nSun."
    responses = [a, b, a, c, a, b, c, a]
    for batch_size in (1, 2, 3, 8):
        config = RewardConfig(min_bucket=128, batch_size=batch_size, lp_impl=lp_impl)
        out = score_texts(model, tok, [PROMPTS[0]] * 8, responses, [REFERENCES[0]] * 8,
                          [0] * 8, config=config)
        for text in (a, b, c):
            same = [i for i, y in enumerate(responses) if y == text]
            for key in ("lp_full", "lp_initial", "reward", "rank_score"):
                assert len({float(out[key][i]) for i in same}) == 1, (batch_size, key)
        lp = {y: float(out.lp_full[responses.index(y)]) for y in (a, b, c)}
        want = [sum(lp[z] < lp[y] for z in responses) / 7 for y in responses]
        np.testing.assert_array_equal(out.rank_score, np.asarray(want, np.float32))
