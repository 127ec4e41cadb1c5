"""Packing: every array is compared with a token-by-token reference; the mask with a dense check."""

import numpy as np
import pytest

from paddle_ernie5.data.packing import IGNORE, pack_documents

PAD, BOS, EOS = 0, 2, 3


def reference_pack(docs, seq_len):
    """Token-by-token packing with the documented policy (continue across rows as a new segment)."""
    tokens, doc_of = [], []
    for k, d in enumerate(docs):
        tokens += [BOS] + list(d) + [EOS]
        doc_of += [k] * (len(d) + 2)
    n_rows = max(1, -(-len(tokens) // seq_len))
    ids = np.full((n_rows, seq_len), PAD)
    labels = np.full((n_rows, seq_len), IGNORE)
    pos = np.zeros((n_rows, seq_len), dtype=np.int64)
    seg = np.full((n_rows, seq_len), -1)  # segment number, -1 for padding
    s = -1
    for t, tok in enumerate(tokens):
        r, c = divmod(t, seq_len)
        new = c == 0 or doc_of[t] != doc_of[t - 1]
        s += new
        ids[r, c], seg[r, c] = tok, s
        pos[r, c] = 0 if new else pos[r, c - 1] + 1
        if t + 1 < len(tokens) and (t + 1) % seq_len != 0 and doc_of[t + 1] == doc_of[t]:
            labels[r, c] = tokens[t + 1]
    return ids, labels, pos, seg


def dense_allowed(sri_row, seq_len):
    """allowed[i, j] for causal FlashMask with one LTS column: j <= i and i < LTS[j]."""
    lts = sri_row[0, :, 0]
    i = np.arange(seq_len)[:, None]
    j = np.arange(seq_len)[None, :]
    return (j <= i) & (i < lts[None, :])


@pytest.mark.parametrize("seq_len", [7, 16, 64])
def test_matches_reference_and_mask_isolates_segments(seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [list(rng.integers(4, 1000, size=int(rng.integers(0, 40)))) for _ in range(30)]
    docs.append(list(range(4, 4 + 3 * seq_len)))  # longer than a row: spans several rows
    p = pack_documents(docs, seq_len, PAD)
    ids, labels, pos, seg = reference_pack(docs, seq_len)
    np.testing.assert_array_equal(p["input_ids"], ids)
    np.testing.assert_array_equal(p["labels"], labels)
    np.testing.assert_array_equal(p["positions"], pos)
    assert (p["token_types"] == 0).all()
    assert p["input_ids"].dtype == p["labels"].dtype == p["positions"].dtype == np.int64
    assert p["startend_row_indices"].dtype == np.int32
    assert p["startend_row_indices"].shape == (len(ids), 1, seq_len, 1)

    # Every token of every document appears exactly once, in order; only the last row is padded.
    total = sum(len(d) + 2 for d in docs)
    flat = p["input_ids"].reshape(-1)
    np.testing.assert_array_equal(flat[:total], np.concatenate([[BOS] + d + [EOS] for d in docs]))
    assert (flat[total:] == PAD).all() and flat.size - total < seq_len
    # Labels: the next token of the same segment; one ignored label per segment (its last token).
    n_segments = seg.max() + 1
    assert (p["labels"].reshape(-1)[:total] == IGNORE).sum() == n_segments

    for r in range(len(ids)):
        allowed = dense_allowed(p["startend_row_indices"][r], seq_len)
        same = (seg[r][:, None] == seg[r][None, :]) & (seg[r][:, None] >= 0)
        causal = np.tril(np.ones((seq_len, seq_len), dtype=bool))
        np.testing.assert_array_equal(allowed, same & causal)


def test_small_example_by_hand():
    p = pack_documents([[10, 11, 12], [20, 21, 22, 23, 24, 25], [30]], 8, PAD)
    np.testing.assert_array_equal(
        p["input_ids"], [[2, 10, 11, 12, 3, 2, 20, 21], [22, 23, 24, 25, 3, 2, 30, 3]]
    )
    np.testing.assert_array_equal(
        p["labels"], [[10, 11, 12, 3, -100, 20, 21, -100], [23, 24, 25, 3, -100, 30, 3, -100]]
    )
    np.testing.assert_array_equal(
        p["positions"], [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2]]
    )
    np.testing.assert_array_equal(p["startend_row_indices"][:, 0, :, 0], [[5] * 5 + [8] * 3] * 2)


def test_padding_is_fully_masked_and_ignored():
    p = pack_documents([[5, 6]], 8, PAD)
    np.testing.assert_array_equal(p["input_ids"], [[2, 5, 6, 3, 0, 0, 0, 0]])
    np.testing.assert_array_equal(p["labels"], [[5, 6, 3, -100, -100, -100, -100, -100]])
    allowed = dense_allowed(p["startend_row_indices"][0], 8)
    assert not allowed[4:].any() and not allowed[:, 4:].any()
    empty = pack_documents([], 8, PAD)
    assert empty["input_ids"].shape == (1, 8) and (empty["labels"] == IGNORE).all()
