"""Response diagnostics: repeated 4-grams and paragraphs, think closed, ground truth."""

import pytest

from opera_jax.reward.segments import parse_think_block
from opera_jax.rollout import diagnostics as D

KEYWORDS = ("But", "Wait", "Hmm", "However", "Wait a minute")


def test_repeated_ngram_share_counts_repeats_of_earlier_ngrams():
    assert D.repeated_ngram_share([1, 2, 3]) == 0.0             # no 4-gram at all
    assert D.repeated_ngram_share([1, 2, 3, 4, 5]) == 0.0       # 2 distinct 4-grams
    # 1 2 3 4 1 2 3 4: 5 four-grams, distinct {1234, 2341, 3412, 4123}: one repeat
    assert D.repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    assert D.repeated_ngram_share([7] * 10) == pytest.approx(6 / 7)


def test_near_repeat_ignores_the_reflection_keyword():
    text = ("<think>\nI want to write a story.\n\nWait, the owl stays near the meadow.\n\n"
            "But, the owl stays near the meadow.\n\nHmm, the owl is white.\n</think>\n\nx")
    block = parse_think_block(text)
    # paragraph 3 repeats paragraph 2 once "Wait" / "But" are set aside: 1 of 4
    assert D.repeated_paragraph_share(block, KEYWORDS) == pytest.approx(1 / 4)
    a = D.content_words("Wait, the owl stays near the meadow.", KEYWORDS)
    assert a == {"the", "owl", "stays", "near", "meadow"}
    b = D.content_words("The owl stays near the river.", KEYWORDS)
    # Jaccard 4/6 = 0.667: below 0.8, above 0.6
    assert not D.near_repeat(b, [a], threshold=0.8) and D.near_repeat(b, [a], threshold=0.6)
    assert not D.near_repeat(frozenset(), [a], threshold=0.0)


def test_response_quality_on_a_toy_prompt():
    prompt = "Write a short poem about a red fox near the river."
    answer = "A red fox by the river,\nquiet and slow.\nThe river keeps the fox\nwhere the red winds go."
    closed = f"<think>\nThe fox is red.\n</think>\n\n{answer}"
    q = D.response_quality(prompt, closed, list(range(20)), keywords=KEYWORDS)
    assert q == {"think_closed": 1.0, "repeat_ngram": 0.0, "repeat_paragraph": 0.0,
                 "truth/well_formed": 1.0, "truth/color": 1.0, "truth/place": 1.0,
                 "truth/correct": 1.0}
    # cut off inside the think block: no answer, so nothing of the ground truth holds
    cut = D.response_quality(prompt, "<think>\nThe fox is red.", [1, 2], keywords=KEYWORDS)
    assert cut["think_closed"] == 0.0 and cut["truth/correct"] == 0.0
    # a prompt without a ground truth has no truth/* keys
    other = D.response_quality("Write about the sea.", closed, [1], keywords=KEYWORDS)
    assert not any(k.startswith("truth/") for k in other)
    means = D.mean_quality([q, other], "val/")
    assert means["val/think_closed"] == 1.0 and means["val/truth/correct"] == 1.0
