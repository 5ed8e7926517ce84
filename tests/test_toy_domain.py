"""The embedded toy domain: answers follow the thinking's last statements; splits are disjoint."""

import re

from opera_jax.data import toy_domain as T


def _last_stated(thinking, slot, options):
    pattern = (r"(\w+) coat|is (\w+)\." if slot == "color" else r"near the (\w+)")
    found = [w for m in re.finditer(pattern, thinking) for w in m.groups() if w in options]
    return found[-1] if found else None


def test_answers_copy_the_last_stated_values():
    seen_wrong = seen_fixed = 0
    for ex in T.examples(300, seed=0, math_fraction=0.0):
        scene = re.match(r"Write a short (\w+) about a (\w+) (\w+) near the (\w+)\.", ex["prompt"])
        form, color, animal, place = scene.groups()
        c = _last_stated(ex["thinking"], "color", T.COLORS) or color
        p = _last_stated(ex["thinking"], "place", T.PLACES) or place
        assert ex["output"] == T.render_answer(form, c, animal, p)
        assert ex["reference"] == T.render_answer(form, color, animal, place)
        seen_wrong += ex["output"] != ex["reference"]
        seen_fixed += "the prompt says" in ex["thinking"] and ex["output"] == ex["reference"]
    # both kinds occur often enough for the reward to have signal
    assert 50 < seen_wrong < 250 and seen_fixed > 30


def test_guiding_words_start_reflective_paragraphs():
    ex = T.examples(200, seed=1, math_fraction=0.0)
    paragraphs = [p for e in ex for p in e["thinking"].split("\n\n")]
    reflective = [p for p in paragraphs if p.startswith(T.GUIDING_WORDS)]
    assert len(reflective) > 100


def test_math_rows():
    rows = [e for e in T.examples(200, seed=2, math_fraction=0.5) if e["task_type"] == "math"]
    assert 60 < len(rows) < 140
    for e in rows:
        a, b = map(int, re.findall(r"\d+", e["prompt"])[:2])
        assert e["reference"] == str(a + b) and e["output"].endswith(f"\\boxed{{{a + b}}}.")


def test_deterministic_and_held_out_disjoint():
    assert T.examples(20, seed=5) == T.examples(20, seed=5)
    train = {e["prompt"] for e in T.examples(500, seed=0, math_fraction=0.0)}
    val = {e["prompt"] for e in T.examples(100, seed=0, held_out=True, math_fraction=0.0)}
    key = lambda p: p.split(" about ")[1]
    assert not ({key(p) for p in train} & {key(p) for p in val})


def test_warmup_texts_shape():
    texts = T.warmup_texts(10, seed=0, chat=lambda p: f"<U>{p}</U>", wrap=lambda p: f"[W]{p}")
    assert all(t.startswith("<U>") and "</U><think>\n" in t and t.endswith("<|im_end|>") for t in texts)
    assert any("[W]" in t for t in texts) and any("[W]" not in t for t in texts)


def test_check_answer_reads_the_slots_from_the_answer_text():
    prompt = "Write a short story about a white owl near the meadow."
    right = T.render_answer("story", "white", "owl", "meadow")
    assert T.check_answer(prompt, right) == dict(well_formed=True, color=True, place=True,
                                                 correct=True)
    # the other form is still well formed (the form is not judged), and still correct
    assert T.check_answer(prompt, T.render_answer("poem", "white", "owl", "meadow"))["correct"]
    wrong_color = T.render_answer("story", "black", "owl", "meadow")
    assert T.check_answer(prompt, wrong_color) == dict(well_formed=True, color=False,
                                                       place=True, correct=False)
    # two colors in one answer: color wrong, not well formed; the place is still right
    mixed = right.replace("the white owl was", "the blue owl was")
    assert T.check_answer(prompt, mixed) == dict(well_formed=False, color=False, place=True,
                                                 correct=False)
    # the collapse the issue showed: degenerate text is neither well formed nor correct
    degenerate = "Once a white owl bl black owl bl bl blue owl bl bl"
    assert T.check_answer(prompt, degenerate) == dict(well_formed=False, color=False,
                                                      place=False, correct=False)
    # right slots in a broken template: slots right, not well formed, not correct
    broken = "Once a white owl lived near the meadow. The end."
    assert T.check_answer(prompt, broken) == dict(well_formed=False, color=True, place=True,
                                                  correct=False)


def test_only_toy_prompts_have_a_ground_truth():
    assert T.check_answer("Write a poem about the sea.", "The sea.") is None
    assert T.check_answer("What is 3 plus 4? Put the answer in \\boxed{}.", "7") is None
    assert T.scene_of("Write a short poem about a purple owl near the meadow.") is None
    wrapped = "Think aloud first.\n\nWrite a short poem about a red fox near the river."
    assert T.scene_of(wrapped) == T.Scene("poem", "red", "fox", "river")


def test_the_synthesised_answers_ground_truth_matches_the_examples():
    # every example's output is correct exactly when it equals the reference
    for ex in T.examples(300, seed=3, math_fraction=0.0):
        truth = T.check_answer(ex["prompt"], ex["output"])
        assert truth["well_formed"] and truth["correct"] == (ex["output"] == ex["reference"])
