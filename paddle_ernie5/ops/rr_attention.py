"""RRAttention block selection: the key blocks each query block computes in a block-sparse prefill.

Legend: B batch, S query rows, T key columns, H query heads, K kv heads, G = H / K, D head dim,
N sampled rows per head (one per stride of `stride` query rows), Q query blocks and J key blocks of
`block` rows/columns, M heads of the returned mask (H, K or 1).

    q_BSHD ─ round-robin rows ─> N rows per head ─ x every key (causal / document mask) ─>
      log-mass of each key block per sampled row, lse_BHJN  (one FlashMask call, see below)
    ─ normalise over key blocks, mean over the strides of each query block ─> importance_BHQJ
    ─ mean over the heads that share a mask ─> importance_BMQJ
    ─ top-tau per (b, m, query block), plus the diagonal and sink blocks ─> block_mask

Sampling (round-robin): stride i holds query rows [i*stride, (i+1)*stride); head h samples its row
i*stride + (i + h) mod stride. The offset rotates with the stride index, so heads 0..H-1 sample H
different rows of every stride (all of them when H >= stride) and every head visits every offset
of the stride over `stride` consecutive strides. A row past the last query row (a partial last
stride) is replaced by the last row.

Estimator (exact for the sampled rows): for head h and sampled row r, m_h(r, j) is the softmax
mass that row's attention gives the visible keys of key block j (0 for a row that sees no key);
importance_h(I, j) is the mean of m_h(r, j) over the sampled rows of query block I (one per stride
of the block), so each sampled row weighs the same and a query block's importances sum to 1 (less
when some sampled row sees no key). With the mask heads "kv" or "all" the importances of the heads
sharing a mask are averaged (the round-robin offsets of those heads then cover the stride
together). RRAttention's description gives the aggregation at stride level and an O(L^2/S^2)
selection but not its kernel; here the sampled rows are scored against every key, O(L^2 D / S)
multiply-adds. Causal or full attention without startend_row_indices (a text prefill) on the CPU
backend takes one call of `flashmask_block_lse_cpu` (custom_ops/flashmask/block_lse.cc): the
sampled rows' scores against the keys of each block they can see, reduced to the block's
log-sum-exp, scores only. Any other FlashMask structure, or another backend, takes one call of
the FlashMask op: each sampled row is repeated once per key block it can see, a block mask
restricts copy j to key block j, and the op's per-row log-sum-exp is then the log of the block's
unnormalised mass (its values are computed too and thrown away). The causal and document
structure (startend_row_indices) is carried over to the copies as column ranges, so masked and
future keys count exactly as in attention, and the op skips them as it does there.

Selection (adaptive top-tau): per (b, m, query block) the kept set starts with the forced blocks
(the diagonal block(s), those holding the block's own positions, and the `local_blocks` before
them; the first `sink_blocks` key blocks, attention sinks; in the last `dense_last` query blocks,
every block) and adds key blocks in decreasing importance until the kept importance reaches tau
times the block's total (up to float64 rounding): the smallest set holding the forced blocks that
reaches tau. Blocks of zero importance are never added. tau = 1 keeps every block the mask allows
(every causally visible key has a positive weight, so no smaller set holds all the mass) without
estimating; a query block whose sampled rows see nothing keeps every block too. Blocks wholly
above the causal diagonal are never kept. A `block` larger than the op's 128 selects on the
coarser grid and spreads each choice over its 128 x 128 op blocks.

Two forced sets are not in RRAttention's description (config fields `model.attention.rr_dense_last`
and `rr_local_blocks`). The last query block (dense_last, default DENSE_LAST_BLOCKS = 1) is dense
because its last rows are what a prefill is read for (the next token's logits; the answer of a
scored prompt), and one query's needs are invisible to the sampled rows: in a passkey prompt only
the final row attends to the needle, so the strides' other rows rate the needle's block low and
top-tau drops it (retrieval fell from 8/8 to 7/8 keys at 4K and tau 0.9 without it); it costs about
2/Q of a causal prefill's blocks. The `local_blocks` (default LOCAL_BLOCKS = 2) key blocks before
each diagonal are the recent context next-token prediction leans on, which a stride's sampled rows
estimate poorly when many keys share the mass: at 16K positions and tau 0.7 they took
long_context_tiny's perplexity from +2.2% to +0.1% of dense attention's, for 42% instead of 40% of
the blocks.

`rr_block_mask` is the entry point; `block_importance_reference` is the dense pure-Paddle
computation of the same importances (O(S T) memory), for tests and small inputs, and
`block_log_mass_reference` that of the block log-sum-exp kernel. The estimator's FlashMask call
runs on the given backend: the CPU op, or the dense reference; Paddle's GPU kernel adds its own
block_mask conditions (see ops/flashmask.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import paddle

from .flashmask import _BLOCK as OP_BLOCK
from .flashmask import (
    _cpu_op,
    default_indices,
    dense_allowed_mask,
    flashmask_attention,
    per_query_head,
    resolve_backend,
)

MASK_HEADS = ("head", "kv", "all")
# The last query block of a prefill keeps every allowed block (module docstring, Selection).
DENSE_LAST_BLOCKS = 1
LOCAL_BLOCKS = 2  # key blocks before the diagonal always kept (a local window; Selection)
# A kept importance within this relative distance below tau * total counts as reaching it (sums of
# float64 importances are not exact: 0.1 + 0.15 + 0.4 != 0.65).
_ROUNDING = 1e-9


@dataclass(frozen=True)
class RRSelection:
    """A block selection. `block_mask` [B, M, ceil(S/128), ceil(T/128)] int32 in FlashMask's
    format; the counts are over the 128 x 128 blocks the causal structure allows (all blocks
    without causal), summed over the batch and mask heads; `seconds`: the selection's wall time."""

    block_mask: paddle.Tensor
    blocks_kept: int
    blocks_total: int
    seconds: float

    @property
    def density(self) -> float:
        """Fraction of the allowed blocks that are computed."""
        return self.blocks_kept / max(self.blocks_total, 1)


def check_settings(stride: int, tau: float, block: int, mask_heads: str = "kv") -> None:
    """ValueError for settings the selection cannot use (the config checks the same)."""
    if block < OP_BLOCK or block % OP_BLOCK:
        raise ValueError(
            f"RRAttention block={block} must be a positive multiple of {OP_BLOCK}, the FlashMask "
            "block_mask granularity"
        )
    if stride < 1 or block % stride:
        raise ValueError(
            f"RRAttention stride={stride} must divide block={block} (each query block holds whole "
            "strides); choose e.g. 8, 16 or 32"
        )
    if not 0 < tau <= 1:
        raise ValueError(f"RRAttention tau={tau} must lie in (0, 1]")
    if mask_heads not in MASK_HEADS:
        raise ValueError(f"RRAttention mask_heads={mask_heads!r}: choose one of {MASK_HEADS}")


def sampled_rows(sq: int, stride: int, num_heads: int) -> np.ndarray:
    """[H, N] int64: the query row each head samples in each stride (round-robin, see the module
    docstring); non-decreasing along N."""
    i = np.arange(-(-sq // stride))
    offset = (i[None, :] + np.arange(num_heads)[:, None]) % stride
    return np.minimum(i * stride + offset, sq - 1)


def _count_below(rows_HN: np.ndarray, values) -> np.ndarray:
    """For each head h, how many of rows_HN[h] are < value: values [..., H, X] -> same shape (one
    searchsorted over all heads: each head's rows are shifted into a range of their own)."""
    h, n = rows_HN.shape
    span = int(max(rows_HN.max(), np.max(values), 0)) + 2
    shift = (np.arange(h, dtype=np.int64) * span)[:, None]
    flat = (rows_HN + shift).ravel()
    v = np.clip(np.asarray(values, np.int64), -1, span - 1) + shift
    return np.searchsorted(flat, v, side="left") - np.arange(h)[:, None] * n


def _row_ranges(idx, causal: bool, rows_HN: np.ndarray, sq: int, sk: int):
    """The key columns' masked query rows in sampled-row coordinates: two ranges [a0, a1) and
    [b0, b1) per (b, h, column), as int64 arrays [B|1, H, T] (the FlashMask ranges of
    startend_row_indices mapped through the sorted sampled rows, plus the causal one)."""
    h, n = rows_HN.shape
    cols = np.arange(sk)
    empty = np.full([1, h, sk], n, np.int64)
    if idx is None:
        a0 = a1 = b0 = empty
        if causal:
            b0 = np.zeros_like(empty)
    else:
        v = idx.numpy().astype(np.int64).transpose(0, 1, 3, 2)  # [B, h', C, T]
        if v.shape[1] != h:
            v = np.repeat(v, h // v.shape[1], axis=1)
        cnt = _count_below(rows_HN, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # [B, H, C, T]
        c = cnt.shape[2]
        if causal:
            a0 = cnt[:, :, 0]
            a1 = cnt[:, :, 1] if c == 2 else np.full_like(a0, n)
            b0 = np.zeros_like(a0)
        elif c == 2:
            a0, a1 = cnt[:, :, 0], np.full_like(cnt[:, :, 0], n)
            b0, b1 = np.zeros_like(a0), cnt[:, :, 1]
        else:
            a0, a1, b0, b1 = (cnt[:, :, i] for i in range(4))
    if causal:  # bottom-right aligned: row r sees columns <= r + (sk - sq)
        b1 = _count_below(rows_HN, np.broadcast_to(cols - (sk - sq), (h, sk)))[None]
    elif idx is None:
        b1 = empty
    return a0, a1, b0, b1


def _block_log_mass(q, k, idx, causal, rows_HN, block, scale, backend) -> np.ndarray:
    """lse_BHJN: log of sum over the visible keys c of key block j of exp(scale q_r.k_c), for each
    head and sampled row r = rows_HN[h, n]; -inf where the row sees no key of the block."""
    b, sq, h, d = q.shape
    sk = k.shape[1]
    n = rows_HN.shape[1]
    n_pad = -(-n // OP_BLOCK) * OP_BLOCK
    nbj = -(-sk // block)
    nbk_op = -(-sk // OP_BLOCK)
    # Copy j holds the sampled rows that can see key block j: with causal, rows from the first
    # (over heads) whose position reaches the block's first column, rounded down to whole blocks.
    start = np.zeros(nbj, np.int64)
    if causal:
        first_col = np.arange(nbj) * block - (sk - sq)
        start = _count_below(rows_HN, np.broadcast_to(first_col, (h, nbj))).min(axis=0)
        start = np.minimum(start // OP_BLOCK * OP_BLOCK, n_pad)
    length = n_pad - start
    base = np.concatenate([[0], np.cumsum(length)])  # first row of copy j
    total = int(base[-1])
    if total == 0:
        return np.full([b, h, nbj, n], -np.inf)
    # q_rep[b, r, h] = q[b, rows_HN[h, n_r], h] for the copies' rows r
    copy_of_r = np.repeat(np.arange(nbj), length)
    n_of_r = np.arange(total) - base[copy_of_r] + start[copy_of_r]
    flat = rows_HN[:, np.minimum(n_of_r, n - 1)].T * h + np.arange(h)  # [R, H] into S * H rows
    flat = flat[None] + (np.arange(b) * sq * h)[:, None, None]
    q_rep = paddle.gather(q.reshape([b * sq * h, d]), paddle.to_tensor(flat.ravel()))
    q_rep = q_rep.reshape([b, total, h, d])
    # Column c of key block j masks, in copy j, the rows whose sampled row is masked for c.
    a0, a1, b0, b1 = _row_ranges(idx, causal, rows_HN, sq, sk)
    j_of_c = np.arange(sk) // block
    lo, hi = start[j_of_c], n_pad

    def place(x):
        return base[j_of_c] + np.clip(x, lo, hi) - lo

    bshape = (max(a0.shape[0], b1.shape[0], b0.shape[0], a1.shape[0]), h, sk)
    ranges = [np.broadcast_to(place(x), bshape) for x in (a0, a1, b0, b1)]
    idx_rep = np.stack(ranges, axis=-1).astype(np.int32)
    if idx_rep.shape[0] != b:
        idx_rep = np.broadcast_to(idx_rep, (b, *idx_rep.shape[1:]))
    blocks = np.zeros([total // OP_BLOCK, nbk_op], np.int32)
    per_block = block // OP_BLOCK
    copy_of_qblock = copy_of_r[::OP_BLOCK]
    for o in range(per_block):  # the op blocks of one selection block (a handful)
        col = copy_of_qblock * per_block + o
        ok = col < nbk_op
        blocks[np.nonzero(ok)[0], col[ok]] = 1
    _, lse = flashmask_attention(
        q_rep,
        k,
        k,  # the values are not read back: only the log-sum-exp is used
        paddle.to_tensor(np.ascontiguousarray(idx_rep)),
        causal=False,
        return_softmax_lse=True,
        softmax_scale=scale,
        block_mask=paddle.to_tensor(
            np.ascontiguousarray(np.broadcast_to(blocks, (b, 1, *blocks.shape)))
        ),
        backend=backend,
    )
    lse = lse.numpy().astype(np.float64)  # [B, H, total]
    lse = np.where(np.isinf(lse), -np.inf, lse)  # the op's +inf: no visible key
    jj, nn = np.meshgrid(np.arange(nbj), np.arange(n), indexing="ij")
    r = base[jj] + nn - start[jj]
    valid = nn >= start[jj]
    out = lse[:, :, np.where(valid, r, 0)]  # [B, H, J, N]
    return np.where(valid, out, -np.inf)


def sampled_limits(rows_HN: np.ndarray, sq: int, sk: int, causal: bool) -> np.ndarray:
    """[H, N] int32: the last key column each sampled row sees (bottom-right aligned causal), or
    the last column of all without causal."""
    if not causal:
        return np.full(rows_HN.shape, sk - 1, np.int32)
    return (rows_HN + (sk - sq)).astype(np.int32)


def _gather_rows(q_BSHD, rows_HN: np.ndarray):
    """q_BHND float32: head h's query rows rows_HN[h] (one gather)."""
    b, sq, h, d = q_BSHD.shape
    n = rows_HN.shape[1]
    flat = (rows_HN * h + np.arange(h)[:, None])[None] + (np.arange(b) * sq * h)[:, None, None]
    q = q_BSHD.astype("float32").reshape([b * sq * h, d])
    return paddle.gather(q, paddle.to_tensor(flat.ravel())).reshape([b, h, n, d])


def block_log_mass(q_BHND, k_BTKD, limit_HN: np.ndarray, block: int, scale: float):
    """lse_BHJN (float32 tensor) from the CPU kernel: per row n of head h and key block j, the log
    of sum over the columns c <= limit_HN[h, n] of block j of exp(scale q.k_c); -inf for none."""
    k = k_BTKD.astype("float32")
    return _cpu_op().flashmask_block_lse_cpu(
        q_BHND if q_BHND.is_contiguous() else q_BHND.contiguous(),
        k if k.is_contiguous() else k.contiguous(),
        paddle.to_tensor(np.ascontiguousarray(limit_HN, np.int32)),
        int(block),
        float(scale),
    )


def block_log_mass_reference(q_BHND, k_BTKD, limit_HN: np.ndarray, block: int, scale: float):
    """`block_log_mass` in pure Paddle (dense scores of every row against every key)."""
    b, h, n, d = q_BHND.shape
    t, hk = k_BTKD.shape[1], k_BTKD.shape[2]
    k = k_BTKD.astype("float32").transpose([0, 2, 1, 3]).repeat_interleave(h // hk, axis=1)
    scores = paddle.matmul(q_BHND.astype("float32"), k, transpose_y=True) * scale  # [B, H, N, T]
    nbj = -(-t // block)
    visible = np.arange(t)[None, None, :] <= np.asarray(limit_HN)[:, :, None]  # [H, N, T]
    visible = np.concatenate([visible, np.zeros([h, n, nbj * block - t], bool)], axis=-1)
    pad = paddle.full([b, h, n, nbj * block - t], float("-inf"))
    scores = paddle.concat([scores, pad], axis=-1)
    seen = paddle.to_tensor(visible)
    scores = paddle.where(seen, scores, paddle.full_like(scores, -np.inf))
    scores = scores.reshape([b, h, n, nbj, block])
    top = scores.max(axis=-1, keepdim=True)
    top = paddle.where(paddle.isfinite(top), top, paddle.zeros_like(top))
    # Paddle's CPU exp(-inf) is a tiny positive number, not 0: mask the terms explicitly.
    terms = paddle.where(
        seen.reshape([1, h, n, nbj, block]).expand(scores.shape),
        paddle.exp(scores - top),
        paddle.zeros_like(scores),
    )
    mass = terms.sum(axis=-1)
    lse = paddle.where(
        mass > 0, paddle.log(mass) + top.squeeze(-1), paddle.full_like(mass, -np.inf)
    )
    return lse.transpose([0, 1, 3, 2])


def _to_importance(log_mass_BHJN: np.ndarray, sq: int, stride: int, block: int) -> np.ndarray:
    """Per-row softmax over key blocks, then the mean over the strides of each query block."""
    top = log_mass_BHJN.max(axis=2, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    w = np.exp(log_mass_BHJN - top)
    z = w.sum(axis=2, keepdims=True)
    mass = np.divide(w, z, out=np.zeros_like(w), where=z > 0)  # rows seeing nothing: 0
    b, h, nbj, n = mass.shape
    per = block // stride
    nbq = -(-sq // block)
    padded = np.zeros([b, h, nbj, nbq * per])
    padded[..., :n] = mass
    count = np.minimum(per, n - np.arange(nbq) * per)
    return padded.reshape(b, h, nbj, nbq, per).sum(-1).transpose(0, 1, 3, 2) / count[:, None]


def block_importance(
    q_BSHD,
    k_BSKD,
    startend_row_indices=None,
    *,
    causal: bool = True,
    stride: int = 16,
    block: int = OP_BLOCK,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """importance_BHQJ (float64): the estimator of the module docstring through the FlashMask op
    (`backend` as in ops/flashmask.py)."""
    b, sq, h, d = q_BSHD.shape
    rows = sampled_rows(sq, stride, h)
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    if startend_row_indices is None and resolve_backend(backend, q_BSHD) == "cpu":
        limit = sampled_limits(rows, sq, k_BSKD.shape[1], causal)
        lse = block_log_mass(_gather_rows(q_BSHD, rows), k_BSKD, limit, block, scale)
        log_mass = lse.numpy().astype(np.float64)
    else:
        log_mass = _block_log_mass(
            q_BSHD, k_BSKD, startend_row_indices, causal, rows, block, scale, backend
        )
    return _to_importance(log_mass, sq, stride, block)


def block_importance_reference(
    q_BSHD,
    k_BSKD,
    startend_row_indices=None,
    *,
    causal: bool = True,
    stride: int = 16,
    block: int = OP_BLOCK,
    softmax_scale: float | None = None,
) -> np.ndarray:
    """The same importances from the dense attention probabilities of every query row (pure
    Paddle, O(S T) memory)."""
    b, sq, h, d = q_BSHD.shape
    sk, hk = k_BSKD.shape[1], k_BSKD.shape[2]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    q = q_BSHD.astype("float32").transpose([0, 2, 1, 3])
    k = k_BSKD.astype("float32").transpose([0, 2, 1, 3]).repeat_interleave(h // hk, axis=1)
    scores = paddle.matmul(q, k, transpose_y=True) * scale
    idx = startend_row_indices
    if idx is None:
        idx = default_indices(b, sq, sk, causal)
    allowed = per_query_head(dense_allowed_mask(idx, sq, sk, causal), h)
    allowed = paddle.broadcast_to(allowed, scores.shape)
    scores = paddle.where(allowed, scores, paddle.full_like(scores, float("-inf")))
    top = scores.max(axis=-1, keepdim=True)
    top = paddle.where(paddle.isfinite(top), top, paddle.zeros_like(top))
    p = paddle.where(allowed, paddle.exp(scores - top), paddle.zeros_like(scores))
    z = p.sum(axis=-1, keepdim=True)
    probs = (p / paddle.where(z > 0, z, paddle.ones_like(z))).numpy().astype(np.float64)
    rows = sampled_rows(sq, stride, h)
    picked = np.take_along_axis(probs, rows[None, :, :, None], axis=2)  # [B, H, N, T]
    nbj = -(-sk // block)
    padded = np.zeros([*picked.shape[:3], nbj * block])
    padded[..., :sk] = picked
    mass = padded.reshape(*picked.shape[:3], nbj, block).sum(-1)  # [B, H, N, J]
    with np.errstate(divide="ignore"):
        log_mass = np.log(mass.transpose(0, 1, 3, 2))
    return _to_importance(log_mass, sq, stride, block)


def block_structure(
    sq: int, sk: int, block: int, causal: bool, sink_blocks: int, dense_last=0, local_blocks=0
):
    """(allowed_QJ, forced_QJ) bool on the `block` grid: blocks holding some causally visible
    (query, key) pair (all blocks without causal), and the blocks always kept: those holding the
    query block's own positions (bottom-right aligned) and the `local_blocks` key blocks before
    them, the first `sink_blocks` key blocks, and every allowed block of the last `dense_last`
    query blocks."""
    nbq, nbj = -(-sq // block), -(-sk // block)
    off = sk - sq
    first = np.arange(nbq) * block + off
    last = np.minimum((np.arange(nbq) + 1) * block, sq) - 1 + off
    j = np.arange(nbj)[None, :]
    allowed = j * block <= last[:, None] if causal else np.ones([nbq, nbj], bool)
    diag = (j >= np.clip(first, 0, sk - 1)[:, None] // block - local_blocks) & (
        j <= np.clip(last, 0, sk - 1)[:, None] // block
    )
    last = np.arange(nbq)[:, None] >= nbq - dense_last
    forced = (diag | (j < sink_blocks) | last) & allowed
    return allowed, forced


def select_blocks(importance_BMQJ: np.ndarray, tau: float, allowed_QJ, forced_QJ) -> np.ndarray:
    """bool [B, M, Q, J]: per (b, m, query block) the forced blocks plus key blocks in decreasing
    importance until the kept importance reaches tau times the total (module docstring)."""
    allowed = np.broadcast_to(allowed_QJ, importance_BMQJ.shape)
    forced = np.broadcast_to(forced_QJ, importance_BMQJ.shape)
    e = np.where(allowed, importance_BMQJ, 0.0)
    if tau >= 1:
        return allowed.copy()
    prio = np.where(forced, np.inf, np.where(allowed, e, -np.inf))
    order = np.argsort(-prio, axis=-1, kind="stable")
    e_sorted = np.take_along_axis(e, order, axis=-1)
    before = np.cumsum(e_sorted, axis=-1) - e_sorted
    total = e.sum(axis=-1, keepdims=True)
    keep_sorted = np.take_along_axis(forced, order, axis=-1) | (
        (before < tau * total * (1 - _ROUNDING)) & (e_sorted > 0)
    )
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(total > 0, keep, allowed) & allowed


def _mask_heads(importance_BHQJ: np.ndarray, mask_heads: str, kv_heads: int) -> np.ndarray:
    b, h, nbq, nbj = importance_BHQJ.shape
    if mask_heads == "head":
        return importance_BHQJ
    groups = kv_heads if mask_heads == "kv" else 1
    return importance_BHQJ.reshape(b, groups, h // groups, nbq, nbj).mean(axis=2)


def rr_block_mask(
    q_BSHD,
    k_BSKD,
    startend_row_indices=None,
    *,
    causal: bool = True,
    stride: int = 16,
    tau: float = 0.9,
    block: int = OP_BLOCK,
    mask_heads: str = "kv",
    sink_blocks: int = 1,
    dense_last: int = DENSE_LAST_BLOCKS,
    local_blocks: int = LOCAL_BLOCKS,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> RRSelection:
    """RRAttention's block mask for attention of q [B, S, H, D] over k [B, T, K, D] with the given
    FlashMask structure (see the module docstring). mask_heads: "head" one mask per query head,
    "kv" one per kv head (its query heads' importances averaged), "all" one for every head.
    dense_last: the last query blocks that keep every allowed block; local_blocks: key blocks
    before the diagonal that every query block keeps."""
    t0 = time.perf_counter()
    check_settings(stride, tau, block, mask_heads)
    b, sq, h = q_BSHD.shape[:3]
    sk, hk = k_BSKD.shape[1], k_BSKD.shape[2]
    m = {"head": h, "kv": hk, "all": 1}[mask_heads]
    allowed, forced = block_structure(sq, sk, block, causal, sink_blocks, dense_last, local_blocks)
    if tau >= 1:
        keep = np.broadcast_to(allowed, (b, m, *allowed.shape))
    else:
        importance = block_importance(
            q_BSHD,
            k_BSKD,
            startend_row_indices,
            causal=causal,
            stride=stride,
            block=block,
            softmax_scale=softmax_scale,
            backend=backend,
        )
        keep = select_blocks(_mask_heads(importance, mask_heads, hk), tau, allowed, forced)
    per = block // OP_BLOCK
    nbq_op, nbk_op = -(-sq // OP_BLOCK), -(-sk // OP_BLOCK)
    keep_op = keep.repeat(per, axis=2).repeat(per, axis=3)[:, :, :nbq_op, :nbk_op]
    allowed_op, _ = block_structure(sq, sk, OP_BLOCK, causal, 0)
    keep_op = keep_op & allowed_op
    return RRSelection(
        block_mask=paddle.to_tensor(np.ascontiguousarray(keep_op, dtype=np.int32)),
        blocks_kept=int(keep_op.sum()),
        blocks_total=int(allowed_op.sum()) * b * m,
        seconds=time.perf_counter() - t0,
    )
