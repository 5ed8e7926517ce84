"""Hugging Face tokenizers, offline: loading, the chat template, encoding with offsets.

The embedded tiny tokenizer (`TINY_TOKENIZER_DIR`, built by `scripts/build_tokenizer.py`) copies
Qwen3's byte-level BPE pipeline at 1024 ids, so everything here behaves the same on it and on a
real Qwen3 checkpoint directory:

    tok = load_tokenizer()                        # or load_tokenizer("/ckpt/Qwen3-8B")
    x = apply_chat_template(tok, "Write a poem.")  # the prompt string the policy sees
    ids, offsets = encode_with_offsets(tok, x + response)

Encoding never adds BOS or other special tokens: the chat template already wrote them as text.
Text we write (the chat template, the response format) maps special-token strings
(`<|im_start|>`, `<think>`) to their single ids; text that comes from data — a user's prompt,
a reference, a synthesised thinking — does not: `encode_text` and `encode_prompt` encode any
special-token string inside it as the plain characters it is, so a data row cannot forge a
turn or a think block (`special_tokens_in_text=True` keeps the old behaviour for data that
means them).
"""

from __future__ import annotations

import os

import transformers

TINY_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets",
                                  "tiny_tokenizer")

# Any one of these makes a directory loadable by AutoTokenizer (fast file or slow vocab).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

EOS_TOKEN = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def load_tokenizer(path: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory, never from the Hub.

    Args:
      path: directory with Hugging Face tokenizer files; None means the embedded tiny tokenizer.

    Returns:
      The `transformers` tokenizer (a fast one for both the tiny tokenizer and Qwen3).

    Raises:
      FileNotFoundError: `path` is not a directory or holds no tokenizer files.
    """
    path = TINY_TOKENIZER_DIR if path is None else os.fspath(path)
    # Checked here so a typo reads as a missing directory, not as a failed Hub lookup.
    if not os.path.isdir(path) or not any(
            os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in directory {path!r}")
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def apply_chat_template(tokenizer, prompt: str, *, enable_thinking: bool = True,
                        system: str | None = None) -> str:
    """The prompt as the policy sees it: the chat template with the generation prompt.

    Args:
      tokenizer: a tokenizer with a Qwen3-style chat template.
      prompt: the user message.
      enable_thinking: False appends Qwen3's empty think block `<think>\\n\\n</think>\\n\\n`
        after the generation prompt, so the model answers without thinking.
      system: optional system message, rendered first.

    Returns:
      The rendered string, e.g. "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n".
    """
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


def response_text(thinking: str, output: str) -> str:
    """A response in the trained format: the think block, a blank line, then the answer
    (Qwen3's chat template writes the same separators)."""
    return f"{THINK_OPEN}\n{thinking}\n{THINK_CLOSE}\n\n{output}"


# A placeholder that no text contains (Unicode private use area), where the user's message
# goes when the chat template is rendered.
_USER_SLOT = "\ue000\ue001"


def _added_strings(tokenizer) -> tuple[str, ...]:
    return tuple(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                 if len(t.content) > 1)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of data text, with every special- or added-token string in it (`<|im_end|>`,
    `<think>`) encoded as the plain characters it is, never as the control token.

    The text is cut one character into each such string and the pieces are encoded on their
    own; the ids decode back to exactly `text`.
    """
    cuts = sorted({i + 1 for s in _added_strings(tokenizer)
                   for i in _find_all(text, s)})
    if not cuts:
        return encode(tokenizer, text)
    bounds = [0, *cuts, len(text)]
    return [t for a, b in zip(bounds, bounds[1:]) if b > a for t in encode(tokenizer, text[a:b])]


def has_special_strings(tokenizer, *texts: str) -> bool:
    """Whether any of `texts` holds a special- or added-token string."""
    return any(s in t for s in _added_strings(tokenizer) for t in texts)


def encode_response(tokenizer, thinking: str, output: str, *,
                    special_tokens_in_text: bool = False) -> list[int]:
    """Token ids of `response_text(thinking, output)`; the two fields are data, encoded by
    `encode_text` when they hold special-token strings (the think tags around them are the
    format's own)."""
    if special_tokens_in_text or not has_special_strings(tokenizer, thinking, output):
        return encode(tokenizer, response_text(thinking, output))
    return (encode(tokenizer, f"{THINK_OPEN}\n") + encode_text(tokenizer, thinking)
            + encode(tokenizer, f"\n{THINK_CLOSE}\n\n") + encode_text(tokenizer, output))


def _find_all(text: str, sub: str):
    start = text.find(sub)
    while start >= 0:
        yield start
        start = text.find(sub, start + 1)


def encode_prompt(tokenizer, prompt: str, *, enable_thinking: bool = True,
                  system: str | None = None, special_tokens_in_text: bool = False) -> list[int]:
    """Token ids of the prompt as the policy sees it (`apply_chat_template`), with the user's
    message encoded by `encode_text` (or as it is with `special_tokens_in_text`). A message
    without special-token strings is encoded with the template in one piece, as always."""
    if special_tokens_in_text or not has_special_strings(tokenizer, prompt):
        return encode(tokenizer, apply_chat_template(tokenizer, prompt,
                                                     enable_thinking=enable_thinking,
                                                     system=system))
    rendered = apply_chat_template(tokenizer, _USER_SLOT, enable_thinking=enable_thinking,
                                   system=system)
    if rendered.count(_USER_SLOT) != 1:
        raise ValueError("the chat template does not render the user message exactly once")
    before, after = rendered.split(_USER_SLOT)
    return encode(tokenizer, before) + encode_text(tokenizer, prompt) + encode(tokenizer, after)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without BOS or any added special tokens.

    Args:
      tokenizer: a `transformers` tokenizer.
      text: the string to encode; special-token strings in it become their single ids.

    Returns:
      List of token ids.
    """
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` with each token's (start, end) character offsets into `text`.

    For byte-level BPE the offsets are character offsets into `text` (not byte offsets), and
    with Qwen's pre-tokenizer they tile the text: each token's start is the previous end, a
    leading space included. One exception: a character whose UTF-8 bytes are split over
    several tokens gives each of those tokens that character's span.

    Args:
      tokenizer: a fast `transformers` tokenizer (offsets need the Rust backend).
      text: the string to encode.

    Returns:
      (ids, offsets): `ids[i]` covers `text[offsets[i][0]:offsets[i][1]]`.

    Raises:
      TypeError: the tokenizer is not a fast tokenizer.
    """
    if not tokenizer.is_fast:
        raise TypeError(f"offsets need a fast tokenizer, got {type(tokenizer).__name__}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def default_eos_ids(tokenizer) -> tuple[int, ...]:
    """`<|im_end|>` (end of a chat turn) and the tokenizer's own EOS, when present."""
    ids = {special_token_ids(tokenizer)["eos"], tokenizer.eos_token_id}
    return tuple(sorted(i for i in ids if i is not None))


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """Ids of the tokens the sampler and reward look for.

    Args:
      tokenizer: a `transformers` tokenizer.

    Returns:
      {"eos", "pad", "think_open", "think_close"} -> id or None when absent. eos is
      `<|im_end|>` (the end of a chat turn) when the vocab has it, else `tokenizer.eos_token_id`;
      pad is `tokenizer.pad_token_id`, falling back to eos.
    """
    vocab = tokenizer.get_vocab()  # includes added tokens
    eos = vocab.get(EOS_TOKEN, tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"eos": eos, "pad": pad, "think_open": vocab.get(THINK_OPEN),
            "think_close": vocab.get(THINK_CLOSE)}
