"""The one-pass LP kernel equals the naive path (one full forward per context)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings, strategies as st

from opera_jax import load_pretrained, make_mesh
from opera_jax.model import Qwen3, Qwen3Config
from opera_jax.reward import Context, RewardConfig, naive_reference_logprobs, reference_logprobs
from opera_jax.reward import kernel as kernel_lib
from opera_jax.sharding import activation_mesh

TOL = 1e-5  # float32


def tiny_model(seed: int = 0, *, scale: float = 4.0, **overrides) -> Qwen3:
    """Random tiny Qwen3 with weights scaled up so contexts change LP by far more than TOL."""
    cfg = Qwen3Config.preset("tiny").replace(**overrides)
    model = Qwen3(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, state)
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@st.composite
def batches(draw, max_samples: int = 4, max_len: int = 160, max_ref: int = 40):
    """Random sequences, references and contexts (cuts anywhere, some with an extra token)."""
    n = draw(st.integers(1, max_samples))
    ids = st.integers(0, 1023)
    sequences, references, contexts = [], [], []
    for _ in range(n):
        length = draw(st.integers(1, max_len))
        sequences.append(draw(st.lists(ids, min_size=length, max_size=length)))
        references.append(draw(st.lists(ids, min_size=1, max_size=max_ref)))
        cuts = draw(st.lists(st.integers(1, length), max_size=8))
        ctx = [Context(length)] + [Context(c) for c in cuts]
        if draw(st.booleans()):
            ctx.insert(1, Context(draw(st.integers(1, length)), draw(ids)))
        contexts.append(ctx)
    return sequences, references, contexts


def configs(min_bucket: int):
    return st.builds(RewardConfig, batch_size=st.sampled_from([1, 3, 8]),
                     contexts_per_step=st.sampled_from([1, 4, 16]),
                     cache_windows=st.sampled_from([1, 3]),
                     prefill_chunk=st.sampled_from([32, 1024]), min_bucket=st.just(min_bucket))


def assert_kernel_equals_naive(model, batch, config):
    got = reference_logprobs(model, *batch, config=config)
    want = naive_reference_logprobs(model, *batch, rows_per_call=4,
                                    min_bucket=2 * config.min_bucket)
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0, atol=TOL)


@settings(max_examples=5, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=batches(), config=configs(min_bucket=160))
def test_kernel_equals_naive(model, batch, config):
    """Fast variant: one length bucket (160), so mostly the kernel's knobs change shapes."""
    assert_kernel_equals_naive(model, batch, config)


@pytest.mark.slow
@settings(max_examples=40, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=batches(max_samples=10, max_len=600, max_ref=130), config=configs(min_bucket=16))
def test_kernel_equals_naive_many(model, batch, config):
    """Many lengths and buckets."""
    assert_kernel_equals_naive(model, batch, config)


def test_kernel_equals_naive_untied_and_temperature():
    model = tiny_model(3, tie_word_embeddings=False)
    rng = np.random.default_rng(3)
    seq = rng.integers(0, 1024, 90).tolist()
    batch = ([seq], [rng.integers(0, 1024, 17).tolist()],
             [[Context(90), Context(5, 1022), Context(30), Context(31), Context(89)]])
    got = reference_logprobs(model, *batch, config=RewardConfig(temperature=0.7))
    want = naive_reference_logprobs(model, *batch, temperature=0.7)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=TOL)
    # LP moves with the cut by far more than the tolerance: the test sees an off-by-one.
    assert np.abs(np.diff(want[0][2:4])).min() > 100 * TOL


def test_second_batch_of_same_buckets_does_not_retrace(model):
    def batch(seed):
        rng = np.random.default_rng(seed)
        lengths = rng.integers(97, 101, 3)  # one length bucket (100)
        seqs = [rng.integers(0, 1024, n).tolist() for n in lengths]
        refs = [rng.integers(0, 1024, rng.integers(20, 30)).tolist() for _ in lengths]
        ctxs = [[Context(int(n))] + [Context(int(c)) for c in rng.integers(1, n, 5)]
                for n in lengths]
        return seqs, refs, ctxs

    config = RewardConfig(contexts_per_step=8)
    first = kernel_lib.TRACE_COUNT["kernel"]
    reference_logprobs(model, *batch(0), config=config)
    before = kernel_lib.TRACE_COUNT["kernel"]
    out = reference_logprobs(model, *batch(1), config=config)
    assert kernel_lib.TRACE_COUNT["kernel"] == before <= first + 1
    assert all(np.isfinite(lp).all() for lp in out)


def test_sharded_kernel_scores_each_response_on_its_own_device(hf_tiny):
    """On a 4-device batch axis the kernel splits its responses into 4 groups, one per device,
    and each step reads only its device's part of the KV cache: LPs equal the single-device
    naive path, and the compiled kernel's temporaries per device are well under those of a
    layout whose contexts may read any response (shards=1, the cache gathered across)."""
    path, _ = hf_tiny
    single, _ = load_pretrained(path)
    mesh = make_mesh(1, 4, 1, devices=jax.devices()[:4])
    sharded, _ = load_pretrained(path, mesh=mesh)
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, 1024, n).tolist() for n in (40, 90, 17, 64, 120, 33)]
    refs = [rng.integers(0, 1024, 9).tolist() for _ in seqs]
    ctxs = [[Context(len(s))] + [Context(int(c)) for c in rng.integers(1, len(s), 4)]
            for s in seqs]
    ctxs[2].insert(1, Context(10, 1000))
    config = RewardConfig(batch_size=8, contexts_per_step=8)
    want = naive_reference_logprobs(single, seqs, refs, ctxs)
    with activation_mesh(mesh):
        got = reference_logprobs(sharded, seqs, refs, ctxs, config=config)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=TOL)

    graphdef, state = nnx.split(sharded)
    temps = {}
    for shards in (1, 4):
        packed, windows, index = kernel_lib.pack_inputs(seqs, refs, ctxs, config, shards=shards)
        assert sorted(index[index >= 0]) == list(range(sum(map(len, ctxs))))
        with activation_mesh(mesh):
            compiled = kernel_lib.lp_kernel.lower(
                graphdef, state, *packed, jnp.float32(1.0), windows=windows,
                logprob_chunk=config.logprob_chunk, shards=shards).compile()
        temps[shards] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[4] < 0.6 * temps[1], temps


def test_pack_inputs_groups_contexts_by_device():
    """8 responses on 4 devices: a step's contexts come 2 per device group (rows 0-1, 2-3, …),
    each group's sorted by visible length; padding reads its own group's first row."""
    seqs = [[1] * (10 + i) for i in range(8)]
    refs = [[2, 3]] * 8
    ctxs = [[Context(5 + i), Context(9 + i)] for i in range(8)]
    ctxs[7] = []  # a response with no context
    packed, _, index = kernel_lib.pack_inputs(seqs, refs, ctxs, RewardConfig(contexts_per_step=8),
                                              shards=4)
    rows, visible = packed[4], packed[5]
    assert rows.shape == (2, 8)
    for step in range(2):
        for j in range(4):
            assert set(rows[step, 2 * j:2 * j + 2]) <= {2 * j, 2 * j + 1}
    # Group 0 (responses 0 and 1: visible 4, 8 and 5, 9) sorted: 4, 5 | 8, 9.
    assert visible[:, 0:2].tolist() == [[4, 5], [8, 9]]
    assert index[:2].tolist() == [0, 2] and index[8:10].tolist() == [1, 3]
    # Group 3 holds response 6's two contexts and response 7's none: one padding slot.
    assert index[6:8].tolist() == [12, 13] and (index[14:16] == -1).all()
    assert (rows[1, 6:8] == 6).all()
