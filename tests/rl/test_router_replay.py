"""Router replay: the training forward, forced to the experts recorded during rollout, reproduces
the rollout's log-probs even when the router itself would now choose differently."""

import numpy as np
import paddle
import pytest
from support import small_moe_config

from paddle_ernie5.model.generation import generate
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.rl.objectives import response_logp_entropy
from paddle_ernie5.rl.rollout import model_inputs

# Cached decoding and a full forward add the same numbers in a different order (attention over one
# query vs all); with identical routing they agree to float32 rounding, far below any routing
# change.
ROUNDING = 2e-6


@pytest.fixture(scope="module")
def rollout():
    paddle.seed(0)
    cfg = small_moe_config(61, experts=8, backend="reference")
    model = Ernie5Model(cfg)
    prompt = np.random.default_rng(0).integers(3, 61, size=(4, 5))
    sample = generate(model, prompt, 7, temperature=1.0, seed=3, record_routing=True)
    return model, prompt, sample


def _train_forward(model, prompt, sample, replay: bool):
    ids = np.concatenate([prompt, sample.tokens[:, :-1]], axis=1)
    forced = {i: paddle.to_tensor(v) for i, v in sample.routing.items()} if replay else None
    out = model(model_inputs(ids), with_mtp=False, router_replay=forced)
    logp, _ = response_logp_entropy(
        out.logits, sample.tokens, np.full(len(ids), prompt.shape[1]), 1.0
    )
    return logp.numpy(), out


def test_rollout_records_experts_of_every_moe_layer_and_position(rollout):
    model, prompt, sample = rollout
    assert sorted(sample.routing) == [1, 2]  # layer 0 is dense
    for ids in sample.routing.values():
        assert ids.shape == (4, prompt.shape[1] + sample.tokens.shape[1] - 1, 2)
        assert ids.min() >= 0 and ids.max() < 8
        assert (np.sort(ids, -1)[..., 0] != np.sort(ids, -1)[..., 1]).all()


def test_replayed_training_forward_reproduces_rollout(rollout):
    model, prompt, sample = rollout
    logp, out = _train_forward(model, prompt, sample, replay=True)
    np.testing.assert_allclose(logp, sample.logprobs, atol=ROUNDING, rtol=0)
    for i, stats in out.router_stats.items():
        b, s, k = sample.routing[i].shape
        np.testing.assert_array_equal(stats.topk_ids_TK.numpy().reshape(b, s, k), sample.routing[i])


def test_replay_holds_when_the_router_would_choose_differently(rollout):
    model, prompt, sample = rollout
    saved = {i: moe.router.selection_bias.numpy().copy() for i, moe in model.moe_layers()}
    try:
        # A selection-bias update between rollout and training (what aux-free balancing does every
        # step) changes which experts the router picks but not the combine weights of given experts.
        rng = np.random.default_rng(1)
        for _, moe in model.moe_layers():
            moe.router.selection_bias.set_value(
                paddle.to_tensor(rng.normal(0, 0.05, 8).astype("float32"))
            )
        free, out = _train_forward(model, prompt, sample, replay=False)
        changed = any(
            (
                np.sort(out.router_stats[i].topk_ids_TK.numpy().reshape(v.shape), -1)
                != np.sort(v, -1)
            ).any()
            for i, v in sample.routing.items()
        )
        assert changed and np.abs(free - sample.logprobs).max() > 100 * ROUNDING
        replayed, _ = _train_forward(model, prompt, sample, replay=True)
        np.testing.assert_allclose(replayed, sample.logprobs, atol=ROUNDING, rtol=0)
    finally:
        for i, moe in model.moe_layers():
            moe.router.selection_bias.set_value(paddle.to_tensor(saved[i]))


def test_forced_routing_keeps_gradients_to_the_router(rollout):
    model, prompt, sample = rollout
    ids = np.concatenate([prompt, sample.tokens[:, :-1]], axis=1)
    forced = {i: paddle.to_tensor(v) for i, v in sample.routing.items()}
    out = model(model_inputs(ids), with_mtp=False, router_replay=forced)
    out.logits.mean().backward()
    for _, moe in model.moe_layers():
        assert moe.router.weight.grad is not None and float(moe.router.weight.grad.abs().sum()) > 0
    model.clear_gradients()
