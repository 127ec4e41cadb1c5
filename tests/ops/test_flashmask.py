"""The CPU FlashMask op against the dense reference: forward, backward, edge cases, errors."""

import numpy as np
import paddle
import pytest
from flashmask_helpers import (
    assert_matches_reference,
    attention_and_grads,
    random_mask_indices,
    random_qkv,
)

from paddle_ernie5.ops import masks
from paddle_ernie5.ops.flashmask import (
    flashmask_attention,
    flashmask_attention_reference,
    resolve_backend,
)

pytestmark = pytest.mark.usefixtures("cpu_op")

N = 150  # not a multiple of the 64-row tile
BUILDER_ARGS = {
    "full": (N,),
    "causal": (N,),
    "sliding_window": (N, 40),
    "causal_document": ([37, 70, 20], N),
    "document": ([37, 70, 20], N),
    "share_question": (50, [30, 41, 19], N),
    "global_sliding_window": (N, 5, 30),
    "causal_blockwise": ([40, 33, 60], N),
    "prefix_lm_causal": (N, 70),
    "prefix_lm_document": ([80, 60], [30, 10], N),
    "qk_sparse": (N, (66, 100), (10, 75)),
    "random_eviction": (N, 60),
    "scale_block_causal": ([1, 4, 16, 64, 40], N),
    "frame_causal": (6, 24, 2, N),
}


def indices(array, batch=1):
    return paddle.to_tensor(masks.batched(array, batch))


def random_indices(rng, b, hm, sq, sk, c, causal):
    return paddle.to_tensor(random_mask_indices(rng, b, hm, sq, sk, c, causal))


@pytest.mark.parametrize("name", sorted(masks.BUILDERS))
def test_every_mask_builder_matches_reference(name):
    build, causal = masks.BUILDERS[name]
    q, k, v = random_qkv(2, N, N, 4, 2, 32, seed=len(name))
    assert_matches_reference(q, k, v, indices(build(*BUILDER_ARGS[name]), 2), causal)


SHAPES = [  # b, sq, sk, h, hk, d, mask heads, c, causal
    (1, 1, 1, 1, 1, 16, 1, 1, True),
    (2, 63, 63, 2, 1, 32, 1, 2, True),
    (1, 65, 130, 4, 2, 64, 2, 1, True),
    (1, 130, 65, 4, 2, 48, 1, 2, True),
    (2, 97, 97, 3, 3, 24, 3, 2, False),
    (1, 200, 77, 4, 1, 80, 1, 4, False),
    (1, 129, 300, 4, 2, 8, 4, 4, False),
    (1, 257, 257, 2, 2, 64, 2, 4, False),
]


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "b{}_q{}_k{}_h{}_hk{}_d{}_m{}_c{}_{}".format(*s)
)
def test_random_shapes_and_indices_match_reference(shape):
    b, sq, sk, h, hk, d, hm, c, causal = shape
    rng = np.random.default_rng(sq * 1000 + sk)
    q, k, v = random_qkv(b, sq, sk, h, hk, d, seed=sq + sk)
    idx = random_indices(rng, b, hm, sq, sk, c, causal)
    assert_matches_reference(q, k, v, idx, causal)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk", [(100, 100), (70, 150), (150, 70)])
def test_no_indices_is_plain_attention(causal, sq, sk):
    q, k, v = random_qkv(1, sq, sk, 2, 1, 32, seed=sq)
    assert_matches_reference(q, k, v, None, causal)


def test_softmax_scale_is_used():
    q, k, v = random_qkv(1, 90, 90, 2, 2, 32)
    idx = indices(masks.causal_document([40, 50]))
    out = assert_matches_reference(q, k, v, idx, True, softmax_scale=0.37)[0]
    default = flashmask_attention(q, k, v, idx, causal=True, backend="cpu").numpy()
    assert np.abs(out - default).max() > 1e-3


def test_fully_masked_rows_give_zero_output_and_zero_grads():
    sq = 140
    # 100 real tokens then padding: padding rows see no key; so do rows of a dropped query range.
    idx = masks.document([60, 40], sq)
    q, k, v = random_qkv(1, sq, sq, 2, 1, 32)
    out, lse, dq, dk, dv = assert_matches_reference(q, k, v, indices(idx), False)
    assert np.all(out[:, 100:] == 0) and np.all(dq[:, 100:] == 0)
    assert np.all(dk[:, 100:] == 0) and np.all(dv[:, 100:] == 0)
    assert np.isinf(lse[:, :, 100:]).all() and np.isfinite(lse[:, :, :100]).all()
    sparse = masks.qk_sparse(sq, (64, 130), (0, 0))
    out, *_, dq, _, _ = assert_matches_reference(q, k, v, indices(sparse), True)
    assert np.all(out[:, 64:130] == 0) and np.all(dq[:, 64:130] == 0)


def test_everything_masked_is_all_zero():
    q, k, v = random_qkv(1, 70, 70, 2, 2, 16)
    idx = paddle.zeros([1, 1, 70, 1], dtype="int32")  # LTS = 0: every row masked
    out, lse, dq, dk, dv = assert_matches_reference(q, k, v, idx, True)
    assert not out.any() and not dq.any() and not dk.any() and not dv.any()
    assert np.isinf(lse).all()


def test_backward_through_autograd_equals_reference():
    q, k, v = random_qkv(1, 120, 120, 4, 2, 32)
    idx = indices(masks.share_question(40, [40, 40]))
    grads = {}
    for label, fn in (
        ("cpu", lambda *a, **kw: flashmask_attention(*a, backend="cpu", **kw)),
        ("ref", flashmask_attention_reference),
    ):
        leaves = [paddle.to_tensor(t.numpy(), stop_gradient=False) for t in (q, k, v)]
        out = fn(*leaves, idx, causal=True)
        (out.square().sum() + out.mean()).backward()
        grads[label] = [t.grad.numpy() for t in leaves]
    for got, want in zip(grads["cpu"], grads["ref"]):
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("use_out", [True, False])
def test_gradient_through_lse_matches_reference(use_out):
    q, k, v = random_qkv(1, 100, 100, 2, 1, 32)
    idx = indices(masks.causal_document([40, 60]))
    w = paddle.to_tensor(np.random.default_rng(5).standard_normal((1, 2, 100)).astype(np.float32))
    grads = {}
    for label, fn in (
        ("cpu", lambda *a, **kw: flashmask_attention(*a, backend="cpu", **kw)),
        ("ref", flashmask_attention_reference),
    ):
        leaves = [paddle.to_tensor(t.numpy(), stop_gradient=False) for t in (q, k, v)]
        out, lse = fn(*leaves, idx, causal=True, return_softmax_lse=True)
        loss = (lse * w).sum() + (out.square().sum() if use_out else 0.0)
        loss.backward()
        # lse does not depend on v: the reference leaves its grad unset.
        grads[label] = [np.zeros(t.shape) if t.grad is None else t.grad.numpy() for t in leaves]
    for got, want in zip(grads["cpu"], grads["ref"]):
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize(
    "b,s,h,hk,docs",
    [
        (1, 300, 4, 1, [90, 110, 100]),  # several key-tile chunks per kv head: summed dQ partials
        (8, 256, 4, 2, [50, 70, 40, 96]),  # the tiny recipe's shape: one chunk, dQ written directly
    ],
)
def test_backward_is_deterministic_across_runs_and_thread_counts(monkeypatch, b, s, h, hk, docs):
    q, k, v = random_qkv(b, s, s, h, hk, 32)
    idx = indices(masks.causal_document(docs), b)

    def cpu(*a, **kw):
        return flashmask_attention(*a, backend="cpu", **kw)

    runs = []
    for threads in ("1", "2", "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        runs.append(attention_and_grads(cpu, q, k, v, idx, True))
    for first, again in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(first, again)
    for first, again in zip(runs[1], runs[2]):
        np.testing.assert_array_equal(first, again)
    if b == 8:
        assert_matches_reference(q, k, v, idx, True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_are_computed_in_float32(dtype):
    q, k, v = random_qkv(1, 80, 80, 2, 2, 32, dtype=dtype)
    idx = indices(masks.causal(80))
    out = flashmask_attention(q, k, v, idx, causal=True, backend="cpu")
    assert out.dtype == q.dtype
    want = flashmask_attention_reference(
        *(t.astype("float32") for t in (q, k, v)), idx, causal=True
    )
    assert np.abs(out.astype("float32").numpy() - want.numpy()).max() < 2e-2


@pytest.mark.parametrize("causal,window", [(True, 9), (False, (5, 12))])
def test_window_size_matches_reference(causal, window):
    q, k, v = random_qkv(2, 100, 100, 2, 1, 16)
    got = flashmask_attention(q, k, v, causal=causal, window_size=window, backend="cpu")
    want = flashmask_attention_reference(q, k, v, causal=causal, window_size=window)
    assert np.abs(got.numpy() - want.numpy()).max() <= 1e-4
    if causal:
        built = flashmask_attention(
            q, k, v, indices(masks.sliding_window(100, window), 2), causal=True, backend="cpu"
        )
        np.testing.assert_array_equal(got.numpy(), built.numpy())


def test_model_calling_convention_uses_cpu_op_on_auto():
    q, k, v = random_qkv(2, 40, 40, 4, 2, 16)
    idx = indices(masks.causal_document([25, 15]), 2)
    assert resolve_backend("auto", q) == "cpu"
    got = flashmask_attention(q, k, v, idx, causal=True, softmax_scale=0.25, backend="auto")
    want = flashmask_attention(q, k, v, idx, causal=True, softmax_scale=0.25, backend="reference")
    assert np.abs(got.numpy() - want.numpy()).max() <= 1e-5


def test_reference_block_mask_masks_whole_blocks():
    q, k, v = random_qkv(1, 200, 200, 2, 2, 16)
    idx = indices(masks.causal(200))
    block_mask = paddle.to_tensor([[[[1, 0], [0, 1]]]], dtype="int32")
    out = flashmask_attention(q, k, v, idx, causal=True, block_mask=block_mask, backend="reference")
    # Rows 128.. see only keys 128..: same as attending over that block alone.
    tail = flashmask_attention_reference(q[:, 128:], k[:, 128:], v[:, 128:], causal=True)
    assert np.abs(out.numpy()[:, 128:] - tail.numpy()).max() <= 1e-5


def random_blocks(rng, b, hb, sq, sk, density):
    """A random block mask [b, hb, ceil(sq/128), ceil(sk/128)] with about `density` blocks kept."""
    shape = (b, hb, -(-sq // 128), -(-sk // 128))
    return (rng.random(shape) < density).astype(np.int32)


BLOCK_CASES = [  # b, sq, sk, h, hk, block heads, density, mask
    (2, 200, 200, 4, 2, 2, 0.5, "causal_document"),
    (1, 300, 300, 4, 2, 4, 0.3, "document"),
    (2, 130, 130, 2, 1, 1, 0.7, "causal"),
    (1, 257, 257, 4, 4, 4, 0.1, "sliding_window"),
    (1, 384, 384, 4, 1, 1, 1.0, "causal"),
    (1, 250, 250, 6, 2, 6, 0.6, "global_sliding_window"),
    (2, 190, 190, 4, 2, 1, 0.8, "share_question"),
    (1, 129, 129, 2, 2, 2, 0.4, "full"),
]
BLOCK_MASK_ARGS = {
    "causal_document": lambda n: ([n // 3, n // 4, n - n // 3 - n // 4 - 5], n),
    "document": lambda n: ([n // 2, n - n // 2 - 7], n),
    "causal": lambda n: (n,),
    "sliding_window": lambda n: (n, 70),
    "global_sliding_window": lambda n: (n, 6, 40),
    "share_question": lambda n: (n // 4, [n // 4, n // 3], n),
    "full": lambda n: (n,),
}


@pytest.mark.parametrize(
    "case", BLOCK_CASES, ids=lambda c: "b{}_q{}_k{}_h{}_hk{}_hb{}_p{}_{}".format(*c)
)
def test_block_mask_matches_reference(case):
    b, sq, sk, h, hk, hb, density, name = case
    rng = np.random.default_rng(sq * 7 + hb)
    build, causal = masks.BUILDERS[name]
    q, k, v = random_qkv(b, sq, sk, h, hk, 32, seed=sq + hb)
    blocks = random_blocks(rng, b, hb, sq, sk, density)
    blocks[0, 0, rng.integers(blocks.shape[2])] = 0  # a block row with nothing: rows see no key
    idx = indices(build(*BLOCK_MASK_ARGS[name](sq)), b)
    out, lse, *_ = assert_matches_reference(
        q, k, v, idx, causal, block_mask=paddle.to_tensor(blocks)
    )
    # Query head 0 reads block head 0 in every layout: rows whose blocks are all off see nothing.
    rows = np.repeat(blocks[0, 0].any(axis=1), 128)[:sq]
    assert np.all(out[0, ~rows, 0] == 0) and np.isinf(lse[0, 0, ~rows]).all()


@pytest.mark.parametrize("sq,sk,causal", [(200, 330, True), (330, 200, False), (70, 260, True)])
def test_block_mask_with_random_indices_and_unequal_lengths(sq, sk, causal):
    rng = np.random.default_rng(sq + sk)
    q, k, v = random_qkv(1, sq, sk, 4, 2, 16, seed=sq)
    idx = random_indices(rng, 1, 2, sq, sk, 2, causal)
    blocks = paddle.to_tensor(random_blocks(rng, 1, 4, sq, sk, 0.6))
    assert_matches_reference(q, k, v, idx, causal, block_mask=blocks)


def test_block_mask_bool_equals_int32_and_all_ones_equals_none():
    q, k, v = random_qkv(1, 300, 300, 4, 2, 32, seed=3)
    idx = indices(masks.causal_document([100, 150, 50]))
    rng = np.random.default_rng(0)
    blocks = random_blocks(rng, 1, 2, 300, 300, 0.5)

    def run(block_mask):
        return flashmask_attention(
            q, k, v, idx, causal=True, block_mask=block_mask, backend="cpu"
        ).numpy()

    as_bool = paddle.to_tensor(blocks.astype(bool))
    np.testing.assert_array_equal(run(paddle.to_tensor(blocks)), run(as_bool))
    ones = paddle.ones([1, 1, 3, 3], dtype="int32")
    np.testing.assert_array_equal(run(ones), run(None))


@pytest.mark.parametrize("h,hk,hb", [(3, 3, 3), (4, 2, 2), (4, 2, 1)])
def test_skipped_blocks_are_not_computed(h, hk, hb):
    """NaN in the key/value rows of a block that no query of a head keeps never reaches that
    head's output or gradients: the block's tiles are not computed at all (a computed tile would
    be masked after the product, and 0 * NaN is NaN)."""
    s = 300  # blocks 0..127, 128..255, 256..299
    q, k, v = random_qkv(1, s, s, h, hk, 32, seed=h + hb)
    group = h // hk
    kv_block = {j: 0 if hb == 1 else j % 3 for j in range(hk)}  # kv head -> its NaN key block
    blocks = np.ones((1, hb, 3, 3), np.int32)
    for i in range(hb):  # block head i: query head i (hb = h), kv head i (hb = hk) or all (hb = 1)
        blocks[0, i, :, kv_block[i // group if hb == h else i if hb == hk else 0]] = 0
    k_nan, v_nan = k.numpy().copy(), v.numpy().copy()
    for j, c in kv_block.items():
        k_nan[0, 128 * c : 128 * (c + 1), j] = np.nan
        v_nan[0, 128 * c : 128 * (c + 1), j] = np.nan
    idx = indices(masks.full(s))
    block_mask = paddle.to_tensor(blocks)
    got = attention_and_grads(
        lambda *a, **kw: flashmask_attention(*a, backend="cpu", **kw),
        q,
        paddle.to_tensor(k_nan),
        paddle.to_tensor(v_nan),
        idx,
        False,
        block_mask=block_mask,
    )
    want = attention_and_grads(
        flashmask_attention_reference, q, k, v, idx, False, block_mask=block_mask
    )
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert np.isfinite(g).all(), f"{name}: NaN from a skipped block"
        assert np.abs(g - w).max() <= 1e-4, name
    for j, c in kv_block.items():  # no query sees those keys: zero gradients
        assert not got[3][0, 128 * c : 128 * (c + 1), j].any()
        assert not got[4][0, 128 * c : 128 * (c + 1), j].any()


def test_block_mask_gradients_are_deterministic_across_thread_counts(monkeypatch):
    q, k, v = random_qkv(1, 520, 520, 4, 1, 32)
    idx = indices(masks.causal_document([200, 120, 200]))
    blocks = paddle.to_tensor(random_blocks(np.random.default_rng(1), 1, 4, 520, 520, 0.6))

    def cpu(*a, **kw):
        return flashmask_attention(*a, backend="cpu", block_mask=blocks, **kw)

    runs = []
    for threads in ("1", "2", "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        runs.append(attention_and_grads(cpu, q, k, v, idx, True))
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a, b)


def test_paddle_backend_receives_block_mask(monkeypatch):
    """The seam hands block_mask to Paddle's kernel untouched on the "paddle" backend."""
    from paddle_ernie5.ops import flashmask as fm

    seen = {}

    def fake(query, key, value, startend_row_indices=None, **kwargs):
        seen.update(kwargs, idx=startend_row_indices)
        return query

    monkeypatch.setattr(fm, "resolve_backend", lambda backend, query: "paddle")
    monkeypatch.setattr(paddle.nn.functional, "flashmask_attention", fake)
    q, k, v = random_qkv(1, 20, 20, 2, 2, 16)
    idx = indices(masks.causal(20))
    block_mask = paddle.ones([1, 1, 1, 1], dtype="int32")
    flashmask_attention(q, k, v, idx, causal=True, block_mask=block_mask, backend="paddle")
    assert seen["block_mask"] is block_mask and seen["idx"] is idx


def bad_call(**changes):
    args = dict(zip(("query", "key", "value"), random_qkv(1, 20, 20, 4, 2, 16)))
    args.update(startend_row_indices=indices(masks.causal(20)), causal=True, backend="cpu")
    args.update(changes)
    return lambda: flashmask_attention(**args)


INVALID = [
    (dict(query=paddle.zeros([1, 20, 4, 16], dtype="float64")), TypeError, "float32"),
    (dict(key=paddle.zeros([1, 20, 2, 16], dtype="int32")), TypeError, "float32"),
    (dict(startend_row_indices=paddle.full([1, 1, 20, 1], 20, dtype="int64")), TypeError, "int32"),
    (
        dict(startend_row_indices=paddle.full([1, 1, 20, 4], 20, dtype="int32")),
        ValueError,
        "last dim",
    ),
    (
        dict(startend_row_indices=paddle.full([1, 1, 20, 1], 20, dtype="int32"), causal=False),
        ValueError,
        "last dim",
    ),
    (
        dict(startend_row_indices=paddle.full([1, 1, 20, 1], 21, dtype="int32")),
        ValueError,
        r"\[0, Sq=20\]",
    ),
    (
        dict(startend_row_indices=paddle.full([1, 1, 20, 1], -1, dtype="int32")),
        ValueError,
        r"\[0, Sq=20\]",
    ),
    (dict(startend_row_indices=paddle.full([1, 1, 19, 1], 20, dtype="int32")), ValueError, "Sk=20"),
    (dict(startend_row_indices=paddle.full([1, 3, 20, 1], 20, dtype="int32")), ValueError, "Sk=20"),
    (
        dict(key=paddle.zeros([1, 20, 3, 16]), value=paddle.zeros([1, 20, 3, 16])),
        ValueError,
        "multiple",
    ),
    (dict(value=paddle.zeros([1, 21, 2, 16])), ValueError, "differ"),
    (dict(query=paddle.zeros([1, 20, 4, 8])), ValueError, "head dim"),
    (dict(query=paddle.zeros([20, 4, 16])), ValueError, "4-D"),
    (dict(backend="cuda"), ValueError, "unknown"),
    (dict(backend="paddle"), RuntimeError, "CUDA build"),
    (dict(dropout=0.1), NotImplementedError, "dropout"),
    (dict(return_seed_offset=True), NotImplementedError, "seed"),
    (dict(block_mask=paddle.ones([1, 1, 1, 1], dtype="float32")), TypeError, "int32 or bool"),
    (dict(block_mask=paddle.ones([1, 3, 1, 1], dtype="int32")), ValueError, r"1\|2\|4"),
    (dict(block_mask=paddle.ones([1, 1, 2, 1], dtype="int32")), ValueError, "block_mask must be"),
    (dict(block_mask=paddle.ones([1, 1, 1], dtype="int32")), ValueError, "block_mask must be"),
    (dict(window_size=4), ValueError, "exclusive"),
]


@pytest.mark.parametrize("changes,error,message", INVALID, ids=[m for _, _, m in INVALID])
def test_invalid_inputs_raise_clear_errors(changes, error, message):
    with pytest.raises(error, match=message):
        bad_call(**changes)()


def test_raw_op_rejects_out_of_range_indices(cpu_op):
    q, k, v = random_qkv(1, 20, 20, 2, 2, 16)
    idx = paddle.full([1, 1, 20, 1], 25, dtype="int32")
    with pytest.raises(Exception, match="must lie in"):
        cpu_op.flashmask_cpu(q, k, v, idx, None, True, 0.25)
