"""RRAttention block selection (ops/rr_attention.py): the round-robin rows, the estimator against a
per-row brute force, the top-tau rule on hand-checked rows, causality of the masks, tau = 1 equal
to dense attention, the settings' errors, and the prefill hook in model/attention.py."""

import numpy as np
import paddle
import pytest
from flashmask_helpers import random_mask_indices

from paddle_ernie5.config import AttentionConfig, ConfigError, ModelConfig, MoEConfig
from paddle_ernie5.ops import masks
from paddle_ernie5.ops import rr_attention as R
from paddle_ernie5.ops.flashmask import _BLOCK, flashmask_attention


def _qk(b, sq, sk, h, hk, d, seed=0, spread=2.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, sq, h, d)).astype(np.float32) * spread
    k = rng.standard_normal((b, sk, hk, d)).astype(np.float32) * spread
    return paddle.to_tensor(q), paddle.to_tensor(k)


def brute_force_importance(q, k, idx, causal, stride, block):
    """importance[b, h, I, j] by loops: head h's sampled row of each stride, its softmax over the
    keys it may see (float64), summed per key block, averaged over the strides of query block I."""
    q, k = q.numpy().astype(np.float64), k.numpy().astype(np.float64)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if idx is None:
        idx = masks.batched(masks.causal(sk) if causal else masks.full(sk), b)
    allowed = masks.to_dense(idx, causal, sq)  # [B, hm, Sq, Sk]
    nbq, nbj = -(-sq // block), -(-sk // block)
    out = np.zeros((b, h, nbq, nbj))
    count = np.zeros(nbq)
    for i in range(-(-sq // stride)):
        count[i * stride // block] += 1
    for bi in range(b):
        for hi in range(h):
            mask_h = allowed[bi, hi * allowed.shape[1] // h]
            for i in range(-(-sq // stride)):
                r = min(i * stride + (i + hi) % stride, sq - 1)
                s = q[bi, r, hi] @ k[bi, :, hi // (h // hk)].T / np.sqrt(d)
                vis = mask_h[r]
                if not vis.any():
                    continue
                p = np.where(vis, np.exp(s - s[vis].max()), 0.0)
                p /= p.sum()
                for j in range(nbj):
                    out[bi, hi, i * stride // block, j] += p[j * block : (j + 1) * block].sum()
    return out / count[None, None, :, None]


# ------------------------------------------------------------------------------ round-robin rows
@pytest.mark.parametrize("stride", [1, 4, 8, 16])
@pytest.mark.parametrize("extra_heads", [0, 3])
def test_round_robin_rows_cover_every_position_of_each_stride(stride, extra_heads):
    h, n = stride + extra_heads, stride + 2
    rows = R.sampled_rows(n * stride, stride, h)
    assert rows.shape == (h, n)
    for i in range(n):  # the heads together sample every row of each stride
        assert set((rows[:, i] - i * stride).tolist()) == set(range(stride))
    for hi in range(h):  # each head visits every offset over `stride` consecutive strides
        assert set((rows[hi, :stride] % stride).tolist()) == set(range(stride))


def test_round_robin_rows_rotate_with_the_stride_and_clip_a_partial_last_stride():
    rows = R.sampled_rows(21, 8, 3)  # strides [0, 8), [8, 16), [16, 21)
    np.testing.assert_array_equal(rows, [[0, 9, 18], [1, 10, 19], [2, 11, 20]])
    rows = R.sampled_rows(18, 8, 4)
    np.testing.assert_array_equal(rows[:, 2], [17, 17, 17, 17])  # 18, 19, 20, 21 -> the last row
    assert (np.diff(R.sampled_rows(1000, 16, 5), axis=1) > 0).all()


# ------------------------------------------------------------------------------------ estimator
CASES = [  # b, sq, sk, h, hk, d, stride, block, causal, mask (None | "random" C | "docs")
    (1, 300, 300, 4, 2, 16, 8, 128, True, None),
    (2, 260, 260, 3, 1, 8, 16, 128, True, None),
    (1, 200, 457, 2, 2, 8, 4, 128, True, None),
    (1, 333, 333, 4, 4, 8, 16, 128, False, None),
    (1, 520, 520, 4, 2, 8, 16, 256, True, None),
    (2, 300, 300, 4, 2, 8, 8, 128, True, 1),
    (1, 300, 420, 4, 2, 8, 16, 128, True, 2),
    (2, 270, 270, 4, 2, 8, 8, 128, False, 2),
    (1, 390, 390, 2, 1, 8, 4, 256, False, 4),
    (1, 400, 400, 4, 2, 8, 8, 128, True, "docs"),
]


def _indices(case, seed):
    b, sq, sk, h, hk, d, stride, block, causal, kind = case
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "docs":
        return masks.batched(masks.causal_document([90, 150, 60, 100]), b)
    return random_mask_indices(rng, b, rng.choice([1, hk, h]), sq, sk, kind, causal)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_estimator_equals_brute_force(case, backend):
    b, sq, sk, h, hk, d, stride, block, causal, _ = case
    q, k = _qk(b, sq, sk, h, hk, d, seed=sq + sk)
    idx = _indices(case, seed=h * sq)
    want = brute_force_importance(q, k, idx, causal, stride, block)
    t = None if idx is None else paddle.to_tensor(idx)
    got = R.block_importance(q, k, t, causal=causal, stride=stride, block=block, backend=backend)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    ref = R.block_importance_reference(q, k, t, causal=causal, stride=stride, block=block)
    np.testing.assert_allclose(ref, want, atol=1e-6, rtol=0)


LSE_CASES = [  # b, h, hk, n, t, d, block
    (1, 4, 2, 37, 300, 16, 128),
    (2, 3, 1, 16, 128, 8, 128),
    (1, 2, 2, 5, 1000, 32, 128),
    (1, 4, 1, 70, 513, 24, 256),
    (2, 4, 4, 33, 129, 64, 128),
    (1, 1, 1, 1, 7, 2, 128),
    (1, 4, 2, 48, 700, 32, 64),
]


@pytest.mark.parametrize("case", LSE_CASES)
def test_block_log_mass_kernel_equals_the_reference(case):
    b, h, hk, n, t, d, block = case
    rng = np.random.default_rng(sum(case))
    q = paddle.to_tensor(rng.standard_normal((b, h, n, d)).astype(np.float32) * 2)
    k = paddle.to_tensor(rng.standard_normal((b, t, hk, d)).astype(np.float32) * 2)
    limit = rng.integers(-2, t + 3, size=(h, n)).astype(np.int32)
    limit[0, 0], limit[-1, -1] = -1, t - 1  # a row that sees nothing, one that sees everything
    got = R.block_log_mass(q, k, limit, block, 0.3).numpy()
    want = R.block_log_mass_reference(q, k, limit, block, 0.3).numpy()
    assert got.shape == (b, h, -(-t // block), n)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=2e-6, atol=2e-5)
    # brute force for one row: the log of the block sums of exp(scale q.k) up to its limit
    bi, hi, ni = b - 1, h - 1, n // 2
    s = 0.3 * k.numpy()[bi, :, hi // (h // hk)].astype(np.float64) @ q.numpy()[bi, hi, ni]
    for j in range(-(-t // block)):
        cols = np.arange(j * block, min((j + 1) * block, t))
        cols = cols[cols <= limit[hi, ni]]
        want_j = np.log(np.exp(s[cols]).sum()) if cols.size else -np.inf
        np.testing.assert_allclose(got[bi, hi, j, ni], want_j, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_block_log_mass_kernel_is_the_same_for_any_thread_count(threads, monkeypatch):
    rng = np.random.default_rng(5)
    q = paddle.to_tensor(rng.standard_normal((1, 4, 100, 32)).astype(np.float32))
    k = paddle.to_tensor(rng.standard_normal((1, 900, 2, 32)).astype(np.float32))
    limit = np.sort(rng.integers(0, 900, size=(4, 100)), axis=1).astype(np.int32)
    base = R.block_log_mass(q, k, limit, 128, 0.2).numpy()
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    np.testing.assert_array_equal(R.block_log_mass(q, k, limit, 128, 0.2).numpy(), base)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("sq,sk", [(300, 300), (200, 457), (700, 700)])
def test_text_prefill_estimator_equals_the_flashmask_copies_path(causal, sq, sk):
    """Without startend_row_indices the CPU estimator is the block log-sum-exp kernel; the
    FlashMask-copies path (any mask) gives the same log masses."""
    q, k = _qk(1, sq, sk, 4, 2, 16, seed=sq)
    rows = R.sampled_rows(sq, 8, 4)
    fast = R.block_log_mass(
        R._gather_rows(q, rows), k, R.sampled_limits(rows, sq, sk, causal), 128, 0.25
    ).numpy()
    slow = R._block_log_mass(q, k, None, causal, rows, 128, 0.25, "cpu")
    np.testing.assert_array_equal(np.isneginf(fast), np.isneginf(slow))
    fin = np.isfinite(slow)
    np.testing.assert_allclose(fast[fin], slow[fin], rtol=1e-5, atol=1e-5)


def test_importances_of_a_query_block_sum_to_one_when_every_sampled_row_sees_a_key():
    q, k = _qk(2, 700, 700, 4, 2, 16, seed=3)
    imp = R.block_importance(q, k, stride=16)
    np.testing.assert_allclose(imp.sum(-1), 1.0, atol=1e-6)


# ------------------------------------------------------------------------------------ selection
def _select(row, tau, forced=(), allowed=None):
    e = np.asarray(row, np.float64)[None, None, None, :]
    n = e.shape[-1]
    f = np.zeros((1, n), bool)
    f[0, list(forced)] = True
    a = np.ones((1, n), bool) if allowed is None else np.asarray(allowed, bool)[None]
    return np.nonzero(R.select_blocks(e, tau, a, f)[0, 0, 0])[0].tolist()


def test_top_tau_keeps_the_smallest_set_holding_the_forced_blocks():
    row = [0.10, 0.40, 0.05, 0.30, 0.15]
    # forced 0 (sink) and 4 (diagonal): 0.25; + 0.40 = 0.65; + 0.30 = 0.95
    assert _select(row, 0.25, forced=(0, 4)) == [0, 4]
    assert _select(row, 0.60, forced=(0, 4)) == [0, 1, 4]
    assert _select(row, 0.65, forced=(0, 4)) == [0, 1, 4]
    assert _select(row, 0.80, forced=(0, 4)) == [0, 1, 3, 4]
    assert _select(row, 0.99, forced=(0, 4)) == [0, 1, 2, 3, 4]
    # no forced block: the largest first
    assert _select([0.5, 0.3, 0.2], 0.5) == [0]
    assert _select([0.5, 0.3, 0.2], 0.51) == [0, 1]
    assert _select([0.2, 0.3, 0.5], 0.8) == [1, 2]


def test_top_tau_is_relative_to_the_row_total_and_skips_empty_and_disallowed_blocks():
    # a row whose sampled rows saw part of the mass: tau of 0.5 is 0.25
    assert _select([0.1, 0.25, 0.0, 0.15], 0.5) == [1]
    # zero-importance blocks are never added, even at tau close to 1
    assert _select([0.6, 0.0, 0.4, 0.0], 0.999999) == [0, 2]
    # disallowed blocks are never kept, forced or not
    assert _select([0.5, 0.5, 0.0], 0.99, forced=(2,), allowed=[1, 1, 0]) == [0, 1]
    # a row that saw nothing keeps every allowed block
    assert _select([0.0, 0.0, 0.0], 0.5, allowed=[1, 1, 0]) == [0, 1]
    assert _select([0.7, 0.2, 0.1], 1.0) == [0, 1, 2]


def test_block_structure_diagonal_sink_and_bottom_right_alignment():
    allowed, forced = R.block_structure(300, 300, 128, True, 1)
    np.testing.assert_array_equal(allowed, np.tril(np.ones((3, 3), bool)))
    np.testing.assert_array_equal(forced, [[1, 0, 0], [1, 1, 0], [1, 0, 1]])
    # 100 query rows at the end of 300 keys: rows see columns <= row + 200 (blocks 1 and 2)
    allowed, forced = R.block_structure(100, 300, 128, True, 0)
    np.testing.assert_array_equal(allowed, [[1, 1, 1]])
    np.testing.assert_array_equal(forced, [[0, 1, 1]])
    allowed, forced = R.block_structure(300, 300, 128, False, 2)
    assert allowed.all()
    np.testing.assert_array_equal(forced, [[1, 1, 0], [1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("mask_heads", ["head", "kv", "all"])
@pytest.mark.parametrize("sq,sk", [(700, 700), (300, 650)])
def test_masks_respect_causality_and_keep_diagonal_and_sink(mask_heads, sq, sk):
    b, h, hk = 2, 4, 2
    q, k = _qk(b, sq, sk, h, hk, 16, seed=sq, spread=3.0)
    allowed, forced = R.block_structure(sq, sk, _BLOCK, True, 1)
    for tau in (0.3, 0.7, 0.95):
        sel = R.rr_block_mask(q, k, causal=True, stride=8, tau=tau, mask_heads=mask_heads)
        m = sel.block_mask.numpy().astype(bool)
        assert m.shape == (b, {"head": h, "kv": hk, "all": 1}[mask_heads], *allowed.shape)
        assert not (m & ~allowed).any(), "a block above the causal diagonal is kept"
        assert (m | ~forced).all(), "a diagonal or sink block is dropped"
        assert sel.blocks_kept == m.sum() and sel.blocks_total == allowed.sum() * m.shape[1] * b
        assert 0 < sel.density <= 1 and sel.seconds >= 0


def test_selection_on_a_coarser_block_spreads_over_the_op_blocks():
    q, k = _qk(1, 1000, 1000, 4, 2, 16, seed=5, spread=3.0)
    sel = R.rr_block_mask(q, k, stride=16, tau=0.5, block=256, mask_heads="all")
    m = sel.block_mask.numpy()[0, 0].astype(bool)
    allowed, _ = R.block_structure(1000, 1000, _BLOCK, True, 0)
    coarse = np.zeros((4, 4), bool)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            coarse[i // 2, j // 2] |= m[i, j]
    expanded = coarse.repeat(2, 0).repeat(2, 1)[: m.shape[0], : m.shape[1]] & allowed
    np.testing.assert_array_equal(m, expanded)


@pytest.mark.parametrize("causal,kind", [(True, None), (True, "docs"), (False, None)])
def test_tau_one_keeps_every_allowed_block_and_equals_dense_attention(causal, kind):
    b, s, h, hk, d = 2, 400, 4, 2, 16
    q, k = _qk(b, s, s, h, hk, d, seed=11)
    v = paddle.to_tensor(np.random.default_rng(12).standard_normal((b, s, hk, d)), "float32")
    idx = (
        None
        if kind is None
        else paddle.to_tensor(masks.batched(masks.causal_document([90, 310]), b))
    )
    sel = R.rr_block_mask(q, k, idx, causal=causal, tau=1.0, mask_heads="head")
    allowed, _ = R.block_structure(s, s, _BLOCK, causal, 0)
    np.testing.assert_array_equal(sel.block_mask.numpy(), np.broadcast_to(allowed, (b, h, 4, 4)))
    assert sel.density == 1.0
    dense = flashmask_attention(q, k, v, idx, causal=causal, backend="cpu")
    sparse = flashmask_attention(
        q, k, v, idx, causal=causal, block_mask=sel.block_mask, backend="cpu"
    )
    np.testing.assert_allclose(sparse.numpy(), dense.numpy(), atol=1e-6, rtol=0)


def test_peaked_attention_keeps_few_blocks_and_stays_close_to_dense():
    """Every query attends mostly to one planted key block (and its own): a high tau keeps it, the
    kept share is small and the output is close to dense attention."""
    rng = np.random.default_rng(0)
    b, s, h, hk, d = 1, 1024, 4, 2, 16
    q = rng.standard_normal((b, s, h, d)).astype(np.float32) * 0.3
    k = rng.standard_normal((b, s, hk, d)).astype(np.float32) * 0.3
    direction = rng.standard_normal(d).astype(np.float32)
    q += 2.5 * direction
    k[:, 128:256] += 2.5 * direction  # key block 1 answers every query
    q, k = paddle.to_tensor(q), paddle.to_tensor(k)
    v = paddle.to_tensor(rng.standard_normal((b, s, hk, d)).astype(np.float32))
    sel = R.rr_block_mask(q, k, stride=16, tau=0.95, mask_heads="kv", dense_last=0, local_blocks=0)
    allowed, forced = R.block_structure(s, s, _BLOCK, True, 1)
    want = (forced | (np.arange(8) == 1)) & allowed  # diagonal, sink and the planted block
    np.testing.assert_array_equal(sel.block_mask.numpy(), np.broadcast_to(want, (1, hk, 8, 8)))
    assert sel.density == want.sum() / allowed.sum() < 0.6
    dense = flashmask_attention(q, k, v, causal=True, backend="cpu").numpy()
    sparse = flashmask_attention(q, k, v, causal=True, block_mask=sel.block_mask, backend="cpu")
    rel = np.linalg.norm(sparse.numpy() - dense) / np.linalg.norm(dense)
    assert rel < 0.1


@pytest.mark.parametrize("local", [0, 1, 2])
def test_local_blocks_keep_the_blocks_before_the_diagonal(local):
    allowed, forced = R.block_structure(700, 700, _BLOCK, True, 0, local_blocks=local)
    i, j = np.nonzero(allowed)
    np.testing.assert_array_equal(forced[i, j], (j >= i - local))
    q, k = _qk(1, 700, 700, 4, 2, 16, seed=2, spread=3.0)
    keep = R.rr_block_mask(q, k, tau=0.2, local_blocks=local, dense_last=0).block_mask.numpy()
    assert keep[0][:, forced].all()


@pytest.mark.parametrize("dense_last", [0, 1, 3])
@pytest.mark.parametrize("block", [128, 256])
def test_the_last_query_blocks_keep_every_allowed_block(dense_last, block):
    q, k = _qk(1, 1100, 1100, 4, 2, 16, seed=7, spread=3.0)
    sel = R.rr_block_mask(q, k, stride=16, tau=0.3, block=block, dense_last=dense_last)
    keep = sel.block_mask.numpy().astype(bool)[0]  # [2, 9, 9] on the op's 128 grid
    allowed, _ = R.block_structure(1100, 1100, _BLOCK, True, 0)
    nbq = -(-1100 // block)
    dense = np.arange(9) // (block // _BLOCK) >= nbq - dense_last  # op rows in the last blocks
    np.testing.assert_array_equal(
        keep[:, dense], np.broadcast_to(allowed[dense], keep[:, dense].shape)
    )
    assert not (keep & ~allowed).any()
    assert not keep[:, ~dense].all()  # the other rows stay sparse at tau 0.3


# -------------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(stride=24), "stride=24 must divide block=128"),
        (dict(stride=0), "stride=0"),
        (dict(tau=0.0), "tau=0.0 must lie in (0, 1]"),
        (dict(tau=1.5), "tau=1.5"),
        (dict(block=192), "block=192 must be a positive multiple of 128"),
        (dict(block=64, stride=8), "block=64"),
        (dict(mask_heads="layer"), "mask_heads='layer'"),
    ],
)
def test_bad_settings_raise_one_clear_error(kw, needle):
    q, k = _qk(1, 200, 200, 2, 1, 8)
    with pytest.raises(ValueError) as e:
        R.rr_block_mask(q, k, **{"stride": 16, "tau": 0.9, **kw})
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (
            dict(rr_stride=24),
            "model.attention.rr_stride=24 is invalid: allowed a divisor of rr_block",
        ),
        (dict(rr_stride=48, rr_block=256), "rr_stride=48"),
        (dict(rr_tau=0.0), "model.attention.rr_tau=0.0 is invalid: allowed 0 < rr_tau <= 1"),
        (dict(rr_tau=1.01), "rr_tau=1.01"),
        (dict(rr_block=100), "rr_block=100 is invalid: allowed a positive multiple of 128"),
        (dict(sparse_prefill="xattn"), "sparse_prefill='xattn'"),
        (dict(rr_mask_heads="layer"), "rr_mask_heads"),
        (dict(rr_sink_blocks=-1), "rr_sink_blocks"),
        (dict(rr_dense_last=-1), "rr_dense_last"),
        (dict(rr_local_blocks=-2), "rr_local_blocks"),
    ],
)
def test_bad_config_is_one_config_error_naming_the_field(kw, needle):
    with pytest.raises(ConfigError) as e:
        AttentionConfig(**kw).validate("model.attention")
    assert needle in str(e.value)


def test_good_config_validates():
    AttentionConfig(sparse_prefill="rr", rr_stride=32, rr_tau=1.0, rr_block=256).validate("a")


# ------------------------------------------------------------------------------ prefill hook
def _model(**att):
    from paddle_ernie5.model.model import Ernie5Model

    paddle.seed(0)
    cfg = ModelConfig(
        vocab_size=61,
        hidden_size=32,
        num_layers=2,
        max_seq_len=512,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, **att),
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, shared_expert_hidden=8),
    )
    return Ernie5Model(cfg)


def _batch(ids):
    b, s = ids.shape
    return {
        "input_ids": paddle.to_tensor(ids),
        "token_types": paddle.zeros([b, s], "int64"),
        "positions": paddle.arange(s, dtype="int64").reshape([1, 1, s]).expand([b, 3, s]),
        "startend_row_indices": None,
    }


def _selections(model):
    return [blk.attn.last_selection for blk in model.blocks]


def test_prefill_hook_runs_only_for_inference_forwards():
    model = _model(sparse_prefill="rr", rr_stride=8, rr_tau=0.5)
    batch = _batch(np.random.default_rng(0).integers(3, 61, size=(1, 400)))
    model.train()
    model(batch)  # training: gradients on
    assert _selections(model) == [None, None]
    with paddle.no_grad():
        model(batch)  # no gradients but training mode and no cache: still dense
        assert _selections(model) == [None, None]
        model.eval()
        model(batch)
    sel = _selections(model)
    assert all(s is not None and s.block_mask.shape == [1, 2, 4, 4] for s in sel)
    model(batch)  # eval mode with gradients on (e.g. a gradient probe): dense
    assert _selections(model) == [None, None]


def test_the_forced_sets_follow_the_config_fields():
    """model.attention.rr_dense_last / rr_local_blocks reach the selection: with both 0 and a
    small tau fewer blocks are kept than with the defaults (1 and 2)."""
    batch = _batch(np.random.default_rng(2).integers(3, 61, size=(1, 1024)))
    density = {}
    for forced in ((0, 0), (1, 2)):
        model = _model(
            sparse_prefill="rr", rr_tau=0.05, rr_dense_last=forced[0], rr_local_blocks=forced[1]
        )
        model.eval()
        with paddle.no_grad():
            model(batch)
        density[forced] = [s.block_mask.astype("float32").mean().item() for s in _selections(model)]
    assert all(a < b for a, b in zip(density[(0, 0)], density[(1, 2)])), density


def test_generation_with_tau_one_equals_dense_and_decode_stays_dense():
    from paddle_ernie5.model.generation import generate

    prompt = np.random.default_rng(1).integers(3, 61, size=(2, 300))
    dense = generate(_model(), prompt, 6, temperature=0.0)
    model = _model(sparse_prefill="rr", rr_tau=1.0)
    sparse = generate(model, prompt, 6, temperature=0.0)
    np.testing.assert_array_equal(sparse.tokens, dense.tokens)
    np.testing.assert_allclose(sparse.logprobs, dense.logprobs, atol=1e-5)
    # the last forward was a one-position decode step: dense, no selection
    assert _selections(model) == [None, None]


def test_generation_with_a_sparse_prefill_runs_and_reports_its_density():
    from paddle_ernie5.model.generation import generate

    model = _model(sparse_prefill="rr", rr_stride=8, rr_tau=0.3)
    prompt = np.random.default_rng(2).integers(3, 61, size=(1, 1200))
    picked = []
    for blk in model.blocks:
        blk.attn.register_forward_post_hook(
            lambda layer, inputs, out: picked.append(layer.last_selection)
        )
    out = generate(model, prompt, 3, temperature=0.0)
    assert out.tokens.shape == (1, 3)
    prefill = [s for s in picked if s is not None]
    assert len(prefill) == 2 and all(0 < s.density < 1 for s in prefill)
