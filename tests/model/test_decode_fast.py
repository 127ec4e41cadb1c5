"""The fast decode loop (static KV cache, RoPE tables computed once, host-side choice) against the
reference loop (`generate(..., static_cache=False)`): the same tokens, lengths and router choices,
log-probs within 1e-5; its parts against their references."""

import numpy as np
import paddle
import pytest
from support import small_moe_model

from paddle_ernie5.model import generation as G
from paddle_ernie5.model.rope import rope_cos_sin
from paddle_ernie5.model.view import ElasticView
from paddle_ernie5.ops.flashmask import flashmask_attention_reference

VOCAB = 61


def _model(backend="cpu", head_dim=8, layers=3):
    return small_moe_model(VOCAB, layers, backend=backend, head_dim=head_dim)


@pytest.fixture(scope="module")
def model():
    return _model()


def _both(model, prompt, n, **kw):
    ref = G.generate(model, prompt, n, static_cache=False, **kw)
    fast = G.generate(model, prompt, n, **kw)
    np.testing.assert_array_equal(fast.tokens, ref.tokens)
    np.testing.assert_array_equal(fast.lengths, ref.lengths)
    np.testing.assert_allclose(fast.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    assert (fast.routing is None) == (ref.routing is None)
    if ref.routing is not None:
        assert sorted(fast.routing) == sorted(ref.routing)
        for i in ref.routing:
            np.testing.assert_array_equal(fast.routing[i], ref.routing[i])
    return ref, fast


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_greedy_equals_reference(backend, batch):
    model = _model(backend)
    prompt = np.random.default_rng(batch).integers(3, VOCAB, size=(batch, 6))
    _both(model, prompt, 24, temperature=0.0)


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_with_head_dim_32_uses_precomputed_tables_and_equals_reference(batch):
    model = _model(head_dim=32)
    prompt = np.random.default_rng(7).integers(3, VOCAB, size=(batch, 5))
    _both(model, prompt, 20, temperature=0.0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=1.0, seed=3),
        dict(temperature=0.7, seed=11),
        dict(temperature=1.3, top_k=5, seed=2),
        dict(temperature=0.0, top_k=3),
        dict(temperature=1.0, top_k=VOCAB, seed=4),
    ],
)
def test_sampling_with_the_same_seed_equals_reference(model, kw):
    prompt = np.random.default_rng(2).integers(3, VOCAB, size=(4, 5))
    _both(model, prompt, 20, **kw)


def test_stop_tokens_end_rows_as_the_reference_does(model):
    prompt = np.zeros((6, 3), np.int64)
    hits = 0
    for stop in range(3, 15):
        ref, fast = _both(model, prompt, 16, temperature=1.0, seed=5, stop_id=stop, pad_id=1)
        hits += int((ref.lengths < 16).sum())
        for row, n in zip(fast.tokens, fast.lengths):
            if n < fast.tokens.shape[1]:
                assert row[n - 1] == stop and np.all(row[n:] == 1)
    assert hits > 0  # some rows did stop early


@pytest.mark.parametrize(
    "view",
    [
        ElasticView(top_k=1),
        ElasticView(layers=(0, 2)),
        ElasticView(layers=(1, 2), experts=(0, 2, 3, 5), top_k=1),
        ElasticView(layer_experts=((1, (0, 1, 2)), (2, (3, 4, 5)))),
    ],
)
def test_elastic_views_and_router_replay_records_equal_reference(model, view):
    prompt = np.random.default_rng(4).integers(3, VOCAB, size=(3, 5))
    ref, fast = _both(
        model, prompt, 12, temperature=1.0, seed=8, view=view, record_routing=True, stop_id=9
    )
    for ids in fast.routing.values():
        assert ids.shape == (3, 5 + fast.tokens.shape[1] - 1, view.top_k or 2)


def test_prompt_positions_continue_per_row_as_in_the_reference(model):
    """A packed prompt brings its own positions; decoding continues from each row's last one."""
    b, p = 3, 6
    prompt = np.random.default_rng(5).integers(3, VOCAB, size=(b, p))
    pos = np.zeros((b, 3, p), np.int64)
    for r in range(b):
        pos[r] = np.arange(p) + 4 * r  # rows end at different positions
    pos[1, 1:, 2:4] = 7  # an h/w block, as an image leaves
    extras = {"positions": pos, "token_types": np.zeros((b, p), np.int64)}
    ref, fast = _both(model, prompt, 10, temperature=0.0, prompt_extras=extras)
    plain = G.generate(model, prompt, 10, temperature=0.0)
    assert not np.allclose(plain.logprobs, fast.logprobs, atol=1e-4)  # the positions matter


def test_zero_and_one_new_tokens(model):
    prompt = np.random.default_rng(6).integers(3, VOCAB, size=(2, 4))
    for n in (0, 1):
        ref, fast = _both(model, prompt, n, temperature=1.0, seed=1, record_routing=True)
        assert fast.tokens.shape == (2, n)


# ------------------------------------------------------------------------------------- parts
def _reference_choice(logits, temperature, top_k, rng):
    logp = G._reference_log_probs(logits, temperature, top_k)
    noise = 0.0 if temperature == 0 else G._gumbel(rng, logp.shape)
    pick = (logp + noise).argmax(-1)
    return pick, logp[np.arange(len(pick)), pick]


def _hard_logits(rng, b, v):
    """Rows built to sit on the rounding edge: exact ties of the maximum, values 1 ulp apart, a few
    levels only (ties at every rank), logits spread past the clip at -64, and plain ones."""
    x = rng.standard_normal((b, v)).astype(np.float32)
    x[0, [3, 11]] = x[0].max() + 1.0
    x[1] *= 1e-3
    x[1, 9] = x[1].max() + 1e-3
    x[1, 2] = np.nextafter(x[1, 9], np.float32(-np.inf))  # before the maximum: rounding ties them
    x[2] = np.round(x[2] * 2) / 2
    x[3] *= 40.0
    return paddle.to_tensor(x)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6, 2.0])
@pytest.mark.parametrize("top_k", [0, 1, 4, 40])
def test_choose_equals_the_reference_step_on_rounding_edge_logits(temperature, top_k):
    for seed in range(6):
        logits = _hard_logits(np.random.default_rng(seed), 6, 97)
        ids, logp = G._choose(logits, temperature, top_k, np.random.default_rng(seed))
        ref_ids, ref_logp = _reference_choice(
            logits, temperature, top_k, np.random.default_rng(seed)
        )
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=0)
        assert logp.dtype == np.float32


def test_static_cache_append_returns_what_the_growing_cache_holds():
    rng = np.random.default_rng(0)
    for b in (1, 3):
        grow, static = G.LayerCache(), G.StaticKVCache(capacity=12).layer(0)
        for s in (4, 1, 1, 3, 1, 2):
            k, v = (
                paddle.to_tensor(rng.standard_normal((b, s, 2, 8)).astype("float32")) for _ in "kv"
            )
            gk, gv = grow.append(k, v)
            sk, sv = static.append(k, v)
            np.testing.assert_array_equal(sk.numpy(), gk.numpy())
            np.testing.assert_array_equal(sv.numpy(), gv.numpy())
        with pytest.raises(ValueError, match="holds 12 positions"):
            static.append(k, v)


@pytest.mark.parametrize("b,h,hk,d", [(1, 4, 2, 8), (3, 4, 4, 16), (2, 6, 2, 32), (5, 8, 1, 8)])
def test_attend_equals_reference_attention_over_the_cache(b, h, hk, d):
    """Decode-step attention read in place equals FlashMask's dense reference over the appended
    keys and values (causal, bottom-right), also after the prefill went through `append` and when
    appends and decode steps alternate."""
    rng = np.random.default_rng(b * 100 + h)

    def t(*shape):
        return paddle.to_tensor(rng.standard_normal(shape).astype("float32"))

    cache, grow = G.StaticKVCache(capacity=15).layer(0), G.LayerCache()
    for s in (5, 1, 1, 1, 3, 1, 1):
        k, v = t(b, s, hk, d), t(b, s, hk, d)
        keys, values = grow.append(k, v)
        if s > 1:
            cache.append(k, v)
            continue
        q = t(b, 1, h, d)
        out = cache.attend(q, k, v, d**-0.5)
        want = flashmask_attention_reference(q, keys, values, causal=True, softmax_scale=d**-0.5)
        np.testing.assert_allclose(out.numpy(), want.numpy(), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="one new position"):
        cache.attend(t(b, 2, h, d), t(b, 2, hk, d), t(b, 2, hk, d), 1.0)


@pytest.mark.parametrize("b,d", [(1, 16), (2, 8), (4, 32), (3, 64)])
def test_rope_tables_equal_per_step_tables_bit_for_bit(b, d):
    model = _model(head_dim=d, layers=1)
    att = model.cfg.attention
    shift = np.array([0, 5, 2, 9][:b]) if b > 1 else 0
    steps = G._decode_inputs(model, shift, 7, 12, b)
    assert len(steps) == 12
    for i, (positions, tables) in enumerate(steps):
        want_pos = np.broadcast_to(np.asarray(shift) + 7 + i, [b])
        np.testing.assert_array_equal(positions.numpy(), np.repeat(want_pos[:, None, None], 3, 1))
        assert tables is not None  # b * d fills whole SIMD vectors
        cos, sin = rope_cos_sin(positions, d, att.rope_base, att.rope_sections)
        np.testing.assert_array_equal(tables[0].numpy(), cos.numpy())
        np.testing.assert_array_equal(tables[1].numpy(), sin.numpy())
    assert G._decode_inputs(_model(head_dim=8, layers=1), 0, 3, 2, 1)[0][1] is None
