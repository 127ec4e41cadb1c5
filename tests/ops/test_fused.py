"""The fused RMSNorm / RoPE / SwiGLU CPU ops against their pure-Paddle references (ops/fused.py),
forward and backward, one to many threads, and the model with model.fused_ops on and off."""

import dataclasses

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import AttentionConfig, ModelConfig, MoEConfig
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.rope import rope_cos_sin
from paddle_ernie5.ops import fused, policy
from paddle_ernie5.ops.masks import causal_document


@pytest.fixture(scope="module", autouse=True)
def op():
    return fused._op()


def _leaf(array, grad=True):
    t = paddle.to_tensor(np.asarray(array, np.float32))
    t.stop_gradient = not grad
    return t


def _run(fn, arrays, dys, use_fused):
    """Outputs of fn(*inputs, fused) and the gradients of sum(out * dy) wrt every input."""
    inputs = [_leaf(a) for a in arrays]
    outs = fn(*inputs, use_fused)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    paddle.autograd.backward(outs, [_leaf(d, grad=False) for d in dys])
    return [o.numpy() for o in outs], [t.grad.numpy() for t in inputs]


def assert_close(got, want, rtol=1e-5, what="", scale=None):
    """Elementwise within rtol of the reference, plus rtol of `scale` (default: the tensor's largest
    magnitude) for entries near zero, where cancellation makes a relative bound meaningless."""
    assert got.shape == want.shape, what
    if scale is None:
        scale = float(np.abs(want).max()) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale + 1e-30, err_msg=what)


def _compare(fn, arrays, dys, rtol=1e-5, grad_scales=()):
    """Fused vs reference outputs and input gradients; `grad_scales[i]`, when given, is the size of
    the terms that cancel in gradient i (its near-zero tolerance)."""
    fo, fg = _run(fn, arrays, dys, True)
    ro, rg = _run(fn, arrays, dys, False)
    for i, (a, b) in enumerate(zip(fo, ro)):
        assert_close(a, b, rtol, f"output {i}")
    for i, (a, b) in enumerate(zip(fg, rg)):
        scale = grad_scales[i] if i < len(grad_scales) else None
        assert_close(a, b, rtol, f"gradient of input {i}", scale)
    return fo, fg


# ------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (1, 3), (1, 128), (7, 16), (5, 37), (3, 4, 17), (2, 3, 128), (300, 128), (33, 257)],
)
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm_matches_the_reference_forward_and_backward(shape, eps):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape) * rng.uniform(0.1, 10, shape[:-1] + (1,))
    w = rng.standard_normal(shape[-1])
    dy = rng.standard_normal(shape)
    # dx = r (dy w) - x r^3 <dy w, x> / M: its two terms are of size |dy w| r and cancel for M = 1
    r = 1 / np.sqrt((x**2).mean(-1, keepdims=True) + eps)
    dx_terms = float(np.abs(dy * w * r).max())
    _compare(
        lambda x, w, f: fused.rms_norm(x, w, eps, fused=f), [x, w], [dy], grad_scales=[dx_terms]
    )


def test_rms_norm_of_a_zero_row_is_zero_with_finite_gradients():
    x = np.zeros((3, 20))
    x[1] = np.linspace(-1, 1, 20)
    out, grads = _compare(
        lambda x, w, f: fused.rms_norm(x, w, 1e-6, fused=f),
        [x, np.ones(20)],
        [np.ones((3, 20))],
    )
    assert (out[0][0] == 0).all() and all(np.isfinite(g).all() for g in grads)


# --------------------------------------------------------------------------------------- RoPE


def _in_order_backward(x, w, r, dy):
    """The reference's backward chain in float32 with one rounding per Paddle kernel: g = dy w,
    the gradient of the broadcast multiply by r sums g x over the row one value after another,
    rsqrt' = -0.5 d r r r, mean' = / M, pow' = * 2 * x; the weight gradient adds rows in order."""
    f32 = np.float32
    g = dy * w
    dr = np.zeros((x.shape[0], 1), f32)
    for i in range(x.shape[1]):
        dr = dr + (g[:, i : i + 1] * x[:, i : i + 1])
    c = ((((f32(-0.5) * dr) * r) * r) * r) / f32(x.shape[1]) * f32(2)
    dw = np.zeros(x.shape[1], f32)
    for row in range(x.shape[0]):
        dw = dw + dy[row] * (x[row] * r[row])
    return g * r + c * x, dw


@pytest.mark.parametrize("shape", [(37, 128), (20, 96), (9, 100), (3, 17)])
def test_rms_norm_backward_takes_the_references_steps_in_its_order(shape):
    """Bit for bit: the reference's gradients equal `_in_order_backward` given the reference's own
    r, and the op's equal it given the op's r, so the two differ only through r (Paddle's pow and
    rsqrt are not correctly rounded)."""
    rng = np.random.default_rng(shape[1])
    x = (rng.standard_normal(shape) * 2).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    xt, wt = _leaf(x), _leaf(w)
    r_ref = paddle.rsqrt(xt.detach().pow(2).mean(axis=-1, keepdim=True) + 1e-6).numpy()
    y = fused.rms_norm_reference(xt, wt, 1e-6)
    paddle.autograd.backward([y], [_leaf(dy, grad=False)])
    want_dx, want_dw = _in_order_backward(x, w, r_ref, dy)
    np.testing.assert_array_equal(xt.grad.numpy(), want_dx)
    np.testing.assert_array_equal(wt.grad.numpy(), want_dw)

    xt, wt = _leaf(x), _leaf(w)
    y, r_op = fused._op().fused_rms_norm(xt, wt, 1e-6)
    paddle.autograd.backward([y], [_leaf(dy, grad=False)])
    want_dx, want_dw = _in_order_backward(x, w, r_op.numpy()[:, None], dy)
    np.testing.assert_array_equal(xt.grad.numpy(), want_dx)
    np.testing.assert_array_equal(wt.grad.numpy(), want_dw)


def _tables(rng, b, s, d, real=False):
    if real:  # Uni-RoPE tables of the model, positions differing per axis and batch row
        pos = rng.integers(0, 4 * s, size=(b, 3, s))
        return [t.numpy() for t in rope_cos_sin(paddle.to_tensor(pos), d, 1e4, (0.5, 0.25, 0.25))]
    ang = rng.uniform(-np.pi, np.pi, (b, s, 1, d // 2))
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rope(qkv, cos, sin, f, h, k):
    return fused.rope_qkv(qkv, cos, sin, h, k, fused=f)


@pytest.mark.parametrize(
    "b,s,h,k,d",
    [
        (1, 1, 1, 1, 2),
        (1, 3, 2, 2, 8),
        (2, 5, 4, 2, 10),  # D/2 = 5: all tail
        (2, 4, 3, 1, 16),
        (1, 6, 4, 2, 24),
        (2, 7, 4, 2, 32),
        (1, 3, 6, 2, 34),  # D/2 = 17: one vector and a tail of 1
        (2, 3, 8, 8, 64),
        (1, 2, 4, 1, 96),
        (2, 3, 2, 1, 128),
    ],
)
@pytest.mark.parametrize("real", [False, True])
def test_rope_qkv_matches_split_and_apply_rope(b, s, h, k, d, real):
    rng = np.random.default_rng(b * 1000 + s * 100 + d)
    qkv = rng.standard_normal((b, s, h + 2 * k, d))
    cos, sin = _tables(rng, b, s, d, real)
    dys = [rng.standard_normal((b, s, n, d)) for n in (h, k, k)]

    def fn(qkv, f):
        return _rope(qkv, paddle.to_tensor(cos), paddle.to_tensor(sin), f, h, k)

    # Bit for bit: both paths round every product before adding it (rope.cc: no FMA contraction).
    (q, k_out, v), (dqkv,) = _compare(fn, [qkv], dys, rtol=0)
    np.testing.assert_array_equal(v, qkv[:, :, h + k :].astype(np.float32))
    np.testing.assert_array_equal(dqkv[:, :, h + k :], dys[2].astype(np.float32))


@pytest.mark.parametrize("used", ["q", "k", "v", "qk"])
def test_rope_qkv_gradient_when_only_some_outputs_reach_the_loss(used):
    rng = np.random.default_rng(5)
    b, s, h, k, d = 2, 3, 4, 2, 16
    cos, sin = (paddle.to_tensor(t) for t in _tables(rng, b, s, d))
    arr = rng.standard_normal((b, s, h + 2 * k, d))
    grads = []
    for f in (True, False):
        qkv = _leaf(arr)
        outs = dict(zip("qkv", fused.rope_qkv(qkv, cos, sin, h, k, fused=f)))
        sum((outs[n] * outs[n]).sum() for n in used).backward()
        grads.append(qkv.grad.numpy())
    assert_close(grads[0], grads[1])
    slices = {"q": slice(0, h), "k": slice(h, h + k), "v": slice(h + k, h + 2 * k)}
    for name, sl in slices.items():
        assert (grads[0][:, :, sl] == 0).all() == (name not in used), name


# ------------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize(
    "shape", [(1, 2), (3, 34), (5, 74), (1, 32), (2, 3, 40), (4, 256), (64, 768), (7, 2 * 129)]
)
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_swiglu_matches_paddle_swiglu(shape, scale):
    rng = np.random.default_rng(shape[-1] + int(scale))
    x = rng.standard_normal(shape) * scale
    dy = rng.standard_normal(shape[:-1] + (shape[-1] // 2,))
    _compare(lambda x, f: fused.swiglu(x, fused=f), [x], [dy])


def test_swiglu_saturates_like_the_reference_at_large_inputs():
    x = np.array([[-200.0, -30.0, 0.0, 30.0, 200.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    _compare(lambda x, f: fused.swiglu(x, fused=f), [x], [np.ones((1, 5))])


# ----------------------------------------------------------------------- threads, the seam


def _all_ops(rng):
    # Large enough for 3 threads: the op gives a thread at most one per 2^20 values.
    x = rng.standard_normal((4100, 768))  # 129 row blocks of the weight gradient
    w = rng.standard_normal(768)
    qkv = rng.standard_normal((8, 512, 6, 128))
    cos, sin = (paddle.to_tensor(t) for t in _tables(rng, 8, 512, 128))
    g = rng.standard_normal((2048, 2 * 768))
    return [
        (
            lambda x, w, f: fused.rms_norm(x, w, 1e-6, fused=f),
            [x, w],
            [rng.standard_normal(x.shape)],
        ),
        (
            lambda qkv, f: _rope(qkv, cos, sin, f, 4, 1),
            [qkv],
            [rng.standard_normal((8, 512, n, 128)) for n in (4, 1, 1)],
        ),
        (lambda g, f: fused.swiglu(g, fused=f), [g], [rng.standard_normal((2048, 768))]),
    ]


def test_results_are_bit_identical_for_any_thread_count(monkeypatch):
    cases = _all_ops(np.random.default_rng(0))
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        results.append([_run(fn, arrays, dys, True) for fn, arrays, dys in cases])
    for other in results[1:]:
        for (out_a, grad_a), (out_b, grad_b) in zip(results[0], other):
            for a, b in zip(out_a + grad_a, out_b + grad_b):
                np.testing.assert_array_equal(a, b)


@pytest.fixture
def op_calls(monkeypatch):
    """The names of the fused ops called from now on (the seam's library replaced by a recorder)."""
    calls, real = [], fused._op()

    class Recorder:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(fused, "_op", Recorder)
    return calls


def test_the_seam_runs_the_op_only_when_the_policy_allows(op_calls):
    calls = op_calls
    rng = np.random.default_rng(1)
    x, w = _leaf(rng.standard_normal((4, 8))), _leaf(np.ones(8))
    qkv = _leaf(rng.standard_normal((1, 4, 4, 8)))
    cos, sin = (paddle.to_tensor(t) for t in _tables(rng, 1, 4, 8))
    g = _leaf(rng.standard_normal((4, 8)))

    def run_all(switch):
        calls.clear()
        fused.rms_norm(x, w, 1e-6, fused=switch)
        fused.rope_qkv(qkv, cos, sin, 2, 1, fused=switch)
        fused.swiglu(g, fused=switch)
        return list(calls)

    assert run_all(True) == ["fused_rms_norm", "fused_rope_qkv", "fused_swiglu"]
    assert run_all(False) == []
    with policy.reference_kernels():
        assert run_all(True) == []
    calls.clear()
    fused.rms_norm(x.astype("float64"), w.astype("float64"), 1e-6)
    assert calls == []


def test_reference_kernels_give_exactly_the_reference():
    rng = np.random.default_rng(2)
    x, w = _leaf(rng.standard_normal((6, 40))), _leaf(rng.standard_normal(40))
    with policy.reference_kernels():
        got = fused.rms_norm(x, w, 1e-6).numpy()
    np.testing.assert_array_equal(got, fused.rms_norm_reference(x, w, 1e-6).numpy())


# -------------------------------------------------------------------------------- the model


def _model(fused_ops: bool):
    paddle.seed(11)
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=48,
        num_layers=3,
        fused_ops=fused_ops,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=12, backend="reference"),
        moe=MoEConfig(
            num_experts=6, top_k=2, expert_hidden=16, shared_expert_hidden=8, first_dense_layers=1
        ),
    )
    return Ernie5Model(cfg)


def _batch(b=2, s=20):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, size=(b, s))
    pos = np.broadcast_to(np.arange(s), (b, 3, s)).copy()
    idx = np.broadcast_to(causal_document([s // 2, s - s // 2]), (b, 1, s, 1)).copy()
    return ids, {
        "input_ids": paddle.to_tensor(ids),
        "token_types": paddle.zeros([b, s], "int64"),
        "positions": paddle.to_tensor(pos),
        "startend_row_indices": paddle.to_tensor(idx),
    }


def _loss_and_grads(model):
    ids, batch = _batch()
    out = model(batch)
    labels = paddle.to_tensor(ids[:, 1:])
    ce = paddle.nn.functional.cross_entropy
    loss = (
        ce(out.logits[:, :-1], labels.unsqueeze(-1)).mean()
        + 0.3 * ce(out.mtp_logits[:, :-2], labels[:, 1:].unsqueeze(-1)).mean()
    )
    loss.backward()
    return float(loss), {n: p.grad.numpy() for n, p in model.named_parameters()}


def test_model_with_fused_ops_matches_the_reference_model(op_calls):
    fused_model, ref_model = _model(True), _model(False)
    ref_model.set_state_dict(fused_model.state_dict())
    assert dataclasses.replace(fused_model.cfg, fused_ops=False) == ref_model.cfg
    loss_f, grads_f = _loss_and_grads(fused_model)
    # 3 blocks + the MTP block: 2 norms each, plus the final norm and the MTP module's 3 norms;
    # RoPE once per block; SwiGLU in the dense first block, the MTP block and 2 shared experts.
    assert sorted(set(op_calls)) == ["fused_rms_norm", "fused_rope_qkv", "fused_swiglu"]
    assert op_calls.count("fused_rms_norm") == 12 and op_calls.count("fused_rope_qkv") == 4
    op_calls.clear()
    with policy.reference_kernels():
        loss_r, grads_r = _loss_and_grads(ref_model)
    assert op_calls == []
    assert abs(loss_f - loss_r) <= 1e-5 * abs(loss_r)
    assert grads_f.keys() == grads_r.keys()
    for name, g in grads_r.items():
        err = np.linalg.norm(grads_f[name] - g) / max(np.linalg.norm(g), 1e-30)
        assert err <= 1e-5, (name, err)


def test_fused_ops_false_reaches_the_norms_and_attention(op_calls):
    ref_model = _model(False)
    _loss_and_grads(ref_model)
    # The MoE layers' shared experts (model/moe.py) build their SwiGLU with the default fused=True.
    assert set(op_calls) <= {"fused_swiglu"}
