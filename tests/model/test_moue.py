"""Mixture of Universal Experts (model/universal.py): one expert pool shared by every MoE layer."""

import dataclasses

import numpy as np
import paddle
import pytest
from support import small_moe_config

from paddle_ernie5.config import ConfigError, ModelConfig
from paddle_ernie5.config.model import UniversalConfig
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.params import count_params, universal_pool_params
from paddle_ernie5.model.universal import (
    balance_stats,
    balance_targets,
    exposure,
    layer_windows,
)
from paddle_ernie5.model.view import ElasticView

VOCAB = 97


def universal_config(experts=8, layers=4, window=4, stride=2, **universal) -> ModelConfig:
    """small_moe_config (first layer dense, top-2) with a universal pool."""
    cfg = small_moe_config(VOCAB, layers=layers, experts=experts)
    uni = UniversalConfig(enabled=True, window=window, stride=stride, **universal)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, universal=uni))
    cfg.validate("model")
    return cfg


def batch(b=2, s=12, seed=0):
    rng = np.random.default_rng(seed)
    pos = np.broadcast_to(np.arange(s), (b, 3, s)).astype(np.int64)
    return {
        "input_ids": paddle.to_tensor(rng.integers(0, VOCAB, [b, s])),
        "token_types": paddle.zeros([b, s], dtype="int64"),
        "positions": paddle.to_tensor(pos.copy()),
        "startend_row_indices": paddle.full([b, 1, s, 1], s, dtype="int32"),
    }


def model_of(cfg, seed=0):
    paddle.seed(seed)
    model = Ernie5Model(cfg)
    model.eval()
    return model


# ------------------------------------------------------------------------------ topology


@pytest.mark.parametrize(
    "experts,layers,window,stride,starts",
    [
        (8, 4, 4, 2, ()),
        (12, 5, 6, 3, ()),
        (8, 3, 8, 0, ()),
        (9, 4, 5, 4, ()),
        (8, 4, 3, 0, (5, 0, 2)),
    ],
)
def test_rotational_windows_are_documented_and_cover_the_pool(
    experts, layers, window, stride, starts
):
    cfg = universal_config(experts, layers, window, stride, starts=starts)
    windows = layer_windows(cfg)
    assert sorted(windows) == list(range(1, layers))  # the first layer is dense
    for j, (_, ids) in enumerate(sorted(windows.items())):
        start = starts[j] if starts else (j * (stride or window // 2)) % experts
        np.testing.assert_array_equal(ids, (start + np.arange(window)) % experts)
    assert set(np.concatenate(list(windows.values())).tolist()) == set(range(experts))
    exp = exposure(windows, experts)
    assert exp.sum() == (layers - 1) * window and exp.min() >= 1


def test_windows_that_miss_experts_are_one_clear_error():
    with pytest.raises(ConfigError, match=r"model\.moe\.universal\.window=4.*never reached"):
        universal_config(experts=16, layers=3, window=4, stride=2)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"window": 1}, r"universal\.window=1 is invalid"),
        ({"window": 9}, r"universal\.window=9 is invalid"),
        ({"stride": -1}, r"universal\.stride=-1 is invalid"),
        ({"starts": (0, 8, 1)}, r"universal\.starts=\[0, 8, 1\] is invalid"),
        ({"starts": (0, 4)}, r"universal\.starts=\[0, 4\] is invalid.*one start per MoE layer"),
        ({"trajectory_dim": -2}, r"universal\.trajectory_dim=-2 is invalid"),
        ({"balance": "global"}, r"universal\.balance='global' is invalid"),
        ({"open_decay": 1.5}, r"universal\.open_decay=1\.5 is invalid"),
    ],
)
def test_bad_universal_values_give_one_clear_error(changes, match):
    cfg = small_moe_config(VOCAB, layers=4, experts=8)
    uni = dataclasses.replace(UniversalConfig(enabled=True, window=4, stride=2), **changes)
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, universal=uni)).validate("model")


def test_universal_refuses_capacity_factor_pipeline_and_too_many_elastic_experts(debug_config):
    on = [
        "model.moe.universal.enabled=true",
        "model.moe.universal.window=4",
        "model.moe.universal.stride=4",
    ]
    with pytest.raises(ConfigError, match=r"capacity_factor=1\.5 is invalid.*universal"):
        debug_config(*on, "model.moe.capacity_factor=1.5")
    with pytest.raises(ConfigError, match=r"parallel\.pp=2 is invalid.*universal"):
        debug_config(*on, "parallel.pp=2")
    with pytest.raises(ConfigError, match=r"elastic\.min_experts=6 is invalid.*window"):
        debug_config(*on, "elastic.min_experts=6")
    assert not debug_config().model.moe.universal.enabled  # off by default


# ------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize("trajectory_dim", [0, 16])
def test_pool_parameter_count_equals_the_planners(trajectory_dim, debug_config):
    from paddle_ernie5.parallel.planner import format_plan, make_plan
    from paddle_ernie5.parallel.stages import layer_costs

    cfg = debug_config(
        "model.num_layers=3",
        "model.moe.universal.enabled=true",
        "model.moe.universal.window=6",
        f"model.moe.universal.trajectory_dim={trajectory_dim}",
        "parallel.ep=2",
    )
    model = Ernie5Model(cfg.model)
    pool = sum(int(p.numel()) for p in model.universal.parameters())
    items = {it.name: it.params for it in layer_costs(cfg.model)}
    assert pool == universal_pool_params(cfg.model) == items["universal_pool"]
    plan = make_plan(cfg)
    assert plan.universal_pool == pool
    assert "| parameters, universal expert pool" in format_plan(cfg, plan)
    assert f"{pool:,}" in format_plan(cfg, plan)
    counts = count_params(cfg.model)
    assert counts["total"] == model.num_params() == sum(items.values())
    assert counts["experts"] == int(model.universal.experts.w_gate_up.numel()) + int(
        model.universal.experts.w_down.numel()
    )
    # the pool is held once: no MoE layer registers its experts
    assert not [n for n, _ in model.named_parameters() if ".ffn.experts." in n]


# ------------------------------------------------------------------------- forward, routing


def test_routing_stays_in_each_layers_window_and_matches_the_naive_loop():
    cfg = universal_config(experts=8, layers=4, window=4, stride=2)
    model = model_of(cfg)
    out = model(batch())
    windows = layer_windows(cfg)
    for i, st in out.router_stats.items():
        load = st.load_E.numpy()
        outside = np.setdiff1d(np.arange(8), windows[i])
        assert load[outside].sum() == 0 and load.sum() == 2 * 12 * 2
        assert st.trajectory_TD.shape == [24, 16]
    # the grouped/fused path equals the per-expert loop, with the trajectory state in
    moe = model.blocks[2].ffn
    x = paddle.randn([2, 5, 32])
    state = paddle.randn([10, 16]) * 0.5
    paddle.assign(paddle.randn(moe.router.state_proj.shape), moe.router.state_proj)
    y, _ = moe(x, state_TD=state)
    np.testing.assert_allclose(
        y.numpy(), moe.forward_reference(x, state_TD=state).numpy(), rtol=1e-5, atol=1e-6
    )


def test_trajectory_state_reaches_later_routers_and_gets_gradients():
    cfg = universal_config(experts=8, layers=4, window=4, stride=2)
    model = model_of(cfg)
    for _, moe in model.moe_layers():  # make the state matter
        paddle.assign(paddle.randn(moe.router.state_proj.shape), moe.router.state_proj)
    model.train()
    out = model(batch())
    out.logits.square().mean().backward()
    assert float(model.universal.expert_embed.grad.abs().sum()) > 0
    assert float(model.universal.state_mix.grad.abs().sum()) > 0
    # the first MoE layer starts from s_0 = 0: its state projection gets no gradient
    assert float(model.blocks[1].ffn.router.state_proj.grad.abs().sum()) == 0
    assert float(model.blocks[3].ffn.router.state_proj.grad.abs().sum()) > 0


# ----------------------------------------------------------------------------- balance


def test_balance_targets_correct_exposure_on_a_hand_made_routing():
    # P = 32, windows of 16 rotating by 8 over 3 layers: experts 8..23 sit in two windows, the
    # others in one. N = 96 assignments per layer, 288 in all: 9 per expert.
    windows = {l: (8 * j + np.arange(16)) % 32 for j, l in enumerate((1, 2, 3))}
    assert exposure(windows, 32).tolist() == [1] * 8 + [2] * 16 + [1] * 8
    loads = {l: np.full(16, 6.0) for l in windows}  # balanced inside every window
    t = balance_targets(loads, windows, 32)
    np.testing.assert_allclose(t[1], [9] * 8 + [3] * 8, atol=1e-6)
    np.testing.assert_allclose(t[2], [6] * 16, atol=1e-6)
    np.testing.assert_allclose(t[3], [3] * 8 + [9] * 8, atol=1e-6)
    for l in windows:
        assert t[l].sum() == pytest.approx(96)
    # the statistics of the same routing, in pool order
    pool_loads = {l: np.bincount(windows[l], weights=loads[l], minlength=32) for l in windows}
    st = balance_stats(pool_loads, windows, 32)
    np.testing.assert_allclose(st["total_P"], [6] * 8 + [12] * 16 + [6] * 8)
    assert st["per_window"] == {1: 1.0, 2: 1.0, 3: 1.0}
    assert st["max_over_mean"] == pytest.approx(12 / 9)
    assert st["per_exposure_max_over_mean"] == pytest.approx(1.0)
    # inactive slots (elastic subset, closed) take no target; the row total stays
    active = {l: np.ones(16, bool) for l in windows}
    active[2][:4] = False
    t = balance_targets(loads, windows, 32, active)
    assert np.all(t[2][:4] == 0) and t[2].sum() == pytest.approx(96)


def test_bias_update_steers_to_the_universal_target_and_skips_closed_slots():
    from paddle_ernie5.train.elastic import LoadAccumulator, update_router_biases

    cfg = universal_config(experts=8, layers=4, window=4, stride=2)
    model = model_of(cfg)
    layers = model.moe_layers()
    router = layers[0][1].router  # window 0..3; experts 2, 3 are shared with layer 2
    paddle.assign(paddle.to_tensor([0, 0, 0, -20.0]), router.window_offset)  # slot 3 closed
    acc = LoadAccumulator()
    for i, moe in layers:
        acc.add(i, np.bincount(moe.router.window, weights=[9, 1, 5, 5], minlength=8), None)
    update_router_biases(layers, acc, cfg.moe)
    rate = cfg.moe.bias_update_rate
    loads, windows = {}, layer_windows(cfg)
    active = {i: np.ones(4, bool) for i in windows}
    active[1][3] = False
    for i in windows:
        loads[i] = np.array([9.0, 1, 5, 5])
    target = balance_targets(loads, windows, 8, active)[1]
    expected = rate * np.sign(target - [9, 1, 5, 5]) * active[1]
    np.testing.assert_allclose(router.selection_bias.numpy(), expected, atol=1e-7)
    # the closed slot opened by one step
    np.testing.assert_allclose(
        router.window_offset.numpy(), [0, 0, 0, -20 * cfg.moe.universal.open_decay]
    )


# ------------------------------------------------------------------------- elastic, export


def test_elastic_sub_model_of_a_universal_model_runs(debug_config):
    from paddle_ernie5.train.elastic import ElasticSampler

    cfg = universal_config(experts=8, layers=4, window=4, stride=2)
    sampler = ElasticSampler(
        dataclasses.replace(debug_config().elastic, enabled=True, width_full_prob=0.0), cfg, 3
    )
    model = model_of(cfg)
    windows = layer_windows(cfg)
    for _ in range(4):
        view = sampler.sample()
        experts = dict(view.layer_experts)
        out = model(batch(), view)
        for i, st in out.router_stats.items():
            allowed = set(experts[i])
            assert allowed <= set(windows[i].tolist()) and 2 <= len(allowed) < 4
            used = set(np.nonzero(st.load_E.numpy())[0].tolist())
            assert used <= allowed
    # a depth-sliced view skips layers; the trajectory goes on from the last layer that ran
    out = model(batch(), ElasticView(layers=(0, 3), top_k=1))
    assert list(out.router_stats) == [3]
    assert np.isfinite(out.logits.numpy()).all()


def test_export_of_layers_gives_the_views_logits():
    from paddle_ernie5.model.slicing import ExportError, check_request, slice_state

    cfg = universal_config(experts=8, layers=4, window=6, stride=1)
    model = model_of(cfg)
    for _, moe in model.moe_layers():
        paddle.assign(paddle.randn(moe.router.state_proj.shape), moe.router.state_proj)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    kept = (0, 1, 3)
    new_state, new_cfg = slice_state(state, cfg, kept, {}, 1)
    assert new_cfg.moe.universal.starts == (0, 2)
    sliced = Ernie5Model(new_cfg)
    sliced.set_state_dict(new_state)
    sliced.eval()
    b = batch()
    ref = model(b, ElasticView(layers=kept, top_k=1)).logits.numpy()
    np.testing.assert_allclose(sliced(b).logits.numpy(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ExportError, match="exported whole"):
        check_request(cfg, 2, 4, 1)


# ---------------------------------------------------------------------- checkpoint, convert


def test_checkpoints_round_trip(debug_config):
    from paddle_ernie5.train.trainer import Trainer

    overrides = [
        "model.num_layers=3",
        "model.moe.universal.enabled=true",
        "model.moe.universal.window=6",
        "model.moe.universal.stride=2",
        "train.max_steps=2",
        "train.save_every=2",
        "train.eval_every=2",
    ]
    trainer = Trainer(debug_config(*overrides), log=lambda *_: None)
    trainer.fit()
    state = {k: v.numpy() for k, v in trainer.model.state_dict().items()}
    assert np.abs(state["blocks.1.ffn.router.selection_bias"]).sum() > 0  # the balance ran
    again = Trainer(debug_config(*overrides), log=lambda *_: None)
    assert again.try_resume() and again.step == 2
    for k, v in again.model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), state[k], err_msg=k)
    b = batch(s=16)
    trainer.model.eval()
    again.model.eval()
    np.testing.assert_array_equal(again.model(b).logits.numpy(), trainer.model(b).logits.numpy())


@pytest.mark.parametrize("score_func,window", [("softmax", 0), ("sigmoid", 12), ("softmax", 8)])
def test_conversion_gives_the_sources_logits_at_step_0(score_func, window):
    from paddle_ernie5.train.moue import convert_config, convert_state

    cfg = small_moe_config(VOCAB, layers=4, experts=6)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, score_func=score_func))
    source = model_of(cfg, seed=3)
    rng = np.random.default_rng(0)
    for _, moe in source.moe_layers():  # trained-looking, uneven selection biases
        paddle.assign(
            paddle.to_tensor(rng.normal(0, 0.2, 6).astype(np.float32)), moe.router.selection_bias
        )
    new_cfg = convert_config(cfg, window=window)
    pool, w = new_cfg.moe.num_experts, new_cfg.moe.universal.window_size(18)
    assert pool == 18 and w == (window or 12)
    assert count_params(new_cfg)["experts"] == count_params(cfg)["experts"]
    state = {k: v.numpy() for k, v in source.state_dict().items()}
    converted = Ernie5Model(new_cfg)
    converted.set_state_dict(convert_state(state, cfg, new_cfg))
    converted.eval()
    b = batch(b=3, s=20, seed=1)
    a, c = source(b), converted(b)
    np.testing.assert_allclose(c.logits.numpy(), a.logits.numpy(), rtol=1e-6, atol=1e-6)
    for j, i in enumerate((1, 2, 3)):
        np.testing.assert_array_equal(
            c.router_stats[i].topk_ids_TK.numpy(), a.router_stats[i].topk_ids_TK.numpy() + 6 * j
        )
    # once the borrowed slots are open (and the biases even), every layer routes to them too
    for _, moe in converted.moe_layers():
        moe.router.open_window(0.0)
        paddle.assign(paddle.zeros_like(moe.router.selection_bias), moe.router.selection_bias)
    stats = converted(b).router_stats
    for j, i in enumerate((1, 2, 3)):
        borrowed = np.setdiff1d(np.arange(18), np.arange(6 * j, 6 * j + 6))
        assert stats[i].load_E.numpy()[borrowed].sum() > 0


# ------------------------------------------------------------------------- expert parallel


def test_expert_parallel_shards_the_pool_once_and_matches_one_process(tmp_path, data_cache):
    from support import launch_workers

    results = launch_workers(
        "moue_ep_worker.py", 2, tmp_path, data_cache, tmp_path, result="moue_rank{r}.json"
    )
    for r in results:
        assert r["expert_names"] == ["universal.experts.w_gate_up", "universal.experts.w_down"]
        assert r["pool_rows"] == 4 and r["banks"] == 1  # 8 experts, half per rank, one bank
        assert r["start_params"] == 0.0
        fb = r["forward_backward"]
        assert fb["logits"] < 1e-5 and fb["loss"] < 1e-5 and fb["grads"] < 1e-6
        assert max(r["train"]["losses"]) < 1e-5
        assert r["train"]["params"] < 1e-5 < r["train"]["moved"]
        assert r["bias"] == 0.0
        assert r["ckpt_to_single_logits"] < 1e-5


def test_cached_decoding_follows_the_full_forward():
    """The trajectory state is per token: decoding with a KV cache picks the tokens that full
    forwards over the growing sequence pick."""
    from paddle_ernie5.model.generation import generate

    cfg = universal_config(experts=8, layers=4, window=4, stride=2)
    model = model_of(cfg)
    for _, moe in model.moe_layers():
        paddle.assign(paddle.randn(moe.router.state_proj.shape), moe.router.state_proj)
    seq = np.random.default_rng(0).integers(0, VOCAB, [2, 5])
    tokens = generate(model, seq, 6, temperature=0.0).tokens
    for _ in range(6):
        s = seq.shape[1]
        b = batch(2, s)
        b["input_ids"] = paddle.to_tensor(seq)
        nxt = model(b, with_mtp=False).logits.numpy()[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], 1)
    np.testing.assert_array_equal(np.asarray(tokens), seq[:, 5:])
