import math

import numpy as np
import paddle

from paddle_ernie5.rl import objectives as O
from paddle_ernie5.rl.hints import QueryStats, hint_fraction, hint_length


def test_grpo_advantages():
    adv = O.grpo_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-5)  # mean 0.5, std 0.5
    np.testing.assert_array_equal(adv[1], 0)


def test_icepop_mask_by_hand():
    rollout = np.log(np.array([[0.5, 0.5, 0.2, 0.9]]))
    old = np.log(np.array([[0.5, 0.2, 0.9, 0.3]]))  # ratios 1, 0.4, 4.5, 0.333
    valid = np.array([[True, True, True, False]])
    m = O.icepop_mask(old, rollout, valid, low=0.5, high=5.0)
    np.testing.assert_array_equal(m, [[True, False, True, False]])
    m = O.icepop_mask(old, rollout, valid, low=0.3, high=2.0)
    np.testing.assert_array_equal(m, [[True, True, False, False]])


def test_gspo_ratio_and_clipping_by_hand():
    new = paddle.to_tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    old = paddle.to_tensor([[-1.2, -2.1, -2.0], [-0.5, -0.4, -1.0]])
    mask = paddle.to_tensor([[True, True, False], [True, True, False]])
    r = O.gspo_ratio(new, old, mask).numpy()
    # row 0: kept diffs 0.2, 0.1 -> exp(0.15); the masked third token (diff -1) does not count
    # row 1: kept diffs 0, -0.1 -> exp(-0.05)
    np.testing.assert_allclose(r, [math.exp(0.15), math.exp(-0.05)], rtol=1e-6)
    empty = O.gspo_ratio(new, old, paddle.zeros([2, 3], dtype="bool")).numpy()
    np.testing.assert_allclose(empty, [1.0, 1.0])

    ratio = paddle.to_tensor([1.1, 0.8, 1.1, 0.8], stop_gradient=False)
    adv = np.array([1.0, -1.0, -1.0, 1.0], np.float32)
    out = O.gspo_loss(ratio, adv, np.ones(4), np.ones(4, bool), clip_low=0.1, clip_high=0.05)
    # per sequence: -min(rA, clip(r)A): -1.05, +0.9, +1.1, -0.8 -> mean 0.0375
    np.testing.assert_allclose(float(out.loss), (-1.05 + 0.9 + 1.1 - 0.8) / 4, rtol=1e-6)
    assert out.clip_high_frac == 0.25 and out.clip_low_frac == 0.25
    out.loss.backward()  # clipped sequences carry no gradient, unclipped ones carry -A/4
    np.testing.assert_allclose(ratio.grad.numpy(), [0.0, 0.0, 0.25, -0.25], atol=1e-7)


def test_wpsm_weights_by_hand():
    acc = np.array([0.9, 0.9, 0.5, 0.95])
    ent = np.array([0.1, 0.5, 0.1, 0.29])
    w = O.wpsm_weights(acc, ent, tau=0.8, eta=0.3, alpha=0.25)
    np.testing.assert_allclose(w, [0.75, 1.0, 1.0, 0.75])


def test_k3_kl_and_entropy():
    new = paddle.to_tensor([[-1.0, -2.0]])
    ref = paddle.to_tensor([[-1.5, -2.0]])
    kl = float(O.k3_kl(new, ref, paddle.to_tensor([[True, True]])))
    np.testing.assert_allclose(kl, (math.exp(-0.5) + 0.5 - 1) / 2, rtol=1e-6)
    logits = paddle.zeros([1, 3, 4])  # uniform over 4 -> entropy log 4
    logp, ent = O.response_logp_entropy(logits, np.array([[1, 2]]), np.array([2]), 1.0)
    np.testing.assert_allclose(logp.numpy(), np.log(0.25), rtol=1e-6)
    np.testing.assert_allclose(ent.numpy(), np.log(4), rtol=1e-6)


def test_ahrl_hint_schedule():
    assert hint_fraction(0.5, 0.1, 0, 0.3) == 0.5
    np.testing.assert_allclose(hint_fraction(0.5, 0.1, 10, 0.3), 0.5 * math.exp(-0.3))
    assert hint_length(0.5, 4) == 2 and hint_length(1.0, 4) == 3 and hint_length(0.2, 4) == 0
    stats = QueryStats()
    assert stats.hint("q", 5, 0.5, 0.1, below=0.2) == 0.0  # never tried: no hint yet
    stats.update("q", [0, 0, 0, 1])  # pass_init 0.25, but below 0.3 -> hinted
    np.testing.assert_allclose(
        stats.hint("q", 4, 0.5, 0.1, below=0.3), 0.5 * math.exp(-0.1 * 4 * 0.25)
    )
    stats.update("q", [1, 1, 1, 1])  # running accuracy 5/8 -> passes -> no hint
    assert stats.hint("q", 4, 0.5, 0.1, below=0.3) == 0.0 and stats.accuracy("q") == 5 / 8
    restored = QueryStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.get("q") == stats.get("q")
