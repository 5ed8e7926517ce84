"""Build the embedded tiny byte-level BPE tokenizer into `opera_jax/assets/tiny_tokenizer/`.

    python scripts/build_tokenizer.py [--out DIR]

The tokenizer copies Qwen3's pipeline (NFC, the Qwen split regex, byte-level BPE, byte-level
decoder) at 1024 ids: 1019 learned byte-level tokens, then `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`, `<think>`, `</think>` in Qwen3's order. It is trained on a corpus this script
generates from a fixed seed (writing prompts, first-person thinking with guiding words, answers,
chat scaffolding), so every run writes the same bytes. The files are committed; rerun this
only to change the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers import processors, trainers
from tokenizers.models import BPE

VOCAB_SIZE = 1024
# Qwen2/Qwen3 split: a newline run ends a piece (it may follow punctuation, never precede text).
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# As in Qwen3: added (never split) but not "special", so decoding with
# skip_special_tokens=True keeps the think tags.
THINK_TOKENS = ("<think>", "</think>")
SEED = 20260627
NUM_DIALOGUES = 300

# Qwen3's template, less tool calls and history-thinking stripping: each message is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; with enable_thinking=False the generation prompt
# carries an empty think block, exactly as Qwen3 renders it.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unsupported chat role: ' + message.role) }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# ---- corpus -------------------------------------------------------------------------------

_FORMS = ("a short story", "a poem", "a letter", "a personal essay", "a scene", "a monologue",
          "a fable", "a diary entry", "a speech", "a haiku sequence")
_SUBJECTS = ("a lighthouse keeper", "an old violinist", "a girl who collects maps", "a retired "
             "astronaut", "two sisters", "a baker in a small town", "a lost dog", "a city at "
             "night", "a gardener", "a young teacher", "a fisherman's widow", "a robot learning "
             "to paint", "my grandmother's kitchen", "a train conductor", "a forgotten library")
_EVENTS = ("finds a letter from 1972", "waits for a storm", "has to say goodbye", "keeps a "
           "secret for 30 years", "learns to forgive", "hears a strange song", "moves to a new "
           "country", "loses the last photograph", "meets a stranger on a bridge", "counts the "
           "days until spring")
_TONES = ("hopeful", "quiet", "bittersweet", "funny", "tense", "warm", "melancholy", "playful")
_DETAILS = ("the smell of rain", "a cracked teacup", "the sound of the sea", "cold coffee",
            "a red scarf", "the last bus home", "snow on the window", "an unfinished sentence",
            "a clock that runs 5 minutes late", "the light at 6 a.m.")
_GUIDES = ("Wait", "But", "Hmm", "However", "Let me think", "Alternatively", "Wait a minute",
           "But wait", "Hmm, maybe", "Actually")
_SYSTEMS = ("You are a helpful assistant.", "You are a thoughtful creative writing partner.",
            "Answer carefully and think before you write.")
_NAMES = ("Mara", "Tomas", "Ines", "Jonah", "Li Wei", "Aoife", "Ravi", "Chloé", "Nadia", "Ezra")


def _prompt(rng: random.Random) -> str:
    """One writing request, e.g. "Write a poem about a gardener who learns to forgive."."""
    form, subject, event = rng.choice(_FORMS), rng.choice(_SUBJECTS), rng.choice(_EVENTS)
    return rng.choice((
        f"Write {form} about {subject} who {event}.",
        f"Can you write {form} about {subject}? Keep it {rng.choice(_TONES)}, under "
        f"{rng.randint(2, 9) * 50} words.",
        f"I need {form} for a class: {subject} {event}. Make it {rng.choice(_TONES)}!",
        f"Write {form} that starts with \"{rng.choice(_DETAILS).capitalize()}.\"",
    ))


def _thinking(rng: random.Random, prompt: str) -> str:
    """First-person thinking aloud: paragraphs, most opening with a guiding word."""
    tone, detail, name = rng.choice(_TONES), rng.choice(_DETAILS), rng.choice(_NAMES)
    paragraphs = [f"Okay, the user wants this: {prompt} Let me figure out what matters most "
                  f"here. I think the heart of it is a {tone} feeling, not the plot."]
    for _ in range(rng.randint(3, 7)):
        guide = rng.choice(_GUIDES)
        detail2 = rng.choice(_DETAILS)
        paragraphs.append(rng.choice((
            f"{guide}, maybe I should open with {detail}. It's concrete, and it sets the mood "
            f"before anything happens.",
            f"{guide} — if the main character is called {name}, does that change the voice? "
            f"I'd rather keep it simple; the name shouldn't carry the story.",
            f"{guide}... that ending feels too neat. What if {name} doesn't get an answer? "
            f"That's more honest, and it's {tone} in a quieter way.",
            f"{guide}, the request says \"{rng.choice(_TONES)}\" but I keep drifting toward "
            f"{rng.choice(_TONES)}. Let me pull it back with {detail2}.",
            f"{guide}. I have about {rng.randint(3, 12)} sentences in mind; the middle ones "
            f"should slow down, and the last one should land on {detail2}.",
            f"{guide}, the reader won't know why {detail} matters unless I show it early. "
            f"So: mention it in line {rng.randint(1, 4)}, then return to it at the end.",
        )))
    paragraphs.append(f"Right. Structure: {rng.randint(2, 5)} short paragraphs, first person, "
                      f"ending on {detail}. I'm ready to write it.")
    return "\n\n".join(paragraphs)


def _answer(rng: random.Random) -> str:
    """A short piece of prose with names, numbers, quotes and contractions."""
    name, detail = rng.choice(_NAMES), rng.choice(_DETAILS)
    sentences = [
        f"{name} never talked about {detail}.",
        f"It was {rng.randint(1, 12)}:{rng.randint(10, 59)} when the door finally opened.",
        f"\"You're late,\" she said, and I couldn't tell if she was angry or relieved.",
        f"We'd waited {rng.randint(2, 40)} years for this; nobody said so.",
        f"Outside, {rng.choice(_DETAILS)} — and then nothing at all.",
        f"I didn't know what to say. Does anyone, really?",
        f"In {rng.randint(1900, 2025)}, the town had {rng.randint(100, 9999)} people. Now it "
        f"has {rng.randint(10, 99)}.",
        f"{name} laughed (a small, tired laugh) and turned back to the window.",
    ]
    rng.shuffle(sentences)
    paragraphs = [" ".join(sentences[i:i + 3]) for i in range(0, len(sentences), 3)]
    return "\n\n".join(paragraphs)


def _math_dialogue(rng: random.Random) -> tuple[str, str, str]:
    """A small arithmetic prompt with thinking and a boxed answer (the `math` task type)."""
    a, b = rng.randint(2, 999), rng.randint(2, 999)
    prompt = f"What is {a} + {b}? Put the final answer in \\boxed{{}}."
    thinking = (f"I need {a} + {b}. Let me add: {a} + {b} = {a + b}.\n\nWait, let me check. "
                f"{a + b} - {b} = {a}. Yes, that's right.")
    return prompt, thinking, f"The sum is \\boxed{{{a + b}}}."


def build_corpus(seed: int = SEED, num_dialogues: int = NUM_DIALOGUES) -> list[str]:
    """Generate the training corpus: chat-formatted dialogues plus raw prose.

    Args:
      seed: seed of the `random.Random` that makes every choice.
      num_dialogues: number of chat-formatted examples.

    Returns:
      List of documents (strings), identical for the same arguments.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(num_dialogues):
        if rng.random() < 0.15:
            prompt, thinking, answer = _math_dialogue(rng)
        else:
            prompt = _prompt(rng)
            thinking, answer = _thinking(rng, prompt), _answer(rng)
        system = (f"<|im_start|>system\n{rng.choice(_SYSTEMS)}<|im_end|>\n"
                  if rng.random() < 0.3 else "")
        if rng.random() < 0.2:  # the enable_thinking=False form
            thinking = ""
        think = f"<think>\n{thinking}\n</think>\n\n" if thinking else "<think>\n\n</think>\n\n"
        docs.append(f"{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
                    f"{think}{answer}<|im_end|>\n<|endoftext|>")
        docs.append(_answer(rng))
    return docs


# ---- tokenizer ----------------------------------------------------------------------------

def _empty_tokenizer() -> Tokenizer:
    """A byte-level BPE with Qwen3's normalizer, pre-tokenizer, post-processor and decoder."""
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # trim_offsets=False: offsets tile the text, leading spaces included.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(docs: list[str]) -> Tokenizer:
    """Train the BPE on `docs`, then append the special and think tokens as added tokens.

    Args:
      docs: the corpus from `build_corpus`.

    Returns:
      A `tokenizers.Tokenizer` with exactly `VOCAB_SIZE` ids.
    """
    num_learned = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(THINK_TOKENS)
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=num_learned, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    # Strip the markup so no merge learns pieces of "<|im_start|>" or "<think>".
    markup = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + THINK_TOKENS))
    tok.train_from_iterator((markup.sub("", d) for d in docs), trainer=trainer,
                            length=len(docs))
    if tok.get_vocab_size() != num_learned:
        raise RuntimeError(f"learned {tok.get_vocab_size()} tokens, expected {num_learned}: "
                           "the corpus is too small")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"vocab size {tok.get_vocab_size()}, expected {VOCAB_SIZE}")
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    """The `tokenizer_config.json` that makes transformers load this dir as a Qwen2Tokenizer."""
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False,
                                  "rstrip": False, "single_word": False,
                                  "special": t in SPECIAL_TOKENS}
        for t in SPECIAL_TOKENS + THINK_TOKENS
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 40960,
        "split_special_tokens": False,
        # Inside the config (not chat_template.jinja) so transformers 4.x loads it too.
        "chat_template": CHAT_TEMPLATE,
    }


def write(tok: Tokenizer, out_dir: str) -> None:
    """Write tokenizer.json, tokenizer_config.json (chat template inside), special_tokens_map.json."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    special_map = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    for name, obj in (("tokenizer_config.json", tokenizer_config(tok)),
                      ("special_tokens_map.json", special_map)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")


def main() -> None:
    default_out = os.path.join(os.path.dirname(__file__), "..", "opera_jax", "assets",
                               "tiny_tokenizer")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.normpath(default_out))
    args = parser.parse_args()
    docs = build_corpus()
    tok = train_tokenizer(docs)
    write(tok, args.out)
    print(f"corpus {sum(len(d) for d in docs) / 1e3:.0f} K chars, vocab {tok.get_vocab_size()}, "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
