"""The CPU FlashMask op against the dense reference: forward, backward, edge cases, errors."""

import numpy as np
import paddle
import pytest
from flashmask_helpers import assert_matches_reference, attention_and_grads, random_qkv

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
    """Random indices of the documented format: values in [0, Sq], ranges start <= end."""
    lts = rng.integers(0, sq + 1, (b, hm, sk))
    lte = rng.integers(lts, sq + 1)
    uts = rng.integers(0, sq + 1, (b, hm, sk))
    ute = rng.integers(uts, sq + 1)
    if causal:
        cols = [lts] if c == 1 else [lts, lte]
    else:
        cols = [lts, rng.integers(0, sq + 1, (b, hm, sk))] if c == 2 else [lts, lte, uts, ute]
    return paddle.to_tensor(np.stack(cols, -1).astype(np.int32))


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


def test_backward_is_deterministic_across_runs_and_thread_counts(monkeypatch):
    q, k, v = random_qkv(1, 300, 300, 4, 1, 32)
    idx = indices(masks.causal_document([90, 110, 100]))

    def cpu(*a, **kw):
        return flashmask_attention(*a, backend="cpu", **kw)

    runs = []
    for threads in ("1", "2", "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        runs.append(attention_and_grads(cpu, q, k, v, idx, True))
    for a, b in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(runs[1], runs[2]):
        np.testing.assert_array_equal(a, b)


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
    (dict(block_mask=paddle.ones([1, 1, 1, 1], dtype="int32")), NotImplementedError, "block_mask"),
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
        cpu_op.flashmask_cpu(q, k, v, idx, True, 0.25)
