"""Synthesis pieces without a model: the wrapper and text helpers, the per-prompt state machine
driven by hand-made completions, the resumable record file and the config hash."""

from __future__ import annotations

import json
import math
import os

import pytest

from opera_jax.sampling import Completion, FinishReason
import dataclasses

from opera_jax.config.sections import Model, Synth as Settings
from opera_jax.synth import (Job, Phase, RecordWriter, config_hash, first_paragraph,
                             perplexity, read_records, row_seed, stop_strings, wrap_prompt)
from opera_jax.synth.job import StopSet
from opera_jax.tokenizer import apply_chat_template, load_tokenizer

ROW = {"id": "p1", "prompt": "Write a short poem about a red fox near the river.",
       "reference": "A red fox.", "task_type": "writing"}


def comp(text, reason, *, stop=None, ids=(1, 2), lps=(-1.0, -2.0)):
    """A Completion as the sampler would report it (text ends at the end of the stop)."""
    offset = None if stop is None else len(text) - len(stop)
    return Completion(text=text, token_ids=list(ids), logprobs=list(lps), finish_reason=reason,
                      stop=stop, stop_offset=offset, prompt_index=0, sample_index=0)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def test_wrapper_is_short_and_keeps_the_prompt():
    wrapped = wrap_prompt(ROW["prompt"])
    assert wrapped.endswith("\n\n" + ROW["prompt"])
    instruction = wrapped[:-len(ROW["prompt"])].strip()
    assert instruction.count(". ") + instruction.endswith(".") == 2  # two sentences
    assert "<think>" not in wrapped  # special-token strings would encode as the tokens


def test_stop_strings_cover_separators_and_close():
    assert stop_strings(("Wait", "Let me think")) == (
        "Wait", "\nWait", ". Wait", "Let me think", "\nLet me think", ". Let me think",
        "</think>")


@pytest.mark.parametrize("text, expected", [
    (", the fox is red.\n\nI will write.\n", ", the fox is red.\n\n"),
    (", the fox is red. But", ", the fox is red. But"),
    ("\n\nHmm, so.\n\n\nMore", "\n\nHmm, so.\n\n\n"),
    (", red.\n\nWait", ", red.\n\n"),
    ("   ", "   "),
])
def test_first_paragraph(text, expected):
    assert first_paragraph(text) == expected


def test_perplexity_and_row_seed():
    assert perplexity([-1.0, -3.0], [-2.0]) == pytest.approx(math.exp(2.0))
    seeds = {row_seed(0, "p1", k, j) for k in range(20) for j in range(4)}
    assert len(seeds) == 80 and all(0 <= s < 2**31 for s in seeds)
    assert row_seed(0, "p1", 3, 1) == row_seed(0, "p1", 3, 1) != row_seed(1, "p1", 3, 1)


def test_job_walks_the_phases(tok):
    s = Settings(guiding_words=("Wait",), num_candidates=3, max_states=2,
                 max_thinking_tokens=100)
    job = Job(ROW, tok, s)
    head = apply_chat_template(tok, wrap_prompt(ROW["prompt"])) + "<think>\n"

    # THINK stops at a guiding word: a reflective state, B rows next.
    req = job.request()
    assert (req.phase, req.rows, req.stop_set) == (Phase.THINK, 1, StopSet.GUIDED)
    assert tok.decode(req.context) == head
    job.advance(req, [comp("I see a fox.\n\nWait", FinishReason.STOP, stop="\nWait")])
    assert job.phase is Phase.REFLECT and job.thinking == "I see a fox.\n\nWait"
    req = job.request()
    assert (req.rows, req.seeds) == (3, [row_seed(0, "p1", 1, j) for j in range(3)])
    assert tok.decode(req.context) == head + job.thinking

    # REFLECT keeps the lowest perplexity, cut to its first paragraph.
    ctx = [[-1.0] * 4] * 3
    cands = [comp(", red.\n\nNo.\nWait", FinishReason.STOP, stop="\nWait", lps=(-3.0, -3.0)),
             comp(", the prompt says red.\n\nGood.", FinishReason.LENGTH, lps=(-0.5, -0.5)),
             comp(", blue.</think>", FinishReason.STOP, stop="</think>", lps=(-2.0, -1.0))]
    event = job.advance(req, cands, ctx)
    want = [math.exp(10 / 6), math.exp(5 / 6), math.exp(7 / 6)]
    assert event.ppls == pytest.approx(want) and event.chosen == 1
    assert job.chosen_ppls == pytest.approx([want[1]])
    assert job.rejected_ppls == [pytest.approx([want[0], want[2]])]
    assert job.thinking == "I see a fox.\n\nWait, the prompt says red.\n\n"
    assert job.phase is Phase.THINK

    # A kept candidate that ends at a guiding word within its paragraph: the next state.
    job.advance(job.request(), [comp("Wait", FinishReason.STOP, stop="Wait")])
    req = job.request()
    job.advance(req, [comp(" so. Wait", FinishReason.STOP, stop=". Wait")] * 3, [[0.0]] * 3)
    assert len(job.chosen_ppls) == 2
    assert job.phase is Phase.FINISH  # the cap: finish the thinking, guiding words ignored
    req = job.request()
    assert req.stop_set is StopSet.CLOSE
    job.advance(req, [comp(" fine. Wait, done.\n</think>", FinishReason.STOP, stop="</think>")])
    assert job.phase is Phase.ANSWER and job.think_end == "close"

    # The answer sees the unwrapped prompt and the thinking.
    req = job.request()
    assert req.stop_set is StopSet.NONE and req.max_new_tokens == s.max_answer_tokens
    thinking = ("I see a fox.\n\nWait, the prompt says red.\n\nWait so. Wait fine. Wait, "
                "done.")
    assert tok.decode(req.context) == (apply_chat_template(tok, ROW["prompt"])
                                       + f"<think>\n{thinking}\n</think>\n\n")
    published = Job(ROW, tok, Settings(after_think="\n"))
    published.thinking = thinking
    assert tok.decode(published.answer_context()).endswith(f"{thinking}\n</think>\n")
    job.advance(req, [comp("\n\nA red fox.", FinishReason.EOS)])
    rec = job.record()
    assert job.done and rec["thinking"] == thinking and rec["output"] == "A red fox."
    assert rec["reflection_count"] == 2 and rec["answer_finish"] == "eos"


def test_thinking_budget_ends_the_thinking(tok):
    job = Job(ROW, tok, Settings(max_phase_tokens=8, max_thinking_tokens=10))
    req = job.request()
    assert req.max_new_tokens == 8
    job.advance(req, [comp("a b c", FinishReason.LENGTH, ids=range(8), lps=[0.0] * 8)])
    req = job.request()
    assert job.phase is Phase.THINK and req.max_new_tokens == 2  # what the budget leaves
    job.advance(req, [comp(" d", FinishReason.LENGTH, ids=range(2), lps=[0.0] * 2)])
    assert job.phase is Phase.ANSWER and job.think_end == "budget"


def test_record_file_resumes_after_a_partial_line(tmp_path):
    path = tmp_path / "out" / "synth.jsonl"
    with RecordWriter(path) as w:
        assert w.done_ids == set()
        w.write({"id": "a", "x": 1})
        w.write({"id": "b", "x": 2})
        with pytest.raises(ValueError, match="already"):
            w.write({"id": "a", "x": 3})
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": "c", "x"')  # killed mid-write
    assert [r["id"] for r in read_records(path)] == ["a", "b"]
    with RecordWriter(path) as w:
        assert w.done_ids == {"a", "b"}
        w.write({"id": "c", "x": 4})
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]

    # A complete last record without its newline is kept and gets one.
    path.write_text(path.read_text().rstrip("\n"))
    with RecordWriter(path) as w:
        assert w.done_ids == {"a", "b", "c"}
        w.write({"id": "d"})
    assert [r["id"] for r in read_records(path)] == ["a", "b", "c", "d"]

    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"synth.jsonl:2: not a JSON record"):
        RecordWriter(path)


def test_config_hash_ignores_batching_only():
    teacher, base = Model(), Settings()
    h = config_hash(teacher, base)
    for key, value in [("batch_prompts", 1), ("batch_candidates", False), ("rows_per_call", 7),
                       ("compact", False), ("progress", False)]:
        assert config_hash(teacher, dataclasses.replace(base, **{key: value})) == h, key
    assert config_hash(dataclasses.replace(teacher, attention_impl="xla"), base) == h
    assert config_hash(teacher, dataclasses.replace(base, temperature=0.7)) != h
    assert config_hash(dataclasses.replace(teacher, hf_dir="/ckpt/other"), base) != h
