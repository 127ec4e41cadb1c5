"""Builders of FlashMask `startend_row_indices` (numpy int32, shape [Sk, C]).

Key column j masks query rows i in [LTS_j, LTE_j) and in [UTS_j, UTE_j); `causal=True` also masks
j > i + (Sk - Sq). The stored columns depend on the causal flag (FLASHMASK.md):

    causal  C  columns                 implied
    True    1  LTS                     LTE = Sq
    True    2  LTS, LTE
    False   2  LTS, UTE                LTE = Sq, UTS = 0
    False   4  LTS, LTE, UTS, UTE

Each builder says which causal flag its indices go with; BUILDERS maps a name to
(builder, causal). Lengths are in tokens; `seq_len` pads to a fixed length. Padding columns are
masked for every row, and padding rows see nothing (output 0), except in causal_blockwise where
the single LT range per column cannot hide the earlier blocks from padding rows. `batched` adds the
batch and head axes the op takes; `to_dense` expands indices into the boolean mask they mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def _finish(columns: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(c, dtype=np.int64) for c in columns], axis=-1).astype(np.int32)


def _padded_total(lens, seq_len: int | None) -> tuple[np.ndarray, int, int]:
    lens = np.asarray(lens, dtype=np.int64)
    if (lens <= 0).any():
        raise ValueError(f"segment lengths must be positive, got {lens.tolist()}")
    total = int(lens.sum())
    seq_len = total if seq_len is None else int(seq_len)
    if total > seq_len:
        raise ValueError(f"segments hold {total} tokens but seq_len is {seq_len}")
    return lens, total, seq_len


def full(seq_len: int) -> np.ndarray:
    """No masking (causal=False)."""
    return _finish([np.full(seq_len, seq_len), np.zeros(seq_len)])


def causal(seq_len: int) -> np.ndarray:
    """Plain causal attention (causal=True): only the causal triangle."""
    return _finish([np.full(seq_len, seq_len)])


def sliding_window(seq_len: int, window: int) -> np.ndarray:
    """Causal sliding window (causal=True): row i sees keys [i - window, i], as Paddle's
    window_size."""
    j = np.arange(seq_len)
    return _finish([np.minimum(j + window + 1, seq_len)])


def causal_document(doc_lens, seq_len: int | None = None) -> np.ndarray:
    """Packed causal documents (causal=True): column j of a document ending at e gets LTS = e.

    Padding columns after the last document are masked for every row (LTS = their own index)."""
    lens, total, seq_len = _padded_total(doc_lens, seq_len)
    lts = np.repeat(np.cumsum(lens), lens)
    return _finish([np.concatenate([lts, np.arange(total, seq_len)])])


def document(doc_lens, seq_len: int | None = None) -> np.ndarray:
    """Packed bidirectional documents (causal=False): [LTS, UTE] = [doc end, doc start]."""
    lens, total, seq_len = _padded_total(doc_lens, seq_len)
    ends = np.cumsum(lens)
    pad = seq_len - total
    lts = np.concatenate([np.repeat(ends, lens), np.zeros(pad)])
    ute = np.concatenate([np.repeat(ends - lens, lens), np.zeros(pad)])
    return _finish([lts, ute])


def share_question(question_len: int, answer_lens, seq_len: int | None = None) -> np.ndarray:
    """One prompt shared by several answers (DPO / reward models; causal=True).

    Each answer sees the question and itself, never another answer; the question columns are
    masked from the end of the sample on (padding rows)."""
    lens, total, seq_len = _padded_total([question_len, *answer_lens], seq_len)
    ends = np.cumsum(lens)
    lts = np.repeat(ends, lens)
    lts[:question_len] = total
    return _finish([np.concatenate([lts, np.arange(total, seq_len)])])


def global_sliding_window(seq_len: int, num_global: int, window: int) -> np.ndarray:
    """Bidirectional sliding window plus global tokens (causal=False, C=4).

    The first `num_global` tokens see and are seen by every token; any other pair (i, j) is
    visible when |i - j| <= window."""
    j = np.arange(seq_len)
    is_global = j < num_global
    lts = np.where(is_global, seq_len, np.minimum(j + window + 1, seq_len))
    lte = np.full(seq_len, seq_len)
    uts = np.where(is_global, 0, num_global)
    ute = np.where(is_global, 0, np.maximum(j - window, num_global))
    return _finish([lts, lte, uts, ute])


def causal_blockwise(block_lens, seq_len: int | None = None) -> np.ndarray:
    """In-context blocks (causal=True, C=2): each block is causal within itself and the last block
    sees every earlier block (structured prompting)."""
    lens, total, seq_len = _padded_total(block_lens, seq_len)
    ends = np.cumsum(lens)
    last_start = int(ends[-1] - lens[-1])
    lts = np.repeat(ends, lens)
    lte = np.where(np.arange(total) < last_start, last_start, seq_len)
    pad = np.arange(total, seq_len)
    return _finish([np.concatenate([lts, pad]), np.concatenate([lte, np.full(len(pad), seq_len)])])


def prefix_lm_causal(seq_len: int, prefix_len: int) -> np.ndarray:
    """Prefix LM (causal=False): the prefix is bidirectional, the rest causal."""
    j = np.arange(seq_len)
    return _finish([np.full(seq_len, seq_len), np.where(j < prefix_len, 0, j)])


def prefix_lm_document(doc_lens, prefix_lens, seq_len: int | None = None) -> np.ndarray:
    """Packed prefix-LM documents (causal=False): within each document its prefix is
    bidirectional and the rest causal; nothing crosses documents."""
    lens, total, seq_len = _padded_total(doc_lens, seq_len)
    prefix_lens = np.asarray(prefix_lens, dtype=np.int64)
    if prefix_lens.shape != lens.shape or (prefix_lens < 0).any() or (prefix_lens > lens).any():
        raise ValueError("prefix_lens must give one length in [0, doc len] per document")
    starts = np.cumsum(lens) - lens
    j = np.arange(total)
    start = np.repeat(starts, lens)
    in_prefix = j < start + np.repeat(prefix_lens, lens)
    pad = seq_len - total
    lts = np.concatenate([start + np.repeat(lens, lens), np.zeros(pad)])
    ute = np.concatenate([np.where(in_prefix, start, j), np.zeros(pad)])
    return _finish([lts, ute])


def qk_sparse(seq_len: int, query_range: tuple[int, int], key_range: tuple[int, int]) -> np.ndarray:
    """QK-sparse causal attention (causal=True, C=2): query rows [q0, q1) are dropped (they see
    no key) and key columns [k0, k1) are dropped (no row sees them)."""
    q0, q1 = query_range
    k0, k1 = key_range
    if not (0 <= q0 <= q1 <= seq_len and 0 <= k0 <= k1 <= seq_len):
        raise ValueError(f"ranges must lie in [0, {seq_len}]")
    j = np.arange(seq_len)
    dropped_key = (j >= k0) & (j < k1)
    lts = np.where(dropped_key, j, np.maximum(j, q0))
    lte = np.where(dropped_key, seq_len, np.where(np.maximum(j, q0) < q1, q1, lts))
    return _finish([lts, lte])


def random_eviction(seq_len: int, num_evicted: int, seed: int = 0) -> np.ndarray:
    """Random KV eviction (NACL-style; causal=True): `num_evicted` random keys are dropped from the
    cache at a random later step, after which no query sees them."""
    rng = np.random.default_rng(seed)
    lts = np.full(seq_len, seq_len)
    cols = rng.choice(seq_len, size=min(num_evicted, seq_len), replace=False)
    lts[cols] = rng.integers(cols + 1, seq_len + 1)
    return _finish([lts])


def scale_block_causal(scale_lens, seq_len: int | None = None) -> np.ndarray:
    """Next-scale prediction (causal=False): bidirectional inside a scale, causal to earlier scales.

    A causal text prefix is a run of scales of length 1."""
    lens, total, seq_len = _padded_total(scale_lens, seq_len)
    pad = seq_len - total
    lts = np.concatenate([np.full(total, total), np.zeros(pad)])
    ute = np.concatenate([np.repeat(np.cumsum(lens) - lens, lens), np.zeros(pad)])
    return _finish([lts, ute])


def frame_causal(
    num_frames: int, frame_len: int, window: int | None = None, seq_len: int | None = None
) -> np.ndarray:
    """Video (causal=False): bidirectional inside a frame, causal across frames, and a frame sees
    at most the `window` frames before it (None: all of them)."""
    total = num_frames * frame_len
    seq_len = total if seq_len is None else seq_len
    if total > seq_len:
        raise ValueError(f"{num_frames} frames of {frame_len} tokens exceed seq_len {seq_len}")
    frame = np.arange(total) // frame_len
    last_seen = np.minimum(frame + (num_frames if window is None else window) + 1, num_frames)
    pad = seq_len - total
    lts = np.concatenate([last_seen * frame_len, np.zeros(pad)])
    ute = np.concatenate([frame * frame_len, np.zeros(pad)])
    return _finish([lts, ute])


BUILDERS: dict[str, tuple[Callable[..., np.ndarray], bool]] = {
    "full": (full, False),
    "causal": (causal, True),
    "sliding_window": (sliding_window, True),
    "causal_document": (causal_document, True),
    "document": (document, False),
    "share_question": (share_question, True),
    "global_sliding_window": (global_sliding_window, False),
    "causal_blockwise": (causal_blockwise, True),
    "prefix_lm_causal": (prefix_lm_causal, False),
    "prefix_lm_document": (prefix_lm_document, False),
    "qk_sparse": (qk_sparse, True),
    "random_eviction": (random_eviction, True),
    "scale_block_causal": (scale_block_causal, False),
    "frame_causal": (frame_causal, False),
}


def batched(indices: np.ndarray, batch_size: int = 1) -> np.ndarray:
    """[Sk, C] -> [batch_size, 1, Sk, C], the layout the attention op takes."""
    return np.broadcast_to(indices[None, None], (batch_size, 1, *indices.shape)).copy()


def to_dense(indices: np.ndarray, causal: bool, seq_len_q: int | None = None) -> np.ndarray:
    """Boolean [..., Sq, Sk] mask, True where row i may attend column j, from [..., Sk, C]
    indices."""
    idx = np.asarray(indices, dtype=np.int64)
    sk, c = idx.shape[-2], idx.shape[-1]
    sq = sk if seq_len_q is None else seq_len_q
    rows = np.arange(sq)[:, None]

    def col(k):
        return np.expand_dims(idx[..., k], -2)  # [..., 1, Sk]

    if causal:
        lte = col(1) if c == 2 else sq
        masked = (rows >= col(0)) & (rows < lte)
    elif c == 2:
        masked = (rows >= col(0)) | (rows < col(1))
    else:
        masked = ((rows >= col(0)) & (rows < col(1))) | ((rows >= col(2)) & (rows < col(3)))
    allowed = ~masked
    if causal:
        allowed &= np.arange(sk)[None, :] <= rows + (sk - sq)
    return allowed
