"""The continuous-batching engine (`Sampler.sample(slots=...)`) end to end on a random-weight
tiny Qwen3 loaded from a HF checkpoint: more rows than slots give transformers' greedy tokens of
each prompt alone and teacher-forced log-probs; sampled rows do not depend on the slots or on
the fixed-batch sampler; pages all come back; refills never retrace; prefix-cache hits and
preemption change nothing but the work done."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import opera_jax
from opera_jax.sampling import TRACE_COUNT, FinishReason, Sampler, generate, token_bytes
from opera_jax.sharding import make_mesh
from opera_jax.tokenizer import encode

KV = 4 << 20  # 4 MiB pool: 256 pages of 16 tiny-model tokens (1 KiB each)


@pytest.fixture(scope="module")
def loaded(hf_tiny):
    path, hf = hf_tiny
    model, tok = opera_jax.load_pretrained(path)
    return model, tok, hf


@pytest.fixture(scope="module")
def spread(loaded):
    """The model with its tied embedding x4 (logits x16): sampled tokens then never hinge on
    the last bit of a float (see test_sampling.py's compaction test)."""
    model, tok, _ = loaded
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x, params)
    params["embed_tokens"].set_value(params["embed_tokens"].get_value() * 4.0)
    return nnx.merge(graphdef, params)


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, size=n).tolist() for n in lengths]


def hf_logprobs(hf, seq, start):
    """float64 log p(seq[t] | seq[:t]) for t >= start, from one HF forward pass."""
    with torch.no_grad():
        lp = hf(torch.tensor([seq])).logits[0].double().log_softmax(-1)
    return lp[start - 1:-1].gather(-1, torch.tensor(seq[start:])[:, None])[:, 0].numpy()


def test_greedy_queued_rows_match_transformers_alone(loaded):
    model, tok, hf = loaded
    s = Sampler(model, token_pieces=token_bytes(tok), pad_id=tok.pad_token_id, kv_memory=KV)
    # Shorter than a page, exactly one, several with a partly filled last page.
    prompts = random_prompts([3, 16, 21, 40, 7, 33], seed=2)
    max_new = [20, 9, 24, 12, 5, 17]
    out = s.sample(prompts, max_new_tokens=max_new, temperature=0.0, n=2, slots=3,
                   prompt_logprobs=True)
    stats = s.engine.last_stats
    assert stats.rows == 12 and stats.slots == 3
    assert stats.generated_tokens == 2 * sum(max_new) == stats.busy_slot_steps
    assert stats.decode_steps <= stats.ideal_steps * 1.25 + max(max_new)
    assert stats.prefill_tokens == sum(map(len, prompts))  # once per prompt, not per row
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                              dtype=torch.long), max_new_tokens=max_new[i], do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        assert len(ref) == max_new[i]  # no EOS on the way
        want_lp = hf_logprobs(hf, prompt + ref, len(prompt))
        for r in (2 * i, 2 * i + 1):
            toks, lps = out.row(r)
            assert toks.tolist() == ref and out.finish_reason[r] == FinishReason.LENGTH
            np.testing.assert_allclose(lps, want_lp, atol=1e-4, rtol=0)
            assert (out.tokens[r, max_new[i]:] == tok.pad_token_id).all()
        np.testing.assert_allclose(out.prompt_logprobs[i], hf_logprobs(hf, prompt, 1),
                                   atol=1e-4, rtol=0)
    # The text API, same engine path.
    texts = [tok.decode(p) for p in prompts]
    ids = [encode(tok, t) for t in texts]
    assert 32 < max(map(len, ids)) <= 64
    comps = generate(model, tok, texts, max_new_tokens=max_new, temperature=0.0, n=2,
                     eos_ids=(), slots=3)
    want = s.sample(ids, max_new_tokens=max_new, temperature=0.0, n=2, slots=3)
    assert [c.token_ids for c in comps] == [want.row(r)[0].tolist() for r in range(12)]


def test_sampled_rows_do_not_depend_on_slots(spread, loaded):
    _, tok, _ = loaded
    rng = np.random.default_rng(5)
    prompts = random_prompts(rng.integers(1, 40, size=10).tolist(), seed=5)
    max_new = rng.integers(1, 41, size=20)  # one per row
    max_new[7] = 0
    kw = dict(max_new_tokens=max_new, temperature=0.9, top_k=20, top_p=0.95, n=2,
              stop=["e", "ab"], seed=4, row_seeds=rng.permutation(1000)[:20],
              prompt_logprobs=True)
    pieces = token_bytes(tok)
    # EOS: a token the rows often sample.
    plain = Sampler(spread, token_pieces=pieces, pad_id=tok.pad_token_id).sample(prompts, **kw)
    eos = int(np.bincount(plain.tokens[plain.tokens != tok.pad_token_id]).argmax())
    s = Sampler(spread, token_pieces=pieces, eos_ids=[eos], pad_id=tok.pad_token_id,
                kv_memory=KV)
    ref = s.sample(prompts, **kw)  # the fixed-batch sampler
    assert len(set(ref.lengths.tolist())) > 8
    assert {FinishReason.STOP, FinishReason.EOS, FinishReason.LENGTH} <= set(
        ref.finish_reason.tolist())
    assert ref.lengths[7] == 0 and ref.finish_reason[7] == FinishReason.LENGTH
    assert (ref.logprobs[:, 0] < -0.5).mean() > 0.25  # really sampling
    for slots in (3, 8):
        got = s.sample(prompts, slots=slots, **kw)
        for field in ("tokens", "lengths", "finish_reason", "stop_index", "stop_start",
                      "stop_end"):
            np.testing.assert_array_equal(getattr(got, field), getattr(ref, field),
                                          err_msg=f"{field}, slots={slots}")
        np.testing.assert_allclose(got.logprobs, ref.logprobs, atol=1e-5)
        for a, b in zip(got.prompt_logprobs, ref.prompt_logprobs):
            np.testing.assert_allclose(a, b, atol=1e-5)
    # The second engine call found the prompts' full pages in the prefix cache.
    assert s.engine.last_stats.reused_tokens > 0


def test_pages_come_back_and_refills_never_retrace(loaded):
    model, tok, _ = loaded
    s = Sampler(model, pad_id=tok.pad_token_id, kv_memory=KV, prefix_cache=False)
    kw = dict(slots=4, n=2)
    s.sample(random_prompts([9, 30, 17]), max_new_tokens=[12, 30, 3], temperature=0.7,
             top_k=8, seed=0, **kw)
    assert s.engine.pages_in_use() == 0
    before = dict(TRACE_COUNT)
    assert before["engine_prefill"] >= 1 and before["engine_decode"] >= 1
    # Within the buckets: longest prompt in (16, 32] (chunk), max_new in (16, 32] (output
    # columns), top-k <= 8 (its width).
    for i, (lengths, temp, max_new, k, p) in enumerate([
            ([3, 32, 16], 0.0, [5, 20, 31], 5, 1.0), ([12, 1, 25], 1.3, [17, 2, 9], 7, 0.9),
            ([7, 7, 20], 0.2, [31, 31, 31], 1, 0.5)]):
        out = s.sample(random_prompts(lengths, seed=i + 1), max_new_tokens=max_new,
                       temperature=temp, top_k=k, top_p=p, seed=i, **kw)
        assert out.lengths.tolist() == np.repeat(max_new, 2).tolist()
        assert s.engine.last_stats.segments > 1  # rows did wait for slots
        assert s.engine.pages_in_use() == 0
    assert {k: TRACE_COUNT[k] for k in before} == before
    alloc = jax.device_get(s.engine.pool.alloc)
    assert int(alloc.top) == s.engine.num_pages - 1 and not alloc.refs.any()
    assert sorted(alloc.free[:alloc.top].tolist()) == list(range(1, s.engine.num_pages))


def test_long_prompts_prefill_in_chunks_between_decode_steps(loaded):
    model, tok, _ = loaded
    # Chunks of 16 tokens: the 40- and 57-token prompts take 3 and 4 prefill calls, made while
    # the first rows already decode on the 2 slots.
    s = Sampler(model, pad_id=tok.pad_token_id, kv_memory=KV, prefill_chunk=16,
                prefix_cache=False)
    prompts = random_prompts([5, 40, 12, 57, 31], seed=8)
    kw = dict(max_new_tokens=[30, 8, 20, 5, 12], temperature=0.0, prompt_logprobs=True)
    got = s.sample(prompts, slots=2, **kw)
    stats = s.engine.last_stats
    assert stats.prefill_calls >= 4 + 1 and stats.segments > 3
    want = Sampler(model, pad_id=tok.pad_token_id).sample(prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    for a, b in zip(got.prompt_logprobs, want.prompt_logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_prefix_cache_prefills_only_the_new_tokens(loaded):
    model, tok, hf = loaded
    s = Sampler(model, pad_id=tok.pad_token_id, kv_memory=KV)
    context = random_prompts([40], seed=7)[0]
    first = s.sample([context], max_new_tokens=12, temperature=0.0, slots=4,
                     prompt_logprobs=True)
    assert s.engine.last_stats.prefill_tokens == 40 and s.engine.last_stats.reused_tokens == 0
    assert s.engine.pages_in_use() == 2  # the context's full pages stay cached
    # The next phase: the context, the kept text and a few new tokens; 4 candidates.
    longer = context + first.row(0)[0].tolist() + [5, 6, 7, 8, 9]  # 57 tokens
    kw = dict(max_new_tokens=12, temperature=0.6, n=4, seed=3, prompt_logprobs=True)
    got = s.sample([longer], slots=4, **kw)
    stats = s.engine.last_stats
    assert stats.reused_tokens == 32 and stats.prefill_tokens == 57 - 32
    # The candidates share the prompt's pages: 4 prompt pages (3 full, 1 partly filled) and
    # each candidate's copy of the last one plus one new page, not 4 × 5 pages.
    assert stats.peak_pages <= 4 + 4 * 2
    cold = Sampler(model, pad_id=tok.pad_token_id, kv_memory=KV, prefix_cache=False)
    want = cold.sample([longer], slots=4, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    np.testing.assert_allclose(got.prompt_logprobs[0], hf_logprobs(hf, longer, 1), atol=1e-4)
    for r in range(4):
        toks, lps = got.row(r)
        np.testing.assert_allclose(lps, hf_logprobs(hf, longer + toks.tolist(), len(longer)),
                                   atol=1e-4)
    # New weights make the cached pages stale: set_params drops them.
    s.set_params(nnx.state(model))
    assert s.engine.pages_in_use() == 0


@pytest.mark.slow  # the default suite stays under ~10 min on 2 cores
def test_preemption_when_the_pool_runs_out(spread, loaded):
    _, tok, _ = loaded
    prompts = random_prompts([20, 12, 30, 25], seed=9)
    kw = dict(max_new_tokens=40, temperature=1.0, n=2, seed=2, slots=4)
    roomy = Sampler(spread, pad_id=tok.pad_token_id, kv_memory=KV, prefix_cache=False)
    want = roomy.sample(prompts, **kw)
    assert roomy.engine.last_stats.preemptions == 0
    # 15 pages of 16 tokens: four rows of up to 70 tokens (5 pages) cannot all grow.
    tight = Sampler(spread, pad_id=tok.pad_token_id, kv_memory=16 * 16 * 1024,
                    prefix_cache=False)
    got = tight.sample(prompts, **kw)
    assert tight.engine.last_stats.preemptions > 0
    assert tight.engine.last_stats.peak_pages <= 15
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    assert tight.engine.pages_in_use() == 0


@pytest.mark.slow  # ~30 s: compiles the engine for 8 (fake) devices
def test_same_rows_on_a_mesh(loaded):
    model, tok, _ = loaded
    prompts = random_prompts([5, 17, 33, 9], seed=4)
    kw = dict(max_new_tokens=[20, 5, 30, 12], temperature=0.0, n=2, slots=4,
              prompt_logprobs=True)
    want = Sampler(model, pad_id=tok.pad_token_id, kv_memory=KV).sample(prompts, **kw)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    s = Sampler(model, pad_id=tok.pad_token_id, kv_memory=KV, mesh=mesh)
    got = s.sample(prompts, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)
    for a, b in zip(got.prompt_logprobs, want.prompt_logprobs):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len(s.engine.pool.k[0].addressable_shards) == 8  # the pool lives on the mesh
