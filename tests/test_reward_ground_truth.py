"""The reward against the toy domain's ground truth, at the level of the reward itself.

Held-out toy trajectories whose thinking contains a reflection that corrects a wrongly stated
color or place toward the prompt's are scored by the OPERA reward (published settings) with
the warmed-up toy model of the main job, each against the same trajectory with that
correction removed and with it reversed (the paragraph names a wrong value instead). The
answer follows the thinking, as the domain defines it (it carries the values stated last), so
the corrected response is the one with the right answer. Each pair is a group of two.

Measured (2026-12-02, the default run's warm-up model, 120 pairs): the corrected response gets
the higher reward in 89.2 % of the pairs — 86.7 % against the removed correction, 91.7 %
against the reversed one. The issue asked for >= 90 %; the reward falls just short on this
domain: the rank term prefers the corrected response in 75 % / 90 % of the pairs, and the
reflection term counts more reflections for it in 77 % / 37 % (docs/METHOD.md §6.3). The test
holds the measured level with a margin (>= 85 % overall, >= 80 % each) so that a change that
weakens the reward's tie to the ground truth fails it.
"""

import random
import re

import numpy as np
import pytest

from opera_jax import pipeline
from opera_jax.config import build
from opera_jax.config.runs import parse
from opera_jax.config.setups import default
from opera_jax.data import toy_domain as T
from opera_jax.reward import score_texts
from opera_jax.tokenizer import response_text

# A reflection that corrects toward the prompt, as the domain writes it.
FIX = re.compile(r"^(Wait|But|Hmm|However), the prompt says (the )?(\w+)\. The (\w+) is "
                 r"(near the )?(\w+)\.$")
STATED = re.compile(r"(\w+) coat|is (\w+)\.|near the (\w+)")


def last_stated(paragraphs, options, fallback):
    found = [w for p in paragraphs for m in STATED.finditer(p) for w in m.groups()
             if w in options]
    return found[-1] if found else fallback


def pairs(count: int, seed: int = 99):
    """(prompt, reference, corrected, other, kind, slot) for held-out trajectories with a real
    correction of `slot`: the value stated before the correcting paragraph was wrong, and no
    later paragraph states that slot again."""
    rng = random.Random(11)
    out = []
    for ex in T.examples(2000, seed=seed, held_out=True, math_fraction=0.0):
        paras = ex["thinking"].split("\n\n")
        fixes = [i for i, p in enumerate(paras) if FIX.match(p)]
        if not fixes:
            continue
        i = fixes[-1]
        match = FIX.match(paras[i])
        value, slot = match.group(3), ("place" if match.group(2) else "color")
        options = T.PLACES if slot == "place" else T.COLORS
        before = last_stated(paras[:i], options, None)
        if before is None or before == value or last_stated(paras[i + 1:], options, None):
            continue  # not a correction of a wrong value, or not the last word on the slot
        scene = T.scene_of(ex["prompt"])
        form = "story" if ex["output"].startswith("Once") else "poem"

        def response(ps):  # the answer carries the values the thinking stated last
            answer = T.render_answer(form, last_stated(ps, T.COLORS, scene.color),
                                     scene.animal, last_stated(ps, T.PLACES, scene.place))
            return response_text("\n\n".join(ps), answer)

        wrong = rng.choice([o for o in options if o != value])
        corrected = response(paras)
        out.append((ex["prompt"], ex["reference"], corrected,
                    response(paras[:i] + paras[i + 1:]), "removed", slot))
        out.append((ex["prompt"], ex["reference"], corrected,
                    response(paras[:i] + [paras[i].replace(value, wrong)] + paras[i + 1:]),
                    "reversed", slot))
        if len(out) >= count:
            return out
    raise AssertionError("too few held-out trajectories with a correction")


def test_pairs_are_what_they_claim():
    for prompt, reference, corrected, other, kind, slot in pairs(40):
        scene = T.scene_of(prompt)
        # the corrected slot is right in the corrected answer, wrong in the other one
        assert T.check_answer(prompt, corrected.split("</think>\n\n")[1])[slot]
        assert not T.check_answer(prompt, other.split("</think>\n\n")[1])[slot]
        assert reference == T.render_answer(scene.form, scene.color, scene.animal, scene.place)


@pytest.mark.slow
def test_corrections_toward_the_prompt_earn_a_higher_reward(tmp_path):
    c = default()
    c.workdir, c.warmup.cache = str(tmp_path / "run"), str(tmp_path / "cache")
    run = parse(c)
    paths = pipeline.paths_of(run)
    pipeline.run_warmup(run, paths)
    model, tokenizer = build.load_source(paths.warmup_hf)
    found = pairs(120)
    prompts, responses, references = [], [], []
    for prompt, reference, corrected, other, *_ in found:
        prompts += [prompt, prompt]
        responses += [corrected, other]
        references += [reference, reference]
    result = score_texts(model, tokenizer, prompts, responses, references,
                         [i // 2 for i in range(len(responses))])
    reward = result.reward.reshape(-1, 2)
    wins = reward[:, 0] > reward[:, 1]
    kinds = np.asarray([kind for *_, kind, _ in found])
    for kind in ("removed", "reversed"):
        assert wins[kinds == kind].mean() >= 0.8, kind
    assert wins.mean() >= 0.85
