"""Each mask builder against a brute-force definition of the pattern it names."""

import numpy as np
import paddle
import pytest

from paddle_ernie5.ops import masks
from paddle_ernie5.ops.flashmask import dense_allowed_mask


def brute(n, rule):
    return np.array([[bool(rule(i, j)) for j in range(n)] for i in range(n)])


def segment_ids(lens, n):
    ids = np.full(n, -1)
    ids[: sum(lens)] = np.repeat(np.arange(len(lens)), lens)
    return ids


def starts_of(lens):
    return np.cumsum(lens) - np.asarray(lens)


CASES = {
    "full": (lambda: masks.full(9), lambda i, j: True),
    "causal": (lambda: masks.causal(9), lambda i, j: j <= i),
    "sliding_window": (lambda: masks.sliding_window(11, 3), lambda i, j: i - 3 <= j <= i),
    "causal_document": (
        lambda: masks.causal_document([3, 4, 2], 11),
        lambda i, j: (s := segment_ids([3, 4, 2], 11))[i] == s[j] >= 0 and j <= i,
    ),
    "document": (
        lambda: masks.document([3, 4, 2], 11),
        lambda i, j: (s := segment_ids([3, 4, 2], 11))[i] == s[j] >= 0,
    ),
    "share_question": (
        lambda: masks.share_question(3, [2, 4], 11),
        lambda i, j: (
            j <= i < 9 and (j < 3 or segment_ids([3, 2, 4], 11)[i] == segment_ids([3, 2, 4], 11)[j])
        ),
    ),
    "global_sliding_window": (
        lambda: masks.global_sliding_window(12, 2, 2),
        lambda i, j: i < 2 or j < 2 or abs(i - j) <= 2,
    ),
    "causal_blockwise": (
        lambda: masks.causal_blockwise([3, 2, 4], 9),
        lambda i, j: (
            j <= i
            and (
                segment_ids([3, 2, 4], 9)[i] == 2
                or segment_ids([3, 2, 4], 9)[i] == segment_ids([3, 2, 4], 9)[j]
            )
        ),
    ),
    "prefix_lm_causal": (lambda: masks.prefix_lm_causal(10, 4), lambda i, j: j < 4 or j <= i),
    "prefix_lm_document": (
        lambda: masks.prefix_lm_document([5, 4], [2, 0], 11),
        lambda i, j: (
            (s := segment_ids([5, 4], 11))[i] == s[j] >= 0
            and (j <= i or j < starts_of([5, 4])[s[j]] + [2, 0][s[j]])
        ),
    ),
    "qk_sparse": (
        lambda: masks.qk_sparse(10, (4, 6), (1, 3)),
        lambda i, j: j <= i and not 4 <= i < 6 and not 1 <= j < 3,
    ),
    "scale_block_causal": (
        lambda: masks.scale_block_causal([1, 2, 4], 9),
        lambda i, j: i < 7 and (s := segment_ids([1, 2, 4], 9))[j] <= s[i] and s[j] >= 0,
    ),
    "frame_causal": (
        lambda: masks.frame_causal(4, 3, 1, 13),
        lambda i, j: i < 12 and j < 12 and 0 <= i // 3 - j // 3 <= 1,
    ),
    "frame_causal_unbounded": (lambda: masks.frame_causal(3, 2), lambda i, j: j // 2 <= i // 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_builder_matches_definition(name):
    build, rule = CASES[name]
    idx = build()
    causal = masks.BUILDERS[name.replace("_unbounded", "")][1]
    n = idx.shape[0]
    assert idx.dtype == np.int32 and idx.ndim == 2
    assert idx.shape[1] in ((1, 2) if causal else (2, 4))
    assert idx.min() >= 0 and idx.max() <= n
    np.testing.assert_array_equal(masks.to_dense(idx, causal), brute(n, rule))


def test_random_eviction_hides_keys_after_their_eviction_step():
    idx = masks.random_eviction(40, 10, seed=3)
    dense = masks.to_dense(idx, causal=True)
    evicted = np.flatnonzero(idx[:, 0] < 40)
    assert len(evicted) == 10
    for j in evicted:
        t = idx[j, 0]
        assert t > j
        assert dense[j:t, j].all() and not dense[t:, j].any()
    assert np.array_equal(masks.random_eviction(40, 10, seed=3), idx)


def test_causal_document_keeps_packer_format():
    idx = masks.causal_document([2, 3], 7)
    assert idx.tolist() == [[2], [2], [5], [5], [5], [5], [6]]


@pytest.mark.parametrize("name", sorted(masks.BUILDERS))
def test_to_dense_agrees_with_paddle_dense_mask(name):
    build, causal = masks.BUILDERS[name]
    idx = CASES[name][0]() if name in CASES else build(37, 9, seed=1)
    batch = masks.batched(idx, 2)
    assert batch.shape == (2, 1, *idx.shape)
    got = dense_allowed_mask(paddle.to_tensor(batch), idx.shape[0], idx.shape[0], causal).numpy()
    np.testing.assert_array_equal(got, masks.to_dense(batch, causal))


def test_to_dense_bottom_right_causal_when_lengths_differ():
    dense = masks.to_dense(masks.causal(5), causal=True, seq_len_q=3)
    assert dense.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_builders_reject_bad_lengths():
    with pytest.raises(ValueError, match="seq_len"):
        masks.causal_document([4, 4], 6)
    with pytest.raises(ValueError, match="positive"):
        masks.document([3, 0])
    with pytest.raises(ValueError, match="prefix_lens"):
        masks.prefix_lm_document([3, 3], [4, 1])
