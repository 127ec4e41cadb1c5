"""Shared helpers of the FlashMask tests: random inputs and the comparison with the reference."""

import numpy as np
import paddle


def random_qkv(b, sq, sk, h, hk, d, seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    arrays = (
        rng.standard_normal((b, sq, h, d)),
        rng.standard_normal((b, sk, hk, d)),
        rng.standard_normal((b, sk, hk, d)),
    )
    return [paddle.to_tensor(a.astype(np.float32)).astype(dtype) for a in arrays]


def attention_and_grads(fn, q, k, v, idx, causal, seed=1, **kwargs):
    """(out, lse, dq, dk, dv) as numpy, with dout a fixed random tensor."""
    q, k, v = (paddle.to_tensor(t.numpy()) for t in (q, k, v))
    for t in (q, k, v):
        t.stop_gradient = False
    out, lse = fn(q, k, v, idx, causal=causal, return_softmax_lse=True, **kwargs)
    dout = paddle.to_tensor(
        np.random.default_rng(seed).standard_normal(out.shape).astype(np.float32)
    )
    grads = paddle.grad([out], [q, k, v], grad_outputs=[dout])
    return [out.numpy(), lse.numpy(), *[g.numpy() for g in grads]]


def assert_matches_reference(q, k, v, idx, causal, atol=1e-4, **kwargs):
    from paddle_ernie5.ops.flashmask import flashmask_attention, flashmask_attention_reference

    got = attention_and_grads(
        lambda *a, **kw: flashmask_attention(*a, backend="cpu", **kw),
        q,
        k,
        v,
        idx,
        causal,
        **kwargs,
    )
    want = attention_and_grads(flashmask_attention_reference, q, k, v, idx, causal, **kwargs)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, w in zip(names, got, want):
        assert np.isfinite(g).all() or name == "lse", f"{name} has NaN/inf"
        if name == "lse":
            assert (np.isinf(g) == np.isinf(w)).all(), "rows with no visible key differ"
            g, w = g[np.isfinite(w)], w[np.isfinite(w)]
        err = float(np.abs(g - w).max()) if g.size else 0.0
        assert err <= atol, f"{name}: max abs error {err:.2e} > {atol:.0e}"
    return got


def random_mask_indices(rng, b: int, hm: int, sq: int, sk: int, c: int, causal: bool):
    """Random FlashMask startend_row_indices [b, hm, sk, c] int32 (numpy) of the documented format:
    values in [0, sq], ranges start <= end; c columns as the op reads them for `causal`."""
    lts = rng.integers(0, sq + 1, (b, hm, sk))
    lte = rng.integers(lts, sq + 1)
    uts = rng.integers(0, sq + 1, (b, hm, sk))
    ute = rng.integers(uts, sq + 1)
    if causal:
        cols = [lts] if c == 1 else [lts, lte]
    else:
        cols = [lts, rng.integers(0, sq + 1, (b, hm, sk))] if c == 2 else [lts, lte, uts, ute]
    return np.stack(cols, -1).astype(np.int32)
