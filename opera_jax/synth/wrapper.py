"""The teacher's instruction wrapper and the text conventions of a synthesised thinking.

The wrapper (docs/METHOD.md §4, step 1, in the project's own words) asks for first-person,
present-tense thinking without lists or headings, inside one think block, with frequent
reflection. It names the block in words: special-token strings in a user message would be
encoded as the special tokens themselves. It is kept to two sentences: the warm-up stage
trains the toy teacher on some wrapped prompts, and a short wrapper costs few context tokens
at every synthesis phase.

    wrap_prompt("Write a short story about a red fox near the river.")
    stop_strings(("Wait", "Hmm"))  # ("Wait", "\\nWait", ". Wait", "Hmm", …, "</think>")
    first_paragraph(", the fox is red.\\n\\nI will write")  # ", the fox is red.\\n\\n"
"""

from __future__ import annotations

import re
from typing import Sequence

from opera_jax.reward.config import GUIDING_WORDS
from opera_jax.tokenizer import THINK_CLOSE

WRAPPER = ("Think aloud first, in the first person and present tense, in plain paragraphs "
           "without lists or headings, inside one think block. Question yourself often with "
           "phrases like \"Hmm, maybe\", \"Let me think\", \"Wait,\" or \"But wait\", then "
           "answer.\n\n{prompt}")

_CONTENT = re.compile(r"\S")
_BLANK = re.compile(r"\n\n+")


def wrap_prompt(prompt: str) -> str:
    """The user message the teacher sees while it writes the thinking (the answer phase uses
    the unwrapped prompt)."""
    return WRAPPER.format(prompt=prompt)


def stop_strings(guiding_words: Sequence[str]) -> tuple[str, ...]:
    """Stop strings of a thinking phase: each guiding word bare, after "\\n" and after ". "
    (the sampler reports the longest variant that ended, so the reflective state keeps the
    separator that preceded the word), then `</think>`."""
    out = []
    for word in guiding_words:
        out += [word, "\n" + word, ". " + word]
    return tuple(dict.fromkeys(out)) + (THINK_CLOSE,)


def first_paragraph(text: str) -> str:
    """`text` through the end of its first blank line ("\n\n", or a longer run of newlines)
    after some non-space content; all of it when there is none.

    The blank line stays with the paragraph: the next context then ends the way the teacher
    wrote paragraph ends (".\n\n" is one token in Qwen's vocabulary; a context cut at "." would
    make it continue from a token boundary it never saw there).
    """
    start = _CONTENT.search(text)
    blank = _BLANK.search(text, start.end()) if start else None
    return text if blank is None else text[:blank.end()]
