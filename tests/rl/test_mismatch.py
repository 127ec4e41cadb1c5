"""Training-inference mismatch metrics (rl/diagnostics.py) on a tiny MoE model: rollouts sampled
with the KV cache and recorded routing, scored by the training forward with router replay on and
off, on-policy and deliberately off-policy (a perturbed router bias, stale weights, another top-k).
"""

import numpy as np
import paddle
import pytest
from support import small_moe_config

from paddle_ernie5.model.generation import generate
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.view import FULL_VIEW, ElasticView
from paddle_ernie5.rl import diagnostics as D
from paddle_ernie5.rl.objectives import icepop_mask
from paddle_ernie5.rl.prompts import Prompt
from paddle_ernie5.rl.rollout import (
    Rollout,
    build_batch,
    forward_logp,
    perturb_router_bias,
    snapshot,
)

ROUNDING = 2e-6  # as tests/rl/test_router_replay.py: same routing, float32 summation order only
PAD = 0


def _cfg():
    return small_moe_config(61, experts=8, backend="reference")


@pytest.fixture(scope="module")
def policy():
    paddle.seed(0)
    model = Ernie5Model(_cfg())
    model.eval()
    return model


def _copy(model, state=None):
    other = Ernie5Model(model.cfg)
    other.set_state_dict(
        {k: paddle.to_tensor(v) for k, v in (state or snapshot(model, 0).state).items()}
    )
    other.eval()
    return other


def _rollouts(sampler, view=FULL_VIEW, groups=3, g=4):
    """`groups` queries x g responses sampled by `sampler`, as the trainer's rollouts."""
    rng = np.random.default_rng(0)
    out = []
    for q in range(groups):
        prompt = np.broadcast_to(rng.integers(3, 61, size=5 + q), (g, 5 + q))
        s = generate(sampler, prompt, 6, temperature=1.0, seed=q, record_routing=True, view=view)
        out.append(
            Rollout(
                None,
                Prompt(np.asarray(prompt[0], np.int64), 0),
                s.tokens,
                s.logprobs,
                s.lengths,
                np.zeros(g, np.float32),
                s.routing,
                0,
            )
        )
    return out


def _metrics(trainer_model, rollouts, replay: bool) -> dict:
    batch = build_batch(rollouts, PAD)
    with paddle.no_grad():
        logp, ent, out = forward_logp(trainer_model, batch, 1.0, replay)
    valid = batch.valid_BN
    mask = icepop_mask(logp.numpy(), batch.rollout_logp_BN, valid, 0.5, 5.0)
    return {
        **D.logp_gap(logp.numpy(), batch.rollout_logp_BN, valid),
        **D.routing_mismatch(trainer_model, out, batch),
        "icepop/masked_frac": D.masked_fraction(mask, valid),
        **D.response_stats(ent.numpy(), valid),
    }


def test_on_policy_rollouts_have_no_mismatch(policy):
    rollouts = _rollouts(policy)
    for replay in (True, False):
        m = _metrics(policy, rollouts, replay)
        assert m["mismatch/dlogp_max"] < ROUNDING, (replay, m)
        assert m["router/differ_frac"] == m["router/would_differ_frac"] == 0, (replay, m)
        assert m["icepop/masked_frac"] == 0
        assert m["entropy"] > 0 and 1 <= m["response_length"] <= 6


def test_reported_choice_is_the_routers_own_top_k(policy):
    """The router's reported own choice (chosen_ids_TK) is what it picks when nothing is replayed,
    and under replay it is still the router's top-k of score + selection bias, not the replayed
    ids (with a non-zero selection bias, so the bias is taken into account)."""
    model = _copy(policy)
    rng = np.random.default_rng(5)
    for _, moe in model.moe_layers():
        moe.router.selection_bias.set_value(paddle.to_tensor(rng.normal(0, 0.05, 8), "float32"))
    batch = build_batch(_rollouts(policy), PAD)
    with paddle.no_grad():
        _, _, out = forward_logp(model, batch, 1.0, replay=False)
    routers = dict(model.moe_layers())
    for i, stats in out.router_stats.items():
        np.testing.assert_array_equal(stats.chosen_ids_TK.numpy(), stats.topk_ids_TK.numpy())
        scores = paddle.nn.functional.softmax(stats.logits_TE, axis=-1)
        select = (scores + routers[i].router.selection_bias).numpy()
        top2 = np.sort(np.argsort(-select, axis=-1, kind="stable")[:, :2], -1)
        np.testing.assert_array_equal(np.sort(stats.chosen_ids_TK.numpy(), -1), top2)
    with paddle.no_grad():  # replay ids that are not the router's choice: reported choice stays
        _, _, replayed = forward_logp(model, batch, 1.0, replay=True)
    for i, stats in replayed.router_stats.items():
        np.testing.assert_array_equal(
            stats.chosen_ids_TK.numpy(), out.router_stats[i].chosen_ids_TK.numpy()
        )


def test_perturbed_router_rollouts(policy):
    """Rollouts whose router bias was perturbed (rl.rollout_router_noise): without replay the
    training forward routes differently and its log-probs differ; with replay the experts used
    are the rollout's (0 differ by construction) and the log-probs match to rounding, while the
    router's own choice still differs (would_differ)."""
    noisy = _copy(policy, perturb_router_bias(snapshot(policy, 0), 0.05, seed=1).state)
    rollouts = _rollouts(noisy)
    off = _metrics(policy, rollouts, replay=False)
    on = _metrics(policy, rollouts, replay=True)
    assert off["router/differ_frac"] == off["router/would_differ_frac"] > 0.2, off
    assert off["router/differ_pair_frac"] > 0.1 and off["mismatch/dlogp_mean"] > 100 * ROUNDING
    assert on["router/differ_frac"] == on["router/differ_pair_frac"] == 0, on
    assert on["router/would_differ_frac"] > 0.2, on
    assert on["mismatch/dlogp_max"] < ROUNDING, on
    assert on["mismatch/dlogp_mean"] < off["mismatch/dlogp_mean"] / 100
    assert on["kl/rollout"] < off["kl/rollout"]


def test_stale_rollouts(policy):
    """Rollouts from older weights (rl.rollout_staleness): the log-prob gap grows with how far the
    weights moved; replay removes the routing part of it but not the rest."""
    gaps = {}
    for scale in (0.0, 0.01, 0.05):
        rng = np.random.default_rng(2)
        state = {
            k: (v + rng.normal(0, scale, v.shape).astype(v.dtype)) if v.dtype == np.float32 else v
            for k, v in snapshot(policy, 0).state.items()
        }
        rollouts = _rollouts(_copy(policy, state))
        gaps[scale] = {r: _metrics(policy, rollouts, r) for r in (True, False)}
    for replay in (True, False):
        means = [gaps[s][replay]["mismatch/dlogp_mean"] for s in (0.0, 0.01, 0.05)]
        assert means[0] < ROUNDING < means[1] < means[2], (replay, means)
        assert gaps[0.05][replay]["kl/rollout"] > gaps[0.01][replay]["kl/rollout"]
    assert gaps[0.05][True]["router/differ_frac"] == 0
    assert gaps[0.05][False]["router/differ_frac"] > 0


def test_rollouts_with_another_top_k_never_route_like_the_trainer(policy):
    """rl.rollout_top_k=1 on a top-2 model: every used position's expert set differs unless the
    training forward replays the rollout's single expert."""
    rollouts = _rollouts(policy, view=ElasticView(top_k=1))
    assert all(ids.shape[-1] == 1 for r in rollouts for ids in r.routing.values())
    off = _metrics(policy, rollouts, replay=False)
    assert off["router/differ_frac"] == 1 and off["mismatch/dlogp_mean"] > 100 * ROUNDING
    on = _metrics(policy, rollouts, replay=True)
    assert on["router/differ_frac"] == 0 and on["router/would_differ_frac"] == 1
    assert on["mismatch/dlogp_max"] < ROUNDING


def test_icepop_masked_fraction_by_hand():
    rollout = np.log(np.array([[0.5, 0.5, 0.2, 0.9, 0.4], [0.1, 0.6, 0.3, 0.3, 0.5]]))
    # ratios train / rollout: row 0: 1, 0.4, 4.5, 0.333, (1.5, padding); row 1: 7, 1, 0.5, 3, (0.2)
    train = np.log(np.array([[0.5, 0.2, 0.9, 0.3, 0.6], [0.7, 0.6, 0.15, 0.9, 0.1]]))
    valid = np.array([[True, True, True, True, False], [True, True, True, True, False]])
    mask = icepop_mask(train, rollout, valid, low=0.5, high=5.0)
    # dropped: row 0 -> 0.4 and 0.333; row 1 -> 7; ratio 0.5 is kept (bound inclusive)
    assert D.masked_fraction(mask, valid) == 3 / 8
    gap = D.logp_gap(train, rollout, valid)
    d = np.log([1, 0.4, 4.5, 0.3 / 0.9, 7, 1, 0.5, 3])
    assert gap["mismatch/dlogp_max"] == pytest.approx(np.log(7))
    assert gap["mismatch/dlogp_mean"] == pytest.approx(np.abs(d).mean())
    assert gap["kl/rollout"] == pytest.approx((np.exp(d) - d - 1).mean())


def test_routing_differ_counts_tokens_and_pairs():
    used = np.array([[False, True, True, True]])
    rollout = {1: np.array([[[0, 1], [0, 1], [2, 3], [4, 5]]]), 2: np.array([[[0, 1]] * 4])}
    now = {
        1: np.array([[[7, 7], [1, 0], [2, 4], [4, 5]]]),  # position 0 unused; 2 differs
        2: np.array([[[0, 1], [0, 1], [0, 1], [0, 2]]]),  # position 3 differs
    }
    tokens, pairs = D.routing_differ(now, rollout, used)
    assert tokens == 2 / 3 and pairs == 2 / 6
