"""SimReg (model/losses.simreg_loss): a naive per-pair reference, the no-positive case, its effect
on hidden states under gradient steps, anchor sampling and document ids."""

import math

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import ConfigError
from paddle_ernie5.data.packing import pack_documents
from paddle_ernie5.model.losses import IGNORE, document_ids, sample_anchors, simreg_loss


def _naive(hidden, labels, docs, anchors, tau):
    """Per-pair loops: for every anchor with a positive,
    -mean_p log(exp(s_ap) / sum_c exp(s_ac))."""
    losses = []
    for b in range(hidden.shape[0]):
        unit = hidden[b] / np.linalg.norm(hidden[b], axis=-1, keepdims=True)
        for a in anchors[b]:
            if a < 0:
                continue
            cands = [
                j
                for j in range(hidden.shape[1])
                if j != a and labels[b, j] != IGNORE and docs[b, j] == docs[b, a]
            ]
            pos = [j for j in cands if labels[b, j] == labels[b, a]]
            if not pos:
                continue
            sim = {j: float(unit[a] @ unit[j]) / tau for j in cands}
            log_z = math.log(sum(math.exp(v) for v in sim.values()))
            losses.append(-sum(sim[p] - log_z for p in pos) / len(pos))
    return sum(losses), len(losses)


def _run(hidden, labels, docs, anchors, tau):
    s, n = simreg_loss(
        paddle.to_tensor(hidden),
        paddle.to_tensor(labels),
        paddle.to_tensor(docs),
        paddle.to_tensor(anchors),
        tau,
    )
    return float(s), float(n)


def test_matches_a_naive_per_pair_computation():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 9, 6)).astype("float32")
    labels = np.array(
        [[5, 3, 5, 5, IGNORE, 3, 7, 3, 5], [2, 2, IGNORE, 4, 2, 4, 4, 9, IGNORE]], dtype=np.int64
    )
    docs = np.array(
        [
            [4, 4, 4, 4, 4, 9, 9, 9, 9],  # two documents: 3 and 5 recur across the boundary
            [9, 9, 9, 9, 9, 9, 9, 9, 9],
        ],
        dtype=np.int32,
    )
    anchors = np.array([[0, 1, 2, 5, 6, 8], [0, 3, 4, 7, -1, -1]], dtype=np.int64)
    want_sum, want_n = _naive(hidden, labels, docs, anchors, 0.3)
    got_sum, got_n = _run(hidden, labels, docs, anchors, 0.3)
    # anchors 6 (only label 7 in its document) and 7 of row 1 (9) have no positive
    assert want_n == 6
    assert got_n == want_n
    assert got_sum == pytest.approx(want_sum, rel=1e-5)


def test_no_positives_gives_zero_loss_and_zero_finite_gradients():
    hidden = paddle.to_tensor(
        np.random.default_rng(1).normal(size=(1, 6, 4)).astype("float32"), stop_gradient=False
    )
    labels = paddle.to_tensor(np.array([[1, 2, 3, IGNORE, 4, 5]], dtype=np.int64))
    docs = paddle.to_tensor(np.zeros((1, 6), dtype=np.int32))
    anchors = paddle.to_tensor(np.array([[0, 1, 2, 4, 5, -1]], dtype=np.int64))
    total, count = simreg_loss(hidden, labels, docs, anchors, 0.1)
    total.backward()
    assert float(total) == 0.0 and float(count) == 0.0
    grad = hidden.grad.numpy()
    assert np.isfinite(grad).all() and not grad.any()


def test_same_label_pairs_across_documents_are_not_positives():
    hidden = np.random.default_rng(2).normal(size=(1, 4, 3)).astype("float32")
    labels = np.array([[8, 6, 8, 6]], dtype=np.int64)
    anchors = np.array([[0, 1, 2, 3]], dtype=np.int64)
    assert _run(hidden, labels, np.array([[0, 0, 1, 1]], np.int32), anchors, 0.1)[1] == 0.0
    assert _run(hidden, labels, np.zeros((1, 4), np.int32), anchors, 0.1)[1] == 4.0


def test_gradient_steps_decrease_it_and_pull_same_label_states_together():
    rng = np.random.default_rng(3)
    labels_np = np.array([[0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]], dtype=np.int64)
    hidden = paddle.create_parameter(
        [1, 12, 8],
        "float32",
        default_initializer=paddle.nn.initializer.Assign(
            rng.normal(size=(1, 12, 8)).astype("float32")
        ),
    )
    labels, docs = paddle.to_tensor(labels_np), paddle.to_tensor(np.zeros((1, 12), np.int32))
    anchors = paddle.to_tensor(np.arange(12, dtype=np.int64)[None])
    same = labels_np[0][:, None] == labels_np[0][None, :]
    off_diag = ~np.eye(12, dtype=bool)

    def cos_gap():
        unit = hidden.numpy()[0] / np.linalg.norm(hidden.numpy()[0], axis=-1, keepdims=True)
        c = unit @ unit.T
        return c[same & off_diag].mean() - c[~same].mean()

    opt = paddle.optimizer.SGD(learning_rate=0.5, parameters=[hidden])
    losses, gap0 = [], cos_gap()
    for _ in range(40):
        total, count = simreg_loss(hidden, labels, docs, anchors, 0.5)
        loss = total / count
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.clear_grad()
    assert losses[-1] < losses[0] - 0.3
    assert cos_gap() > gap0 + 0.4  # same-label states now far more alike than different-label ones


def test_anchor_sampling_is_seeded_and_uses_only_targets():
    labels = np.full((3, 40), IGNORE, dtype=np.int64)
    labels[0, ::2] = 1  # 20 targets
    labels[1, :5] = 2  # 5 targets: all taken, then -1 padding
    a = sample_anchors(labels, 8, np.random.default_rng([1234, 7, 0]))
    b = sample_anchors(labels, 8, np.random.default_rng([1234, 7, 0]))
    c = sample_anchors(labels, 8, np.random.default_rng([1234, 8, 0]))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (3, 8)
    assert len(set(a[0])) == 8 and all(labels[0, j] != IGNORE for j in a[0])
    np.testing.assert_array_equal(a[1], [0, 1, 2, 3, 4, -1, -1, -1])
    assert (a[2] == -1).all()


def test_document_ids_separate_packed_documents():
    packed = pack_documents([[5, 6, 7], [8, 9], [10, 11, 12, 13]], seq_len=8, pad_id=0)
    ids = document_ids(packed["startend_row_indices"])
    # Row 0 holds doc 0 (5 tokens with bos/eos) and the start of doc 1;
    # positions restart per segment.
    segment = np.cumsum(packed["positions"] == 0, axis=1)
    for r in range(ids.shape[0]):
        real = packed["labels"][r] != IGNORE
        for i in np.flatnonzero(real):
            for j in np.flatnonzero(real):
                assert (ids[r, i] == ids[r, j]) == (segment[r, i] == segment[r, j])


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.simreg.temperature=0", "train.simreg.temperature=0.0 is invalid: allowed > 0"),
        ("train.simreg.weight=-1", "train.simreg.weight=-1.0 is invalid: allowed >= 0"),
        ("train.simreg.max_anchors=0", "train.simreg.max_anchors=0 is invalid: allowed >= 1"),
    ],
)
def test_bad_simreg_values_are_config_errors(debug_config, override, needle):
    with pytest.raises(ConfigError) as err:
        debug_config(override)
    assert needle in str(err.value)
