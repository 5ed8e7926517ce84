"""Guiding-word synthesis end to end on a tiny Qwen3 teacher.

A random-weight model rarely writes "Wait", so the teacher here is a random tiny Qwen3 with a
"bias unit": embedding dimension 0 is the same constant for every token, so after the final
norm hidden[0] is nearly constant, and lm_head[0, t] adds a near-constant logit to token t.
Biasing "Wait", "But", ".\\n\\n" and "</think>" makes the teacher reflect every ~10 tokens,
write paragraphs and close its thinking, while everything else stays random.

Perplexities are recomputed independently: a teacher-forced forward pass `model(tokens)` over
context + candidate, log_softmax, exp(−mean).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opera_jax import Qwen3Config, init_model
from opera_jax.data import toy_domain
from opera_jax.data.jsonl import BadRowError
from opera_jax.sampling import FinishReason
from opera_jax.cli import load_config_file
from opera_jax.config.runs import parse
from opera_jax.sampling import Sampler
from opera_jax.synth import Phase, read_records, stop_strings, synthesize
from opera_jax.tokenizer import encode, load_tokenizer

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs",
                      "synth_tiny.py")
WORDS = ("Wait", "But")


def biased_teacher(tok, bias: dict[str, float], *, seed: int = 0):
    """A random tiny Qwen3 (float32, untied) whose logits favour the tokens of `bias`."""
    cfg = Qwen3Config.preset("tiny").replace(tie_word_embeddings=False)
    model = init_model(cfg, seed=seed)
    model.embed_tokens[...] = model.embed_tokens[...].at[:, 0].set(0.5)
    probe = jnp.asarray([encode(tok, "Write a short story about a red fox. Wait, the")])
    h0 = float(model(probe, return_hidden=True)[0, :, 0].mean())
    head = model.lm_head[...].at[0, :].set(0.0)
    for text, b in bias.items():
        (token,) = encode(tok, text)
        head = head.at[0, token].set(b / h0)
    model.lm_head[...] = head
    return model


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def teacher(tok):
    return biased_teacher(tok, {"Wait": 0.5, "But": 0.5, ".\n\n": 0.8, "</think>": 0.3,
                                "<|im_end|>": 0.2})


def make_config(tmp_path, name, **synth):
    c = load_config_file(CONFIG)
    c.workdir = str(tmp_path / name)
    c.data.path = str(tmp_path / "prompts.jsonl")
    c.synth.progress = False
    c.synth.guiding_words = WORDS
    c.synth.num_candidates = 3
    c.synth.max_states = 4
    c.synth.max_phase_tokens = 24
    c.synth.max_candidate_tokens = 24
    c.synth.max_thinking_tokens = 120
    c.synth.max_answer_tokens = 24
    c.synth.batch_prompts = 4
    for k, v in synth.items():
        c.synth[k] = v
    return c


def out(c):
    """The records file of a synthesis config."""
    return os.path.join(c.workdir, "records.jsonl")


def write_prompts(path, rows, bad=()):
    """rows as JSONL with the (1-based line, text) entries of `bad` inserted."""
    lines = [json.dumps(r) for r in rows]
    for line, text in sorted(bad):
        lines.insert(line - 1, text)
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")


@pytest.fixture(scope="module")
def main_run(tmp_path_factory, tok, teacher):
    """One run over 6 toy prompts plus two malformed rows (lines 2 and 5); all events kept."""
    tmp = tmp_path_factory.mktemp("synth_main")
    write_prompts(tmp / "prompts.jsonl", toy_domain.prompt_rows(6, seed=3),
                  bad=[(2, '{"id": "x", "prompt": '), (5, json.dumps({"id": "y", "prompt": "p"}))])
    config = make_config(tmp, "main")
    events = []
    summary = synthesize(parse(config), teacher=(teacher, tok), on_event=events.append)
    return config, summary, events, read_records(out(config))


def test_row_seeds_make_a_row_independent_of_its_batch(tok, teacher):
    """The sampler extension synthesis relies on: a row's draws follow its own seed."""
    sampler = Sampler.for_tokenizer(teacher, tok)
    a, b = encode(tok, "Write a poem."), encode(tok, "Hmm, a much longer prompt about a fox.")
    kw = dict(max_new_tokens=16, temperature=1.0, seed=3)
    alone = sampler.sample([a], row_seeds=[77], **kw)
    mixed = sampler.sample([b, a], n=2, row_seeds=[5, 6, 77, 8], **kw)
    np.testing.assert_array_equal(mixed.row(2)[0], alone.row(0)[0])
    np.testing.assert_allclose(mixed.row(2)[1], alone.row(0)[1], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(mixed.row(3)[0], alone.row(0)[0])  # another seed, another draw
    with pytest.raises(ValueError, match="row_seeds needs 4 ints"):
        sampler.sample([b, a], n=2, row_seeds=[1, 2, 3], **kw)


def test_records_and_summary(main_run):
    config, summary, events, records = main_run
    assert sorted(r["id"] for r in records) == sorted(f"train-3-{i}" for i in range(6))
    assert summary["written"] == 6 and summary["skipped_rows"] == 2
    assert summary["mean_reflections"] == pytest.approx(
        np.mean([r["reflection_count"] for r in records]))
    assert summary["mean_reflections"] > 1  # the biased teacher does reflect
    for r in records:
        assert r["reflection_count"] == len(r["chosen_ppl"]) == len(r["rejected_ppls"])
        assert all(len(x) == 2 for x in r["rejected_ppls"])  # B - 1
        assert r["teacher"] == "preset:tiny@0" and r["config_hash"] == summary["config_hash"]
        assert r["think_end"] in ("close", "eos", "budget")
    assert os.path.exists(out(config) + ".summary.json")


def test_reflective_states_stop_at_guiding_words(main_run, tok):
    _, _, events, _ = main_run
    guided = stop_strings(WORDS)
    reflect = [e for e in events if e.phase is Phase.REFLECT]
    assert len(reflect) >= 5
    for e in reflect:  # every reflective state's context ends with a guiding word
        assert tok.decode(e.context).endswith(WORDS)
    for e in events:
        if e.phase not in (Phase.THINK, Phase.REFLECT):
            continue
        for c in e.completions:
            body = c.text[:c.stop_offset] if c.stop is not None else c.text
            assert not any(w in body for w in WORDS), body  # stopped at the FIRST one
            if c.finish_reason is FinishReason.STOP:
                assert c.stop in guided and c.text.endswith(c.stop)
                if c.stop in WORDS:  # the bare word only when no separator preceded it
                    assert not body.endswith(("\n", ". "))
    # Each THINK that ended at a guiding word led to a REFLECT of the same prompt.
    stops = [e for e in events if e.phase is Phase.THINK
             and e.completions[0].stop in guided and e.completions[0].stop != "</think>"]
    assert stops and len(stops) <= len(reflect)


def test_chosen_candidate_has_the_lowest_perplexity(main_run, teacher):
    _, _, events, records = main_run
    reflect = [e for e in events if e.phase is Phase.REFLECT]
    # Every candidate as context + candidate tokens, right-padded (causal: padding after a
    # sequence does not change its log-probs), in one teacher-forced forward pass.
    seqs = [e.context + c.token_ids for e in reflect for c in e.completions]
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, x in enumerate(seqs):
        tokens[i, :len(x)] = x
    graphdef, state = nnx.split(teacher)
    logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, jnp.asarray(tokens))
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    lp = np.asarray(jnp.take_along_axis(lp, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0])
    ppl = iter([float(np.exp(-lp[i, :len(x) - 1].mean())) for i, x in enumerate(seqs)])

    by_id = {r["id"]: r for r in records}
    seen = {}
    for e in reflect:
        ppls = [next(ppl) for _ in e.completions]
        np.testing.assert_allclose(e.ppls, ppls, rtol=2e-4)
        assert e.chosen == int(np.argmin(ppls))
        r = by_id[e.job_id]
        assert r["chosen_ppl"][e.state] == pytest.approx(min(ppls), rel=2e-4)
        assert r["rejected_ppls"][e.state] == pytest.approx(
            [p for i, p in enumerate(ppls) if i != e.chosen], rel=2e-4)
        seen[e.job_id] = seen.get(e.job_id, 0) + 1
    assert seen == {i: r["reflection_count"] for i, r in by_id.items() if r["reflection_count"]}


def test_state_cap_holds_then_the_teacher_finishes(tmp_path, tok):
    # A teacher that nearly always writes "Wait": every candidate ends at the next one.
    always = biased_teacher(tok, {"Wait": 3.0, "</think>": 1.5}, seed=1)
    write_prompts(tmp_path / "prompts.jsonl", toy_domain.prompt_rows(3, seed=5))
    config = make_config(tmp_path, "cap", max_states=2, max_thinking_tokens=48)
    events = []
    synthesize(parse(config), teacher=(always, tok), on_event=events.append)
    records = read_records(out(config))
    assert [r["reflection_count"] for r in records] == [2, 2, 2]
    for r in records:
        mine = [e for e in events if e.job_id == r["id"]]
        assert sum(e.phase is Phase.REFLECT for e in mine) == 2
        finish = [e for e in mine if e.phase is Phase.FINISH]
        assert finish  # after the cap the teacher goes on to </think> ...
        text = "".join(e.completions[0].text for e in finish)
        assert "Wait" in text  # ... through guiding words, which no longer stop it
        assert all(e.completions[0].stop in (None, "</think>") for e in finish)


@pytest.mark.slow  # the default suite stays under ~10 min on 2 cores
def test_resumed_run_equals_uninterrupted_run(tmp_path, tok, teacher):
    write_prompts(tmp_path / "prompts.jsonl", toy_domain.prompt_rows(5, seed=7))
    # Uninterrupted, and as published: one prompt, one candidate at a time.
    full = make_config(tmp_path, "full", batch_prompts=1, batch_candidates=False)
    synthesize(parse(full), teacher=(teacher, tok))
    # Batched, killed after 2 records mid-write, resumed with another batch size.
    part = make_config(tmp_path, "part", batch_prompts=3)
    summary = synthesize(parse(part), teacher=(teacher, tok), stop_after=2)
    assert summary["written"] == 2
    with open(out(part), "a", encoding="utf-8") as f:
        f.write('{"id": "train-7-4", "prompt": "Wri')
    part.synth.batch_prompts = 2
    part.synth.rows_per_call = 4  # chunked calls: still the same records
    summary = synthesize(parse(part), teacher=(teacher, tok))
    assert (summary["already_done"], summary["written"]) == (2, 3)

    want = {r["id"]: r for r in read_records(out(full))}
    got = read_records(out(part))
    assert len(got) == len({r["id"] for r in got}) == 5  # no duplicates
    assert any(r["reflection_count"] for r in got)
    for r in got:
        w = want[r["id"]]
        for key in ("chosen_ppl", "rejected_ppls"):
            np.testing.assert_allclose(np.asarray(r.pop(key), float).ravel(),
                                       np.asarray(w.pop(key), float).ravel(), rtol=1e-5)
        assert r == w


def test_malformed_rows_name_the_line(tmp_path, tok, teacher, main_run, caplog):
    _, _, _, _ = main_run  # its input has bad rows at lines 2 and 5 (skipped, counted)
    rows = toy_domain.prompt_rows(2, seed=3)
    write_prompts(tmp_path / "prompts.jsonl", rows, bad=[(2, '{"id": "x"}')])
    config = make_config(tmp_path, "bad")
    config.data.on_bad_row = "raise"
    with pytest.raises(BadRowError, match=r"prompts.jsonl:2: missing field 'prompt'"):
        synthesize(parse(config), teacher=(teacher, tok))
    config.data.on_bad_row = "skip"
    with caplog.at_level(logging.WARNING):
        summary = synthesize(parse(config), teacher=(teacher, tok), stop_after=1)
    assert "prompts.jsonl:2: missing field 'prompt'; skipping the row" in caplog.text
    assert summary["skipped_rows"] == 1 and summary["written"] == 1


@pytest.mark.slow
def test_cli_runs_and_rejects_unknown_keys(tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "opera_jax.train", f"--config={CONFIG}",
            f"--config.workdir={tmp_path / 'out'}", "--config.data.path=toy:prompts:3",
            "--config.synth.progress=False",
            "--config.synth.max_thinking_tokens=32", "--config.synth.max_answer_tokens=16"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "out" / "records.jsonl.summary.json") as f:
        assert json.loads(f.read())["written"] == 3
    assert len(read_records(tmp_path / "out" / "records.jsonl")) == 3
    bad = subprocess.run(args + ["--config.synth.num_candidatez=2"], capture_output=True,
                         text=True, timeout=600)
    assert bad.returncode == 2 and "unknown config key 'synth.num_candidatez'" in bad.stderr


@pytest.mark.slow
def test_sharded_teacher_gives_the_same_records(tmp_path, tok, teacher):
    write_prompts(tmp_path / "prompts.jsonl", toy_domain.prompt_rows(3, seed=9))
    one = make_config(tmp_path, "one")
    synthesize(parse(one), teacher=(teacher, tok))
    mesh = make_config(tmp_path, "mesh")
    mesh.mesh.num_devices, mesh.mesh.data, mesh.mesh.fsdp, mesh.mesh.tensor = None, 2, 2, 2
    synthesize(parse(mesh), teacher=(teacher, tok))
    want, got = read_records(out(one)), read_records(out(mesh))
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for r, w in zip(got, want):
        assert (r["thinking"], r["output"]) == (w["thinking"], w["output"])
        np.testing.assert_allclose(r["chosen_ppl"], w["chosen_ppl"], rtol=1e-4)
