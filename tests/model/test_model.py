import os
import re

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import AttentionConfig, ModelConfig, MoEConfig
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.params import count_params
from paddle_ernie5.model.rope import apply_rope, axis_of_pair, rope_cos_sin
from paddle_ernie5.ops.masks import causal_document

PKG = os.path.join(os.path.dirname(__file__), "..", "..", "paddle_ernie5")


def _cfg(**kw):
    base = dict(
        vocab_size=97,
        hidden_size=32,
        num_layers=3,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
        moe=MoEConfig(
            num_experts=6, top_k=2, expert_hidden=16, shared_expert_hidden=8, first_dense_layers=1
        ),
    )
    base.update(kw)
    return ModelConfig(**base)


def _batch(ids, doc_lens):
    b, s = ids.shape
    pos = np.zeros([b, 3, s], np.int64)
    idx = np.zeros([b, 1, s, 1], np.int32)
    for i, lens in enumerate(doc_lens):
        p = np.concatenate([np.arange(n) for n in lens] + [np.zeros(s - sum(lens), np.int64)])
        pos[i] = p
        idx[i, 0] = causal_document(lens, s)
    return {
        "input_ids": paddle.to_tensor(ids),
        "token_types": paddle.zeros([b, s], "int64"),
        "positions": paddle.to_tensor(pos),
        "startend_row_indices": paddle.to_tensor(idx),
    }


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"tie_embeddings": True},
        {"num_mtp_modules": 0},
        {"moe": MoEConfig(num_experts=4, top_k=4, num_shared_experts=0)},
    ],
)
def test_num_params_equals_sum_of_parameter_sizes_and_the_analytic_count(kw):
    model = Ernie5Model(_cfg(**kw))
    total = sum(int(np.prod(p.shape)) for p in model.parameters())
    assert model.num_params() == total
    assert count_params(model.cfg)["total"] == total


def test_activated_params_are_total_minus_idle_experts_embedding_and_mtp():
    model = Ernie5Model(_cfg())
    p = count_params(model.cfg)
    expert = 3 * 32 * 16
    mtp = sum(int(np.prod(q.shape)) for q in model.mtp.parameters())
    idle = 2 * (6 - 2) * expert  # two MoE layers, 4 of 6 experts idle per token
    assert p["activated"] == model.num_params() - 97 * 32 - idle - mtp


def test_documents_do_not_see_each_other():
    """Changing tokens of the first packed document leaves the second document's logits
    unchanged."""
    paddle.seed(0)
    model = Ernie5Model(_cfg())
    model.eval()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 97, size=(1, 20))
    out_a = model(_batch(ids, [[7, 13]]))
    ids2 = ids.copy()
    ids2[0, :7] = rng.integers(0, 97, size=7)
    out_b = model(_batch(ids2, [[7, 13]]))
    np.testing.assert_allclose(out_a.logits.numpy()[0, 7:], out_b.logits.numpy()[0, 7:], atol=1e-5)
    assert np.abs(out_a.logits.numpy()[0, :7] - out_b.logits.numpy()[0, :7]).max() > 1e-3
    # ... and a document placed second gives the same logits as the same document alone.
    alone = model(_batch(ids[:, 7:], [[13]]))
    np.testing.assert_allclose(out_a.logits.numpy()[0, 7:], alone.logits.numpy()[0], atol=1e-4)


def test_uni_rope_with_equal_axes_is_1d_rope():
    d, s = 16, 11
    pairs_per_axis = np.bincount(axis_of_pair(d, (0.25, 0.375, 0.375)), minlength=3)
    assert sorted(pairs_per_axis.tolist()) == [2, 3, 3]
    pos = paddle.to_tensor(np.tile(np.arange(s), (1, 3, 1)))
    cos, sin = rope_cos_sin(pos, d, 1e6, (0.25, 0.375, 0.375))
    x = paddle.randn([1, s, 2, d])
    got = apply_rope(x, cos, sin).numpy()
    inv = 1.0 / (1e6 ** (np.arange(0, d, 2) / d))
    ang = np.arange(s)[:, None] * inv[None]
    xn = x.numpy()
    x1, x2 = xn[..., : d // 2], xn[..., d // 2 :]
    c, sn = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    want = np.concatenate([x1 * c - x2 * sn, x2 * c + x1 * sn], -1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_rope_is_relative_in_every_axis():
    """q.k after rotation depends only on the position difference, axis by axis."""
    d = 12
    q, k = paddle.randn([1, 1, 1, d]), paddle.randn([1, 1, 1, d])

    def dot(pq, pk):
        cq, sq = rope_cos_sin(
            paddle.to_tensor(np.array(pq).reshape(1, 3, 1)), d, 100.0, (0.25, 0.375, 0.375)
        )
        ck, sk = rope_cos_sin(
            paddle.to_tensor(np.array(pk).reshape(1, 3, 1)), d, 100.0, (0.25, 0.375, 0.375)
        )
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert dot([3, 5, 7], [1, 2, 3]) == pytest.approx(dot([12, 9, 4], [10, 6, 0]), abs=1e-4)
    assert dot([3, 5, 7], [1, 2, 3]) != pytest.approx(dot([3, 5, 7], [1, 3, 3]), abs=1e-4)


def test_model_code_never_imports_paddle_distributed():
    offenders = []
    for root, _, files in os.walk(os.path.join(PKG, "model")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(root, name), encoding="utf-8").read()
                if re.search(r"paddle\.distributed|from paddle import distributed", text):
                    offenders.append(name)
    assert offenders == []
