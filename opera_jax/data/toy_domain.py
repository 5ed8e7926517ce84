"""The embedded toy domain of the default run: scene-writing prompts whose answers copy the thinking.

It stands in for a pretrained instruct model and a writing dataset, which cannot be downloaded
here, and is built so that every OPERA stage does real work on a tiny model:

* Prompt: "Write a short story about a red fox near the river." The gold reference is the
  story/poem template filled with the prompt's color, animal and place.
* Thinking: paragraphs separated by blank lines. Some state a color or place (right or wrong),
  some reflect with a guiding word ("Wait", "But", "Hmm", "However", "Let me think") and
  correct a wrong value, some reflect and go astray, some are filler.
* Answer: the template filled with the values the thinking stated LAST (the prompt's where it
  stated none). So after warm-up the model's answer follows its thinking, and
  LP(reference | prompt + thinking so far) rises exactly when a paragraph restates the right
  value: reflective corrections earn reflection credit, wrong turns lose it, and RL has
  something to learn (reflect, and reflect towards the prompt).
* A few `math` rows ("What is 3 plus 4?" → \\boxed{7}) exercise the verifiable-reward path.

Ground truth. The reward never reads the answer, but on this domain the answer can be checked
exactly: `check_answer(prompt, answer)` says whether it is the form's template with the prompt's
animal (well-formed) and whether its color and place are the prompt's. That is the question
OPERA's thesis asks in miniature: does rewarding the thinking make the answer right?

Everything is deterministic given a seed. Held-out prompts come from a disjoint set of
(color, animal, place) triples, so validation measures generalisation, not recall.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Callable

from opera_jax.reward.config import GUIDING_WORDS
from opera_jax.tokenizer import EOS_TOKEN, response_text

COLORS = ("red", "blue", "green", "golden", "silver", "white", "black", "gray")
ANIMALS = ("fox", "owl", "cat", "bear", "wolf", "deer", "crow", "horse")
PLACES = ("forest", "river", "city", "garden", "mountain", "harbor", "meadow", "desert")
FORMS = ("story", "poem")


@dataclasses.dataclass(frozen=True)
class Scene:
    form: str
    color: str
    animal: str
    place: str

    @property
    def prompt(self) -> str:
        return f"Write a short {self.form} about a {self.color} {self.animal} near the {self.place}."


def render_answer(form: str, color: str, animal: str, place: str) -> str:
    """The answer text for a form and slot values (the reference uses the prompt's values)."""
    if form == "story":
        return (f"Once a {color} {animal} lived near the {place}. Every morning the {animal} "
                f"walked to the {place}, and the {color} {animal} was happy there.")
    return (f"A {color} {animal} by the {place},\nquiet and slow.\n"
            f"The {place} keeps the {animal}\nwhere the {color} winds go.")


_PROMPT = re.compile(r"Write a short (story|poem) about a (\w+) (\w+) near the (\w+)\.")


def _words(options) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(options) + r")\b")


_COLOR_WORDS, _PLACE_WORDS = _words(COLORS), _words(PLACES)


def scene_of(prompt: str) -> Scene | None:
    """The scene a toy prompt asks for (also inside the synthesis wrapper), or None when the
    prompt is not one of this domain's writing prompts (no ground truth to check)."""
    m = _PROMPT.search(prompt)
    if m is None:
        return None
    scene = Scene(*m.groups())
    known = scene.color in COLORS and scene.animal in ANIMALS and scene.place in PLACES
    return scene if known else None


def check_answer(prompt: str, answer: str) -> dict[str, bool] | None:
    """The answer measured against the prompt's scene; None without a checkable ground truth.

    Returns:
      well_formed: the answer is a story or poem template for the prompt's animal with one
        color and one place of the domain (not degenerate, not cut off, nothing added; the
        form is not judged);
      color / place: every color (place) word in the answer is the prompt's, and there is one;
      correct: all three.
    """
    scene = scene_of(prompt)
    if scene is None:
        return None
    answer = answer.strip()
    colors, places = set(_COLOR_WORDS.findall(answer)), set(_PLACE_WORDS.findall(answer))
    well_formed = len(colors) == 1 and len(places) == 1 and any(
        answer == render_answer(form, next(iter(colors)), scene.animal, next(iter(places)))
        for form in FORMS)
    color, place = colors == {scene.color}, places == {scene.place}
    return {"well_formed": well_formed, "color": color, "place": place,
            "correct": well_formed and color and place}


def _is_held_out(scene: Scene) -> bool:
    """A fixed ~12% of (color, animal, place) triples are kept for validation / evaluation."""
    key = f"{scene.color}|{scene.animal}|{scene.place}".encode()
    return hashlib.sha256(key).digest()[0] < 32


def _scene(rng: random.Random, held_out: bool) -> Scene:
    while True:
        s = Scene(rng.choice(FORMS), rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(PLACES))
        if _is_held_out(s) == held_out:
            return s


def _other(rng: random.Random, options, value):
    return rng.choice([o for o in options if o != value])


def _state(slot: str, value: str, animal: str) -> str:
    return (f"I see the {animal} with a {value} coat." if slot == "color"
            else f"The {animal} stays near the {value}.")


def _thinking(rng: random.Random, scene: Scene) -> tuple[str, dict[str, str]]:
    """Thinking paragraphs and the slot values they leave stated last."""
    truth = {"color": scene.color, "place": scene.place}
    options = {"color": COLORS, "place": PLACES}
    paragraphs = [f"I want to write a {scene.form} about the {scene.animal}."]
    last: dict[str, str] = {}
    for slot in ("color", "place"):
        if rng.random() < 0.8:
            value = truth[slot] if rng.random() < 0.5 else _other(rng, options[slot], truth[slot])
            paragraphs.append(_state(slot, value, scene.animal))
            last[slot] = value
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        kind = rng.random()
        slot = rng.choice(("color", "place"))
        if kind < 0.5:  # reflect and correct
            word = rng.choice(("Wait", "But", "Hmm", "However"))
            value = truth[slot]
            fix = (f"the prompt says {value}. The {scene.animal} is {value}." if slot == "color"
                   else f"the prompt says the {value}. The {scene.animal} is near the {value}.")
            paragraphs.append(f"{word}, {fix}")
            last[slot] = value
        elif kind < 0.75:  # reflect and go astray
            word = rng.choice(("Hmm,", "But", "Wait,"))
            value = _other(rng, options[slot], truth[slot])
            guess = (f"the {scene.animal} has a {value} coat." if slot == "color"
                     else f"the {scene.animal} stays near the {value}.")
            paragraphs.append(f"{word} maybe {guess}")
            last[slot] = value
        else:  # filler reflection
            paragraphs.append(rng.choice((
                "Let me think about the sound of the words.",
                "Hmm, I want the ending to feel calm.",
                "But it should stay short.",
            )))
    paragraphs.append(f"I will write the {scene.form} now.")
    return "\n\n".join(paragraphs), last


def scene_example(rng: random.Random, *, held_out: bool = False) -> dict:
    """One writing example: prompt, reference, thinking, output, task_type."""
    scene = _scene(rng, held_out)
    thinking, last = _thinking(rng, scene)
    output = render_answer(scene.form, last.get("color", scene.color), scene.animal,
                           last.get("place", scene.place))
    return {"prompt": scene.prompt,
            "reference": render_answer(scene.form, scene.color, scene.animal, scene.place),
            "thinking": thinking, "output": output, "task_type": "writing"}


def math_example(rng: random.Random) -> dict:
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    thinking = (f"I add {a} and {b}.\n\nWait, let me check the sum. {a} plus {b} is {a + b}.")
    return {"prompt": f"What is {a} plus {b}? Put the answer in \\boxed{{}}.",
            "reference": str(a + b), "thinking": thinking,
            "output": f"The answer is \\boxed{{{a + b}}}.", "task_type": "math"}


def examples(n: int, *, seed: int, held_out: bool = False, math_fraction: float = 0.1) -> list[dict]:
    """`n` deterministic examples with ids; `held_out` draws from the validation triples."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ex = math_example(rng) if rng.random() < math_fraction else scene_example(rng, held_out=held_out)
        ex["id"] = f"{'val' if held_out else 'train'}-{seed}-{i}"
        out.append(ex)
    return out


def prompt_rows(n: int, *, seed: int, held_out: bool = False, math_fraction: float = 0.1) -> list[dict]:
    """Prompt rows for synthesis / RL / evaluation: id, prompt, reference, task_type."""
    return [{k: ex[k] for k in ("id", "prompt", "reference", "task_type")}
            for ex in examples(n, seed=seed, held_out=held_out, math_fraction=math_fraction)]


def warmup_texts(n: int, *, seed: int, chat: Callable[[str], str],
                 wrap: Callable[[str], str] | None = None, eos: str = EOS_TOKEN) -> list[str]:
    """Full training texts for the from-scratch warm-up.

    Args:
      n: number of texts.
      chat: prompt -> the prompt as the policy sees it (chat template + generation prompt).
      wrap: the synthesis instruction wrapper; half of the texts use it, so the warmed-up
        model also serves as the synthesis teacher.
    Returns:
      chat(prompt) + "<think>\\n" + thinking + "\\n</think>\\n\\n" + output + eos, per example.
    """
    rng = random.Random(seed + 1)
    texts = []
    for ex in examples(n, seed=seed):
        prompt = wrap(ex["prompt"]) if wrap is not None and rng.random() < 0.5 else ex["prompt"]
        texts.append(chat(prompt) + response_text(ex["thinking"], ex["output"]) + eos)
    return texts
