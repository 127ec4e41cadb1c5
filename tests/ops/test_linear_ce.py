"""The fused output projection + cross-entropy op against its pure-Paddle reference, and the
training loss through it against the loss from materialised logits."""

import dataclasses

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import AttentionConfig, ModelConfig, MoEConfig
from paddle_ernie5.model.bf16_emulation import bf16_emulation
from paddle_ernie5.model.losses import compute_loss, mtp_labels, token_cross_entropy
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.ops import linear_ce as seam
from paddle_ernie5.ops import policy
from paddle_ernie5.ops.masks import causal_document

IGNORE = seam.IGNORE_INDEX


@pytest.fixture(scope="module")
def op():
    return seam._op()


def _param(array):
    t = paddle.to_tensor(np.ascontiguousarray(array, dtype=np.float32))
    t.stop_gradient = False
    return t


def _case(t, m, v, transposed, seed=0, h_scale=1.0, ignored=0.1):
    rng = np.random.default_rng(seed)
    h = _param(h_scale * rng.standard_normal((t, m)))
    shape = (v, m) if transposed else (m, v)
    w = _param(rng.standard_normal(shape) / np.sqrt(m))
    labels = rng.integers(0, v, t)
    labels[rng.random(t) < ignored] = IGNORE
    dloss = paddle.to_tensor(rng.standard_normal(t).astype(np.float32))
    return h, w, paddle.to_tensor(labels.astype(np.int64)), dloss


def _value_and_grads(fn, h, w, labels, dloss, transposed):
    loss = fn(h, w, labels, transposed)
    dh, dw = paddle.grad([loss], [h, w], grad_outputs=[dloss])
    return [loss.numpy(), dh.numpy(), dw.numpy()]


def _fused(h, w, labels, transposed):
    return seam.linear_cross_entropy(h, w, labels, transposed, fused=True)


def _assert_close(got, want, rel=2e-6):
    names = ("loss", "dh", "dw")[-len(got) :]
    for name, a, b in zip(names, got, want, strict=True):
        assert a.shape == b.shape, name
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=rel * scale, err_msg=name)


CASES = [  # T, M, V
    (1, 8, 5),
    (1, 128, 4100),  # one row: the vocabulary is split over tasks
    (2, 32, 17),
    (7, 100, 2048),
    (37, 32, 17),
    (95, 256, 5),
    (97, 8, 2048),  # a second row tile of one row
    (300, 100, 4100),
    (513, 128, 2048),
    (1000, 32, 4100),
    (2048, 128, 2048),
    (3000, 8, 17),
    (3000, 256, 2048),
]


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "tied"])
@pytest.mark.parametrize("t,m,v", CASES)
def test_op_matches_reference_forward_and_backward(op, t, m, v, transposed):
    inputs = _case(t, m, v, transposed, seed=t + m + v)
    got = _value_and_grads(_fused, *inputs, transposed)
    want = _value_and_grads(seam.linear_cross_entropy_reference, *inputs, transposed)
    _assert_close(got, want)
    ignored = inputs[2].numpy() == IGNORE
    assert np.all(got[0][ignored] == 0) and np.all(got[1][ignored] == 0)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "tied"])
def test_all_labels_ignored_gives_zero_loss_and_gradients(op, transposed):
    h, w, _, dloss = _case(200, 32, 300, transposed, seed=1)
    labels = paddle.full([200], IGNORE, dtype="int64")
    got = _value_and_grads(_fused, h, w, labels, dloss, transposed)
    want = _value_and_grads(seam.linear_cross_entropy_reference, h, w, labels, dloss, transposed)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, np.zeros_like(a))
        np.testing.assert_array_equal(b, np.zeros_like(b))


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "tied"])
def test_tied_logits_give_log_v_and_match_reference(op, transposed):
    # Every column of w equal: all V logits of a row tie, the loss is log V exactly in exact math.
    t, m, v = 130, 16, 1000
    rng = np.random.default_rng(2)
    col = rng.standard_normal(m) / 4
    w_mv = np.repeat(col[:, None], v, axis=1)
    w = _param(w_mv.T if transposed else w_mv)
    h = _param(rng.standard_normal((t, m)))
    labels = paddle.to_tensor(rng.integers(0, v, t).astype(np.int64))
    dloss = paddle.to_tensor(np.ones(t, np.float32))
    got = _value_and_grads(_fused, h, w, labels, dloss, transposed)
    want = _value_and_grads(seam.linear_cross_entropy_reference, h, w, labels, dloss, transposed)
    np.testing.assert_allclose(got[0], np.full(t, np.log(v)), rtol=2e-6)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    # dh = (sum_j p_j - 1) * col is 0 in exact math: both paths give rounding noise of order
    # V * eps * |col| (which noise depends on summation order and thread count), so dh is checked
    # against 0, not against the other path's noise.
    bound = 10 * v * np.finfo(np.float32).eps * np.abs(col).max()
    assert np.abs(got[1]).max() < bound and np.abs(want[1]).max() < bound
    _assert_close(got[2:], want[2:])


def _float64_reference(h, w, labels, dloss, transposed):
    h64, w64 = h.numpy().astype(np.float64), w.numpy().astype(np.float64)
    logits = h64 @ (w64.T if transposed else w64)
    top = logits.max(1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(1, keepdims=True)))[:, 0]
    y = labels.numpy()
    valid = y != IGNORE
    rows = np.arange(len(y))
    loss = np.where(valid, lse - logits[rows, np.where(valid, y, 0)], 0.0)
    g = np.exp(logits - lse[:, None])
    g[rows[valid], y[valid]] -= 1.0
    g *= (dloss.numpy() * valid)[:, None]
    dw = (g.T @ h64) if transposed else (h64.T @ g)
    return [loss, g @ (w64 if transposed else w64.T), dw], np.abs(logits).max()


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "tied"])
def test_large_logits_stay_finite_and_match_reference(op, transposed):
    # Logits near 5000 that differ by a few units: exp without the max subtracted overflows.
    t, m, v = 400, 64, 3000
    h, w, labels, dloss = _case(t, m, v, transposed, seed=3)
    shift = np.zeros((t, m), np.float32)
    shift[:, 0] = 5000.0
    h = _param(h.numpy() + shift)
    w_np = w.numpy()
    if transposed:
        w_np[:, 0] = 1.0 + 1e-3 * w_np[:, 0]
    else:
        w_np[0, :] = 1.0 + 1e-3 * w_np[0, :]
    w = _param(w_np)
    got = _value_and_grads(_fused, h, w, labels, dloss, transposed)
    want = _value_and_grads(seam.linear_cross_entropy_reference, h, w, labels, dloss, transposed)
    exact, top = _float64_reference(h, w, labels, dloss, transposed)
    assert top > 4000 and all(np.isfinite(a).all() for a in got)
    # float32 logits of this size are rounded by ~3e-4; the loss is a difference of two of them.
    for a, b in zip(got, exact):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-7 * top * max(1.0, np.abs(b).max()))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=2e-7 * top)


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "tied"])
def test_losses_beyond_64_nats_are_exact(op, transposed):
    # Paddle's CPU cross-entropy floors the probability near e^-64 (its loss stops near 64 nats);
    # the op does not, and the gradients (softmax - onehot) of all three agree.
    h, w, labels, dloss = _case(300, 32, 500, transposed, seed=11, h_scale=40.0)
    got = _value_and_grads(_fused, h, w, labels, dloss, transposed)
    want = _value_and_grads(seam.linear_cross_entropy_reference, h, w, labels, dloss, transposed)
    exact, top = _float64_reference(h, w, labels, dloss, transposed)
    assert exact[0].max() > 100 and want[0].max() < 65.0
    np.testing.assert_allclose(got[0], exact[0], rtol=1e-5, atol=2e-7 * top)
    _assert_close(got[1:], want[1:], rel=1e-5)
    _assert_close(got[1:], [e.astype(np.float32) for e in exact[1:]], rel=1e-5)


def test_mean_over_targets_matches_token_cross_entropy(op):
    h, w, labels, _ = _case(333, 48, 777, False, seed=4, ignored=0.3)
    valid = (labels != IGNORE).astype("float32")
    fused = (_fused(h, w, labels, False) * valid).sum() / valid.sum()
    want, _ = token_cross_entropy(paddle.matmul(h, w).unsqueeze(0), labels.unsqueeze(0))
    got = paddle.grad([fused], [h, w])
    ref = paddle.grad([want], [h, w])
    np.testing.assert_allclose(float(fused), float(want), rtol=1e-6)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "t,m,v",
    [
        (1100, 40, 4100),  # backward splits rows and columns: partial dh and dw buffers
        (3000, 24, 17),  # one column tile: row groups only
        (3, 32, 5000),  # columns only, forward over column groups
    ],
)
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "tied"])
def test_results_do_not_depend_on_the_thread_count(op, monkeypatch, t, m, v, transposed):
    inputs = _case(t, m, v, transposed, seed=5)
    results = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        results.append(_value_and_grads(_fused, *inputs, transposed))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_reference_runs_when_not_allowed(op):
    h, w, labels, _ = _case(50, 16, 40, False, seed=6)
    want = seam.linear_cross_entropy_reference(h, w, labels, False).numpy()
    np.testing.assert_array_equal(seam.linear_cross_entropy(h, w, labels, False, False), want)
    with policy.reference_kernels():
        np.testing.assert_array_equal(seam.linear_cross_entropy(h, w, labels, False), want)


def test_op_rejects_bad_labels_and_shapes(op):
    h, w, labels, _ = _case(6, 16, 10, False)
    with pytest.raises(Exception, match="outside"):
        _fused(h, w, paddle.to_tensor(np.array([0, 1, 2, 10, 4, 5], np.int64)), False)
    with pytest.raises(Exception, match="outside"):
        _fused(h, w, paddle.to_tensor(np.array([0, -1, 2, 3, 4, 5], np.int64)), False)
    with pytest.raises(ValueError, match="disagree"):
        _fused(h, w, labels, True)  # [M, V] given as a tied [V, M] table
    with pytest.raises(ValueError, match="disagree"):
        _fused(h, w, labels[:5], False)


# ------------------------------------------------------------------------------ the training loss


def _model_cfg(**kw):
    base = dict(
        vocab_size=300,
        hidden_size=32,
        num_layers=2,
        num_mtp_modules=1,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, first_dense_layers=1),
    )
    base.update(kw)
    return ModelConfig(**base)


def _model_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    b, s, lens = 2, 40, [[15, 25], [40]]
    ids = rng.integers(0, cfg.text_vocab, (b, s)).astype(np.int64)
    pos = np.zeros([b, 3, s], np.int64)
    idx = np.zeros([b, 1, s, 1], np.int32)
    for i, doc in enumerate(lens):
        pos[i] = np.concatenate([np.arange(n) for n in doc])
        idx[i, 0] = causal_document(doc, s)
    labels = np.concatenate([ids[:, 1:], np.full((b, 1), IGNORE)], axis=1)
    labels[0, 14] = IGNORE  # document end
    labels[1, 30:] = IGNORE
    batch = {
        "input_ids": paddle.to_tensor(ids),
        "token_types": paddle.zeros([b, s], "int64"),
        "positions": paddle.to_tensor(pos),
        "startend_row_indices": paddle.to_tensor(idx),
    }
    return batch, paddle.to_tensor(labels.astype(np.int64))


def _loss_and_grads(model, batch, labels):
    out = model(batch)
    parts = compute_loss(out, labels, model.cfg)
    model.clear_gradients()
    parts.total.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    return out, parts, grads


@pytest.mark.parametrize("tie", [False, True], ids=["linear", "tied"])
def test_compute_loss_fused_matches_materialised_logits(op, tie):
    cfg = _model_cfg(tie_embeddings=tie)
    paddle.seed(7)
    fused = Ernie5Model(cfg)
    plain = Ernie5Model(dataclasses.replace(cfg, fused_ops=False))
    plain.set_state_dict(fused.state_dict())
    batch, labels = _model_batch(cfg)
    out_f, parts_f, grads_f = _loss_and_grads(fused, batch, labels)
    out_p, parts_p, grads_p = _loss_and_grads(plain, batch, labels)
    # The fused loss never formed the logits; the plain model did in its forward.
    assert out_f.unread_head_input() is not None and out_f.unread_head_input(mtp=True) is not None
    assert out_p.unread_head_input() is None
    for name in ("total", "text", "mtp"):
        a, b = float(getattr(parts_f, name)), float(getattr(parts_p, name))
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=name)
    assert float(parts_f.num_targets) == float((labels != IGNORE).sum())
    assert set(grads_f) == set(grads_p)
    for name, g in grads_p.items():
        scale = max(float(np.abs(g).max()), 1e-30)
        np.testing.assert_allclose(grads_f[name], g, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    # Deferred logits read afterwards are the logits of the eager forward.
    np.testing.assert_allclose(out_f.logits.numpy(), out_p.logits.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_f.mtp_logits.numpy(), out_p.mtp_logits.numpy(), atol=1e-5)
    assert out_f.unread_head_input() is None  # read now: a later loss uses them as they are
    again = compute_loss(out_f, labels, cfg)
    np.testing.assert_allclose(float(again.text), float(parts_f.text), rtol=1e-5)


def test_mtp_loss_uses_mtp_labels(op):
    cfg = _model_cfg()
    paddle.seed(8)
    model = Ernie5Model(cfg)
    batch, labels = _model_batch(cfg, seed=1)
    out = model(batch)
    parts = compute_loss(out, labels, cfg)
    want, _ = token_cross_entropy(out.mtp_logits, mtp_labels(labels))
    np.testing.assert_allclose(float(parts.mtp), float(want), rtol=1e-5)


def test_logits_are_eager_without_the_fused_op_and_under_bf16_emulation(op):
    cfg = _model_cfg()
    paddle.seed(9)
    model = Ernie5Model(cfg)
    batch, _ = _model_batch(cfg)
    assert model(batch).unread_head_input() is not None
    with policy.reference_kernels():
        assert model(batch).unread_head_input() is None
    with bf16_emulation(model):  # the head's rounding hooks must see the forward
        out = model(batch)
        assert out.unread_head_input() is None and out.unread_head_input(mtp=True) is None
    assert model(batch, with_mtp=False).mtp_logits is None


def test_deferred_logits_keep_the_forwards_grad_mode(op):
    cfg = _model_cfg()
    paddle.seed(10)
    model = Ernie5Model(cfg)
    batch, _ = _model_batch(cfg)
    with paddle.no_grad():
        out = model(batch)
    assert out.logits.stop_gradient  # computed after the block, still without a graph
    out = model(batch)
    with paddle.no_grad():
        logits = out.logits
    assert not logits.stop_gradient
