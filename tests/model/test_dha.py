"""Decoupled-Head Attention: per-layer key/value head counts (config, attention, FlashMask seam, KV
caches, eviction, planner, export) and the conversion of a checkpoint (train/dha.py): the same
logits at fusion step 0, an exact merge at the end of the fusion, clear errors."""

import dataclasses

import numpy as np
import paddle
import pytest
from support import small_moe_config

from paddle_ernie5 import config as C
from paddle_ernie5.config.generate import GenerateConfig
from paddle_ernie5.config.model import HeadFusionConfig
from paddle_ernie5.io import checkpoint
from paddle_ernie5.model.attention import advance_head_fusion
from paddle_ernie5.model.generation import KVCache, _text_batch, generate
from paddle_ernie5.model.kv_eviction import KVEviction
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.params import count_params
from paddle_ernie5.model.slicing import slice_state
from paddle_ernie5.ops.flashmask import flashmask_attention, flashmask_attention_reference
from paddle_ernie5.train import dha

VOCAB = 61


def _cfg(layers=3, k=(1, 2, 4), v=(2, 1, 4), backend="cpu", **attention):
    cfg = small_moe_config(VOCAB, layers, backend=backend, **attention)
    att = dataclasses.replace(cfg.attention, k_heads=tuple(k), v_heads=tuple(v))
    cfg = dataclasses.replace(cfg, attention=att)
    cfg.validate("model")
    return cfg


def _model(cfg, seed=0):
    paddle.seed(seed)
    model = Ernie5Model(cfg)
    model.eval()
    return model


def _ids(b=3, s=12, seed=0):
    return paddle.to_tensor(np.random.default_rng(seed).integers(0, VOCAB, size=(b, s)))


def _logits(model, ids):
    with paddle.no_grad():
        return model(_text_batch(ids, 0), with_mtp=False).logits.numpy()


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.attention.k_heads=[1,2]", "k_heads=[1, 2] is invalid: allowed one entry per layer"),
        ("model.attention.v_heads=[1,1,1,1,1]", "v_heads=[1, 1, 1, 1, 1] is invalid"),
        ("model.attention.k_heads=[3,1,1,1]", "divisors of num_heads=4"),
        ("model.attention.v_heads=[0,1,1,1]", "divisors of num_heads=4"),
        ("model.attention.fusion.from_k=[2,2,2,2]", "both or neither"),
        (
            "model.attention.fusion.from_k=[1,2,2,2]",
            "a multiple of the layer's k_heads",
        ),
        ("model.attention.fusion.schedule=step", "linear or cosine"),
        ("model.attention.fusion.steps=-1", ">= 0"),
    ],
)
def test_bad_head_lists_give_one_clear_error(override, needle):
    base = ["model.attention.k_heads=[2,2,2,2]"]
    if "from_k=[1" in override:
        base += ["model.attention.fusion.from_v=[2,2,2,2]"]
    with pytest.raises(C.ConfigError) as err:
        C.load_config("recipes/pretrain_tiny.yaml", [*base, override])
    assert needle in str(err.value)


def test_empty_lists_are_the_gqa_model_and_load_unchanged():
    cfg = C.load_config("recipes/pretrain_tiny.yaml")
    a = cfg.model.attention
    assert a.k_heads == a.v_heads == () and not a.fusion.active
    assert [a.computed_heads(i) for i in range(4)] == [(2, 2)] * 4
    assert a.kv_cache_heads(4) == 16


def test_head_counts_round_trip_through_checkpoints_and_export(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    full = C.replace(C.load_config("recipes/debug.yaml"), model=cfg)
    C.save_config(full, str(tmp_path / "config.yaml"))
    back = C.load_config(str(tmp_path / "config.yaml")).model
    assert back == cfg and back.attention.k_heads == (1, 2, 4)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    saved = checkpoint.save(str(tmp_path / "ck"), 1, state, {}, {"config": full.to_dict()}, 2)
    loaded = checkpoint.load_model_weights(saved)
    again = _model(back, seed=1)
    checkpoint.set_weights(again, loaded, "the saved weights")
    ids = _ids()
    np.testing.assert_array_equal(_logits(again, ids), _logits(model, ids))
    # export: the kept layers keep their own head counts and weights
    layers = (0, 2)
    sliced, sub = slice_state(state, cfg, layers, {2: (0, 1, 2, 3, 4, 5)}, 2)
    assert sub.attention.k_heads == (1, 4) and sub.attention.v_heads == (2, 4)
    sub_model = _model(sub)
    checkpoint.set_weights(sub_model, sliced, "the sliced weights")
    assert sub_model.blocks[1].attn.qkv.weight.shape == [32, (4 + 4 + 4) * 8]


def test_params_planner_and_model_agree_on_head_counts():
    from paddle_ernie5.parallel.planner import make_plan

    cfg = _cfg()
    assert count_params(cfg)["total"] == _model(cfg).num_params()
    fusing = dha.fusion_config(
        small_moe_config(VOCAB, 3, num_kv_heads=4),
        [dha.LayerPlan(1, 2, (0, 1, 2, 3), 0, 0)] * 3,
        HeadFusionConfig(),
    )
    assert count_params(fusing)["total"] == _model(fusing).num_params()
    recipe = C.load_config(
        "recipes/pretrain_tiny.yaml",
        ["model.attention.k_heads=[1,1,1,1]", "model.attention.v_heads=[1,2,1,1]"],
    )
    plan = make_plan(recipe)
    assert plan.kv_cache_bytes_per_token == 2 * 32 * (4 + 5)
    assert plan.kv_cache_mha_share == pytest.approx(9 / 32)


# ------------------------------------------------------------------------- FlashMask seam
@pytest.mark.parametrize(
    "b, sq, sk, h, hk, hv, causal, per_head_mask",
    [
        (2, 70, 70, 4, 1, 2, True, False),
        (1, 130, 130, 6, 2, 3, True, True),
        (2, 33, 90, 4, 4, 1, True, False),
        (1, 64, 64, 8, 2, 8, False, True),
        (2, 1, 40, 4, 2, 1, True, False),
    ],
)
def test_flashmask_with_differing_key_and_value_heads_matches_the_reference(
    b, sq, sk, h, hk, hv, causal, per_head_mask
):
    rng = np.random.default_rng(sq + h)
    d = 16

    def tensor(*shape):
        t = paddle.to_tensor(rng.standard_normal(shape).astype(np.float32))
        t.stop_gradient = False
        return t

    q, k, v = tensor(b, sq, h, d), tensor(b, sk, hk, d), tensor(b, sk, hv, d)
    idx = None
    if per_head_mask:  # a different window per key head
        cols = np.arange(sk)[None, :, None] + 5 + 7 * np.arange(hk)[:, None, None]
        lts = np.clip(cols, 0, sq).astype(np.int32)
        if causal:
            idx = paddle.to_tensor(np.broadcast_to(lts, (b, hk, sk, 1)).copy())
        else:
            ute = np.zeros_like(lts)
            idx = paddle.to_tensor(np.broadcast_to(np.concatenate([lts, ute], -1), (b, hk, sk, 2)))
    dout = paddle.to_tensor(rng.standard_normal((b, sq, h, d)).astype(np.float32))
    results = []
    for fn in (
        lambda *a, **kw: flashmask_attention(*a, backend="cpu", **kw),
        flashmask_attention_reference,
    ):
        out, lse = fn(q, k, v, idx, causal=causal, return_softmax_lse=True)
        grads = paddle.grad([out], [q, k, v], grad_outputs=[dout])
        results.append([out.numpy(), lse.numpy(), *[g.numpy() for g in grads]])
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), *results):
        finite = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
        np.testing.assert_allclose(got[finite], want[finite], atol=1e-4, err_msg=name)
    # the reference itself against a per-head loop in numpy (no mask)
    if idx is None:
        qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
        out = flashmask_attention_reference(q, k, v, None, causal=causal).numpy()
        for head in range(h):
            s = qn[:, :, head] @ kn[:, :, head // (h // hk)].transpose(0, 2, 1) / np.sqrt(d)
            if causal:
                s = np.where(np.tril(np.ones((sq, sk)), sk - sq) > 0, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            np.testing.assert_allclose(out[:, :, head], p @ vn[:, :, head // (h // hv)], atol=1e-5)


def test_flashmask_rejects_value_heads_that_do_not_divide_the_query_heads():
    q = paddle.zeros([1, 8, 4, 8])
    k, v = paddle.zeros([1, 8, 2, 8]), paddle.zeros([1, 8, 3, 8])
    with pytest.raises(ValueError, match=r"multiple of key heads \(2\) and of value heads \(3\)"):
        flashmask_attention(q, k, v, causal=True, backend="cpu")


# --------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_dha_decoding_matches_full_recompute(backend):
    model = _model(_cfg(backend=backend))
    ids = _ids()
    full = _logits(model, ids)
    cache = KVCache()
    with paddle.no_grad():
        steps = [model(_text_batch(ids[:, :5], 0), with_mtp=False, cache=cache).logits.numpy()]
        for t in range(5, 12):
            batch = _text_batch(ids[:, t : t + 1], t)
            steps.append(model(batch, with_mtp=False, cache=cache).logits.numpy())
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)
    prompt = np.random.default_rng(1).integers(0, VOCAB, size=(2, 7))
    fast = generate(model, prompt, 8, temperature=0.0)
    ref = generate(model, prompt, 8, temperature=0.0, static_cache=False)
    np.testing.assert_array_equal(fast.tokens, ref.tokens)
    np.testing.assert_allclose(fast.logprobs, ref.logprobs, atol=1e-5)
    seq = prompt
    for t in range(8):  # greedy tokens = argmax of a full recompute
        nxt = _logits(model, paddle.to_tensor(seq))[:, -1].argmax(-1)
        np.testing.assert_array_equal(fast.tokens[:, t], nxt)
        seq = np.concatenate([seq, nxt[:, None]], 1)


@pytest.mark.parametrize("policy", ["nacl", "recent", "random"])
def test_eviction_with_differing_heads_keeps_one_set_per_group_in_both_loops(policy):
    model = _model(_cfg())
    prompt = np.random.default_rng(2).integers(0, VOCAB, size=(2, 20))
    ev = GenerateConfig(kv_budget=0.4, kv_policy=policy, nacl_proxy_tokens=3)
    fast = generate(model, prompt, 6, temperature=0.0, eviction=ev)
    ref = generate(model, prompt, 6, temperature=0.0, static_cache=False, eviction=ev)
    np.testing.assert_array_equal(fast.tokens, ref.tokens)
    np.testing.assert_allclose(fast.logprobs, ref.logprobs, atol=1e-5)
    cache = KVCache(KVEviction(ev))
    with paddle.no_grad():
        model(_text_batch(paddle.to_tensor(prompt), 0), with_mtp=False, cache=cache)
    for i, (kh, vh) in enumerate([(1, 2), (2, 1), (4, 4)]):
        layer = cache.layer(i)
        groups = np.gcd(kh, vh)
        assert layer.kept_positions.shape == (2, groups, 8)  # ceil(0.4 * 20)
        assert layer.k.shape[1:3] == [8, kh] and layer.v.shape[1:3] == [8, vh]


# ------------------------------------------------------------------------------ conversion
def _source(num_kv_heads=4, layers=2):
    cfg = small_moe_config(VOCAB, layers, num_kv_heads=num_kv_heads)
    return cfg, _model(cfg, seed=3)


def _convert(cfg, model, plans, fusion, covs=None):
    new_cfg = dha.fusion_config(cfg, plans, fusion)
    new = _model(new_cfg, seed=9)
    state = {k: v.numpy() for k, v in new.state_dict().items()}
    src = dha.permute_heads({k: v.numpy() for k, v in model.state_dict().items()}, cfg, plans)
    state.update({k: v for k, v in src.items() if k in state})
    if fusion.granularity == "subspace":
        for i in range(cfg.num_layers):
            init = dha.subspace_init(
                covs[i], src[f"blocks.{i}.attn.qkv.weight"], new_cfg.attention, i
            )
            state.update(
                {f"blocks.{i}.attn.fusion.{k}": v.astype(np.float32) for k, v in init.items()}
            )
    checkpoint.set_weights(new, state, "converted")
    new.eval()
    return new


@pytest.mark.parametrize(
    "method, granularity", [("dha", "subspace"), ("dha", "head"), ("gqa", "head")]
)
def test_converted_models_give_the_source_logits_at_fusion_step_0_and_merge_exactly(
    method, granularity
):
    cfg, model = _source()
    ids = _ids(2, 16)
    batches = [_text_batch(ids, 0)]
    covs = dha.input_covariances(model, batches)
    weights = [b.attn.qkv.weight.numpy() for b in model.blocks]
    grams = dha.head_grams(covs, weights, cfg.attention)
    plans = dha.plan_layers(cfg, grams, 0.375, "dha") if method == "dha" else None
    if method == "gqa":
        plans = dha.plan_layers(cfg, grams, 0.25, "gqa")
    if method == "dha":  # exercise a non-trivial order: the permutation keeps the function
        plans[0] = dataclasses.replace(plans[0], order=(2, 0, 3, 1))
    weights_kind = "mean" if method == "gqa" else "learned"
    fusion = HeadFusionConfig(steps=4, weights=weights_kind, granularity=granularity)
    new = _convert(cfg, model, plans, fusion, covs)
    np.testing.assert_allclose(_logits(new, ids), _logits(model, ids), atol=2e-5)
    # the schedule counts optimizer steps: forwards (training or not) do not move it
    new.train()
    new(_text_batch(ids, 0), with_mtp=False)
    assert dha.fusion_progress(new) == (0, 4)
    for _ in range(4):
        advance_head_fusion(new)
    assert dha.fusion_progress(new) == (4, 4) and new.blocks[0].attn.fusion.share() == 1.0
    state, merged_cfg = dha.merged_state(new)
    assert merged_cfg.attention.k_heads == tuple(p.k_heads for p in plans)
    assert not merged_cfg.attention.fusion.active
    merged = _model(merged_cfg)
    checkpoint.set_weights(merged, state, "merged")
    np.testing.assert_allclose(_logits(merged, ids), _logits(new, ids), atol=5e-5)
    assert merged_cfg.attention.kv_cache_heads(2) == sum(p.k_heads + p.v_heads for p in plans)


def test_subspace_fusion_of_low_rank_heads_is_lossless():
    """Two value heads whose outputs span D dimensions together fuse into one head exactly."""
    cfg, model = _source(num_kv_heads=2, layers=1)
    h, d = 4, 8
    w = model.blocks[0].attn.qkv.weight.numpy()
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((32, d))
    v_cols = slice((h + 2) * d, (h + 4) * d)
    w[:, v_cols] = basis @ rng.standard_normal((d, 2 * d))  # both value heads in one D-dim space
    model.blocks[0].attn.qkv.weight.set_value(paddle.to_tensor(w))
    ids = _ids(2, 16)
    covs = dha.input_covariances(model, [_text_batch(ids, 0)])
    plans = [dha.LayerPlan(2, 1, (0, 1), 0.0, 0.0)]
    new = _convert(cfg, model, plans, HeadFusionConfig(steps=0), covs)
    np.testing.assert_allclose(_logits(new, ids), _logits(model, ids), atol=1e-4)


def test_allocation_spends_the_budget_where_fusion_costs_most():
    rng = np.random.default_rng(0)
    same = np.ones((4, 4))  # four identical heads: fusing costs nothing
    different = np.eye(4)  # four orthogonal heads
    grams = [(same, same), (different, same)]
    counts = dha.allocate(grams, slots=6)
    assert counts == [[1, 1], [2, 1]]
    assert dha.group_cost(different, range(4), 4) == pytest.approx(0.75)
    assert dha.group_cost(same, rng.permutation(4), 2) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "budget, method, needle",
    [
        (0.0, "dha", "in (0, 1]"),
        (1.5, "dha", "in (0, 1]"),
        (0.05, "dha", "smallest budget of this model (num_heads=4) is 1/4"),
        (1.0, "dha", "nothing to fuse"),
        (0.25, "pool", "choose one of dha, gqa"),
        (0.375, "gqa", "whole divisor"),
    ],
)
def test_bad_conversion_requests_give_one_clear_error(budget, method, needle):
    cfg = small_moe_config(VOCAB, 2, num_kv_heads=4)
    with pytest.raises(dha.DHAError) as err:
        dha.check_budget(budget, cfg, method)
    assert needle in str(err.value)


def test_the_fusion_schedule_advances_once_per_optimizer_step(debug_config):
    """Two micro-batches per step: the schedule follows the trainer's steps, not its forwards."""
    from paddle_ernie5.train.trainer import Trainer

    cfg = debug_config(
        "train.grad_accum=2",
        "model.attention.k_heads=[1,1]",
        "model.attention.v_heads=[1,1]",
        "model.attention.fusion.from_k=[2,2]",
        "model.attention.fusion.from_v=[2,2]",
        "model.attention.fusion.steps=4",
    )
    trainer = Trainer(cfg, log=lambda *_: None)
    for _ in range(3):
        trainer.train_step()
    assert dha.fusion_progress(trainer.model) == (3, 4)
