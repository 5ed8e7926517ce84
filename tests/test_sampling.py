"""The sampler end to end on a random-weight tiny Qwen3 loaded from a HF checkpoint:
greedy parity with `transformers.generate`, log-probs against a teacher-forced forward pass,
stop strings and EOS, no retracing, and seeds on 1 and 8 (fake) devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import opera_jax
from opera_jax.sampling import (TRACE_COUNT, FinishReason, Sampler, generate, loop,
                                token_bytes)
from opera_jax.sharding import make_mesh
from opera_jax.tokenizer import encode

PROMPT_TEXTS = ["Hello there, how are you", "The",
                "Once upon a time in a land far away, the king said", "x = 1 +"]


@pytest.fixture(scope="module")
def loaded(hf_tiny):
    path, hf = hf_tiny
    model, tok = opera_jax.load_pretrained(path)
    return model, tok, hf


@pytest.fixture(scope="module")
def sampler(loaded):
    model, tok, _ = loaded
    return Sampler(model, token_pieces=token_bytes(tok), pad_id=tok.pad_token_id)


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, size=n).tolist() for n in lengths]


def test_greedy_matches_transformers_generate(loaded, sampler):
    model, tok, hf = loaded
    prompts = [encode(tok, p) for p in PROMPT_TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    out = sampler.sample(prompts, max_new_tokens=48, temperature=0.0)

    width = max(map(len, prompts))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                          pad_token_id=pad)[:, width:].numpy()
    assert ref.shape == (4, 48)
    np.testing.assert_array_equal(out.lengths, [48] * 4)
    np.testing.assert_array_equal(out.tokens[:, :48], ref)
    assert (out.finish_reason == FinishReason.LENGTH).all()
    # Same through the text API.
    comps = generate(model, tok, PROMPT_TEXTS, max_new_tokens=48, temperature=0.0, eos_ids=(),
                     prompt_logprobs=True)
    assert [c.text for c in comps] == [tok.decode(r) for r in ref]
    assert [c.token_ids for c in comps] == ref.tolist()
    with torch.no_grad():  # prompt log-probs against HF's forward over the unpadded prompt
        for c, p in zip(comps, prompts):
            lp = hf(torch.tensor([p])).logits[0, :-1].double().log_softmax(-1)
            want = lp.gather(-1, torch.tensor(p[1:])[:, None])[:, 0].numpy()
            np.testing.assert_allclose(c.prompt_logprobs, want, atol=1e-4)


def test_logprobs_equal_teacher_forced_forward(loaded, sampler):
    model, tok, _ = loaded
    prompts = random_prompts([4, 13, 9], seed=1)
    out = sampler.sample(prompts, max_new_tokens=[24, 20, 31], temperature=[0.9, 1.3, 0.6],
                         top_k=[40, 0, 0], top_p=[0.95, 1.0, 0.8], n=2, seed=7,
                         prompt_logprobs=True)
    assert out.tokens.shape[0] == 6
    # Teacher forcing: prompt + output, right-padded into one batch (segment 0 on the pads).
    seqs = [prompts[r // 2] + out.row(r)[0].tolist() for r in range(6)]
    width = max(map(len, seqs))
    batch = np.zeros((6, width), np.int32)
    segments = np.zeros((6, width), np.int32)
    for r, seq in enumerate(seqs):
        batch[r, :len(seq)], segments[r, :len(seq)] = seq, 1
    logits = np.asarray(model(jnp.asarray(batch), segment_ids=jnp.asarray(segments)),
                        np.float64)  # [6, T, V]
    for r in range(6):
        prompt = prompts[r // 2]
        toks, lps = out.row(r)
        assert len(toks) == [24, 20, 31][r // 2]
        pos = np.arange(len(prompt) - 1, len(seqs[r]) - 1)
        x = logits[r, pos]
        logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        np.testing.assert_allclose(lps, x[np.arange(len(pos)), toks] - logz, atol=1e-4, rtol=0)
        # The prompt's own tokens, from the prefill.
        x = logits[r, :len(prompt) - 1]
        logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        np.testing.assert_allclose(out.prompt_logprobs[r // 2],
                                   x[np.arange(len(prompt) - 1), prompt[1:]] - logz, atol=1e-4)
        assert (out.logprobs[r, len(toks):] == 0).all()
    # The two samples of a prompt differ (independent streams), the prompts' lengths differ.
    assert not np.array_equal(out.row(0)[0], out.row(1)[0])


def first_stop(pieces, tokens, stop_list):
    """Plain-Python reference: (token index completing the first stop, stop index, start byte,
    end byte), earliest end first, then longest; None if no stop occurs."""
    text = b""
    for t, tok in enumerate(tokens):
        prev, text = len(text), text + pieces[tok]
        found = []
        for i, s in enumerate(stop_list):
            s = s.encode()
            pos = text.find(s, max(0, prev - len(s) + 1))
            if pos != -1:
                found.append((pos + len(s), i, pos))
        if found:
            end, pos, i = min((e, p, i) for e, i, p in found)
            return t, i, pos, end
    return None


def test_stop_strings(loaded, sampler):
    model, tok, _ = loaded
    pieces = sampler.table.pieces
    prompts = [encode(tok, p) for p in PROMPT_TEXTS]
    full = sampler.sample(prompts, max_new_tokens=40, temperature=0.0)
    gens = [full.row(r)[0].tolist() for r in range(len(prompts))]

    # Row 0: a stop across a token boundary (2 bytes of one token + 2 of the next).
    g0 = gens[0]
    j = next(j for j in range(3, 40) if len(pieces[g0[j - 1]]) >= 2 and len(pieces[g0[j]]) >= 2
             and (pieces[g0[j - 1]] + pieces[g0[j]]).isascii())
    split_stop = (pieces[g0[j - 1]][-2:] + pieces[g0[j]][:2]).decode()
    # Row 1: a stop starting inside a token, so the tokens carrying it depend on the text before.
    g1 = gens[1]
    k = next(k for k in range(3, 40) if len(pieces[g1[k]]) >= 3 and pieces[g1[k]].isascii())
    mid_stop = pieces[g1[k]][1:].decode()
    assert encode(tok, mid_stop) != [g1[k]]
    stop_list = ["\x00never", split_stop, mid_stop]

    out = sampler.sample(prompts, max_new_tokens=40, temperature=0.0, stop=stop_list)
    expected = [first_stop(pieces, g, stop_list) for g in gens]
    assert expected[0] is not None and expected[1] is not None
    for r, exp in enumerate(expected):
        toks, _ = out.row(r)
        if exp is None:
            assert out.finish_reason[r] == FinishReason.LENGTH and len(toks) == 40
            assert out.stop_index[r] == -1
            continue
        t, idx, start, end = exp
        assert out.finish_reason[r] == FinishReason.STOP
        np.testing.assert_array_equal(toks, gens[r][:t + 1])  # nothing after the stop
        assert (out.stop_index[r], out.stop_start[r], out.stop_end[r]) == (idx, start, end)
    assert len(set(out.lengths.tolist())) > 1  # rows finished independently
    # Row 0's stop really straddles two tokens.
    t0, _, start0, _ = expected[0]
    assert start0 < len(b"".join(pieces[x] for x in gens[0][:t0]))

    # The text API: text ends exactly at the stop string, stop_offset is where it starts.
    comps = generate(model, tok, PROMPT_TEXTS, max_new_tokens=40, temperature=0.0,
                     stop=stop_list, eos_ids=())
    for r, (c, exp) in enumerate(zip(comps, expected)):
        full_text = b"".join(pieces[x] for x in gens[r]).decode("utf-8", "replace")
        assert c.token_ids == out.row(r)[0].tolist()
        if exp is None:
            assert c.finish_reason is FinishReason.LENGTH and c.stop is None
            continue
        stop = stop_list[exp[1]]
        assert c.finish_reason is FinishReason.STOP and c.stop == stop
        assert c.text.endswith(stop) and c.text[c.stop_offset:] == stop
        assert full_text.startswith(c.text) and full_text.find(stop) + len(stop) == len(c.text)


def test_eos_finishes_rows_independently(loaded):
    model, tok, _ = loaded
    plain = Sampler(model, pad_id=tok.pad_token_id)
    prompts = [encode(tok, p) for p in PROMPT_TEXTS]
    full = plain.sample(prompts, max_new_tokens=30, temperature=0.0)
    eos = int(full.row(0)[0][7])
    with_eos = Sampler(model, eos_ids=[eos], pad_id=tok.pad_token_id)
    out = with_eos.sample(prompts, max_new_tokens=30, temperature=0.0)
    for r in range(len(prompts)):
        gen = full.row(r)[0].tolist()
        n = gen.index(eos) + 1 if eos in gen else 30
        assert out.lengths[r] == n
        np.testing.assert_array_equal(out.row(r)[0], gen[:n])
        assert out.finish_reason[r] == (FinishReason.EOS if eos in gen else FinishReason.LENGTH)
        assert (out.tokens[r, n:] == tok.pad_token_id).all()
    assert out.lengths[0] <= 8 and out.finish_reason[0] == FinishReason.EOS


def test_no_retrace_for_new_lengths_temperatures_and_max_new(sampler):
    # Top-k values within one width bucket (filters.TOPK_WIDTHS: 1..8 here) share a program.
    sampler.sample(random_prompts([6, 9]), max_new_tokens=10, temperature=0.7, top_k=8)
    before = dict(TRACE_COUNT)
    assert before["prefill"] >= 1 and before["decode"] >= 1
    for i, (lengths, temp, max_new, k, p) in enumerate([
            ([3, 16], 0.0, 5, 5, 1.0), ([12, 1], 1.3, 16, 7, 0.9), ([7, 7], 0.2, 11, 1, 0.5)]):
        out = sampler.sample(random_prompts(lengths, seed=i), max_new_tokens=max_new,
                             temperature=temp, top_k=k, top_p=p, seed=i)
        assert out.lengths.tolist() == [max_new] * 2
    assert dict(TRACE_COUNT) == before


@pytest.mark.parametrize("devices", [1, 8])
def test_same_seed_same_samples(loaded, devices):
    model, tok, _ = loaded
    mesh = make_mesh(data=2, fsdp=2, tensor=2) if devices == 8 else None
    s = Sampler(model, token_pieces=token_bytes(tok), pad_id=tok.pad_token_id, mesh=mesh)
    prompts = random_prompts([5, 12, 8, 3], seed=3)
    kw = dict(max_new_tokens=20, temperature=1.0, top_p=0.9, n=2, stop=["ab"])
    a, b = s.sample(prompts, seed=11, **kw), s.sample(prompts, seed=11, **kw)
    c = s.sample(prompts, seed=12, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)
    # And the same samples as on one device (row streams depend on seed and row only).
    ref = Sampler(model, token_pieces=s.table.pieces, pad_id=tok.pad_token_id).sample(
        prompts, seed=11, **kw)
    np.testing.assert_array_equal(a.tokens, ref.tokens)
    np.testing.assert_allclose(a.logprobs, ref.logprobs, atol=1e-5)


def test_cache_is_sharded_on_the_mesh(loaded):
    model, tok, _ = loaded
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    s = Sampler(model, pad_id=tok.pad_token_id, mesh=mesh)
    config = loop.CacheConfig(num_samples=2, capacity=16, mesh=mesh)
    tokens = s._put(np.ones((4, 16), np.int32), ("batch", None))
    cache, logits, _ = loop.prefill(s.graphdef, s.params, tokens,
                                 s._put(np.full((4,), 16, np.int32), ("batch",)), config=config)
    assert len(cache.k) == 2 and cache.k[0].shape == (8, 2, 32, 32)
    assert logits.shape == (8, 1024)
    spec = cache.k[0].sharding.spec  # [B, K, S, H]
    assert spec[0] == ("data", "fsdp") and spec[1] == "tensor"
    assert len(cache.k[0].addressable_shards) == 8
    assert cache.k[0].addressable_shards[0].data.shape == (2, 1, 32, 32)


def test_set_params_samples_from_new_weights(loaded, sampler):
    model, tok, _ = loaded
    other = opera_jax.init_model(model.config, seed=5)
    prompts = random_prompts([4, 9], seed=4)
    want = Sampler(other, pad_id=tok.pad_token_id).sample(prompts, max_new_tokens=12,
                                                          temperature=0.0)
    s = Sampler(model, pad_id=tok.pad_token_id)
    before = s.sample(prompts, max_new_tokens=12, temperature=0.0)
    s.set_params(nnx.state(other))
    after = s.sample(prompts, max_new_tokens=12, temperature=0.0)
    np.testing.assert_array_equal(after.tokens, want.tokens)
    assert not np.array_equal(before.tokens, want.tokens)


@pytest.mark.parametrize("devices", [pytest.param(1, marks=pytest.mark.slow), 8])
def test_compaction_gives_the_same_samples(loaded, devices, monkeypatch):
    # Rows finish between step 1 and 40 (per-prompt caps and stop strings): with `compact`
    # the loop pauses when half have finished and goes on with the rest in a narrower batch.
    # Matmuls over 64 or 16 rows may round the last bit differently, and the random model's
    # logits lie within ~0.1 of each other, so such a bit could reorder two top-k candidates.
    # Scaling the tied embedding (x4: logits x16) spreads them; equal tokens are then a fair
    # check of the bookkeeping (row ids, steps, stop bytes, cache rows).
    model, tok, _ = loaded
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x, params)
    params["embed_tokens"].set_value(params["embed_tokens"].get_value() * 4.0)
    model = nnx.merge(graphdef, params)
    mesh = make_mesh(data=2, fsdp=2, tensor=2) if devices == 8 else None
    s = Sampler(model, token_pieces=token_bytes(tok), pad_id=tok.pad_token_id, mesh=mesh)
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng.integers(1, 30, size=24).tolist(), seed=5)
    kw = dict(max_new_tokens=rng.integers(1, 41, size=24), temperature=0.9, top_k=20,
              top_p=0.95, n=2, stop=["e", "ab"], seed=4, prompt_logprobs=True)
    widths = []
    take_rows = loop.take_rows

    def spy(state, rows, index, **k):
        widths.append(len(index))
        return take_rows(state, rows, index, **k)

    monkeypatch.setattr(loop, "take_rows", spy)
    ref = s.sample(prompts, **kw)
    assert widths == []
    got = s.sample(prompts, compact=True, **kw)
    assert widths and widths[0] <= 32 and min(widths) >= 8  # 64 rows -> <= 32 -> ... -> 8
    assert len(set(ref.lengths.tolist())) > 10
    assert (ref.logprobs[:, 0] < -0.5).mean() > 0.25  # still really sampling
    for field in ("tokens", "lengths", "finish_reason", "stop_index", "stop_start",
                  "stop_end"):
        np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
    np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
    for a, b in zip(got.prompt_logprobs, ref.prompt_logprobs):
        np.testing.assert_array_equal(a, b)
