"""Hand-computed cases of the pure reward rules: rank, reflection, math path, config."""

from __future__ import annotations

import numpy as np
import pytest

from opera_jax.reward import (KeywordMatch, RewardConfig, Scorer, has_keyword, last_boxed,
                              math_reward, parse_think_block, published_math_reward,
                              rank_scores, reflection_count,
                              reflection_score)

# ---- rank -------------------------------------------------------------------------------------


def test_rank_one_group():
    np.testing.assert_allclose(rank_scores([-3.0, -1.0, -2.0], [7, 7, 7]), [0.0, 1.0, 0.5])


def test_rank_ties_take_the_lower_rank():
    np.testing.assert_allclose(rank_scores([-1.0, -1.0, -0.5, -2.0], "aaaa"),
                               [1 / 3, 1 / 3, 1.0, 0.0])
    np.testing.assert_allclose(rank_scores([-1.0] * 4, [0] * 4), [0.0] * 4)


def test_rank_group_of_one_and_interleaved_groups():
    out = rank_scores([-5.0, -1.0, -2.0, -9.0, -3.0], ["a", "b", "a", "c", "b"])
    np.testing.assert_allclose(out, [0.0, 1.0, 1.0, 1.0, 0.0])
    assert out.dtype == np.float32


# ---- reflection -------------------------------------------------------------------------------


def test_reflection_walk():
    # k1: keyword, -4 > -5 → counts. k2: keyword, -4.5 < -4 (LP falls after a keyword) → no.
    # k3: no keyword, rises → no. k4: keyword, -3.5 < -3 (prev moved on at k3) → no.
    assert reflection_count(-5.0, [-4.0, -4.5, -3.0, -3.5], [True, True, False, True]) == 1
    # prev moves on every k: k2 is compared with k1's LP, not with the best so far.
    assert reflection_count(-5.0, [-1.0, -3.0, -2.0], [True, True, True]) == 2


def test_reflection_equal_lp_does_not_count():
    assert reflection_count(-2.0, [-2.0, -2.0], [True, True]) == 0


def test_reflection_no_segments():
    assert reflection_count(-2.0, [], []) == 0
    assert reflection_score(0) == 0.0
    with pytest.raises(ValueError):
        reflection_count(-2.0, [-1.0], [])


def test_reflection_score_is_tanh_half():
    np.testing.assert_allclose(reflection_score(np.arange(4)), np.tanh(np.arange(4) / 2),
                               rtol=1e-6)


@pytest.mark.parametrize("mode,expected", [(KeywordMatch.WORD, 1), (KeywordMatch.SUBSTRING, 2)])
def test_substring_keyword_changes_the_count(mode, expected):
    """A paragraph with "attribute" and no keyword counts only under published matching."""
    y = "<think>\nStart.\n\nThe attribute is key.\n\nWait a minute, rain!\n</think>A"
    block = parse_think_block(y)
    flags = [has_keyword(s.text, RewardConfig().keywords, mode) for s in block.segments]
    assert flags == [False, mode is KeywordMatch.SUBSTRING, True]
    assert reflection_count(-3.0, [-3.5, -3.0, -2.0], flags) == expected


def test_wait_a_minute_counts_once():
    """"Wait a minute" also contains "Wait": a segment counts at most once."""
    flags = [has_keyword("Wait a minute.", RewardConfig().keywords)]
    assert reflection_count(-2.0, [-1.0], flags) == 1


# ---- math -------------------------------------------------------------------------------------


@pytest.mark.parametrize("response,reference,expected", [
    ("<think>\nsum it\n</think>\nSo \\boxed{42}.", "42", 1.0),  # right
    ("<think>\nsum it\n</think>\nSo \\boxed{41}.", "42", 0.0),  # wrong
    ("<think>\nsum it\n</think>\nSo 42.", "42", 0.0),  # missing
    ("<think>\n\\boxed{42}\n</think>\nSo 42.", "42", 0.0),  # inside the think block only
    ("<think>\n\\boxed{42}\n</think>\n\\boxed{7} then \\boxed{ 42 }", " 42", 1.0),  # last, stripped
    ("<think>\n\\boxed{42} and on", "42", 0.0),  # truncated inside the think block
    ("No thinking: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),  # nested braces, no think
])
def test_math_reward(response, reference, expected):
    assert math_reward(response, reference) == expected


@pytest.mark.parametrize("response,reference,ours,published", [
    # nested braces: the published regex stops at the first "}"
    ("<think>\nx\n</think>\n\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0, 0.0),
    # no \boxed: the published check compares the whole answer text
    ("<think>\nx\n</think>\n 42 ", "42", 0.0, 1.0),
    # an unclosed think block is answer text to the published check
    ("<think>\nso \\boxed{42}", "42", 0.0, 1.0),
    # every think block is removed, not only the first; a box inside one does not count
    ("<think>a</think>\\boxed{1}<think>\\boxed{2}</think>", "1", 0.0, 1.0),
    # the regex does not cross a newline: the box is missed, the whole text is compared
    ("<think>\nx\n</think>\\boxed{4\n2}", "4\n2", 1.0, 0.0),
    ("<think>\nx\n</think>\nSo \\boxed{42}.", "42", 1.0, 1.0),
])
def test_published_math_check_differs_where_the_method_notes_say(response, reference, ours,
                                                                 published):
    assert math_reward(response, reference) == ours
    assert published_math_reward(response, reference) == published


def test_last_boxed():
    assert last_boxed("\\boxed{a} \\boxed{b{c}}") == "b{c}"
    assert last_boxed("\\boxed{a} \\boxed{unclosed") == "a"
    assert last_boxed("nothing") is None


# ---- config -----------------------------------------------------------------------------------


def test_config_coerces_strings_and_validates():
    cfg = RewardConfig(keyword_match="substring", scorer="reference", keywords=["Hmm"])
    assert cfg.keyword_match is KeywordMatch.SUBSTRING and cfg.scorer is Scorer.REFERENCE
    assert cfg.keywords == ("Hmm",)
    assert RewardConfig().rank_weight == 0.3 and RewardConfig().reflection_weight == 0.7
    for bad in (dict(keyword_match="fuzzy"), dict(max_segments=0), dict(temperature=0.0),
                dict(keywords=()), dict(rank_weight=float("nan")), dict(group_size=0)):
        with pytest.raises(ValueError):
            RewardConfig(**bad)


def test_distinct_reflections_deviation_drops_restated_paragraphs():
    from opera_jax.reward.opera import _writing_sample
    from opera_jax.tokenizer import encode_with_offsets, load_tokenizer

    tok = load_tokenizer()
    text = ("<think>\nThe owl stays near the river.\n\nWait, the owl stays near the meadow.\n\n"
            "But, the owl stays near the meadow.\n\nHmm, the owl is white.\n</think>\n\nx")
    ids, offsets = encode_with_offsets(tok, text)

    def flags(**kw):
        return _writing_sample(0, [1, 2], ids, offsets, text, [3], "r", 1022,
                               RewardConfig(**kw)).keyword_flags

    assert flags() == (False, True, True, True)  # the method: every keyword paragraph
    # paragraph 3 restates paragraph 2 (Jaccard 1 without "Wait"/"But"); paragraph 2 shares
    # 4 of 6 words with paragraph 1 (0.67 < 0.8) and still counts
    assert flags(distinct_reflections=0.8) == (False, True, False, True)
    with pytest.raises(ValueError, match="distinct_reflections must be in"):
        RewardConfig(distinct_reflections=1.5)
