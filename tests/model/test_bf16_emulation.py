import numpy as np
import paddle
import pytest

from paddle_ernie5.config import AttentionConfig, ModelConfig, MoEConfig
from paddle_ernie5.model.bf16_emulation import bf16_emulation, round_to_bf16, rounded_parameters
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.ops.masks import causal_document


def bf16_rne(a: np.ndarray) -> np.ndarray:
    """Integer reference: float32 -> nearest bfloat16 (ties to even) -> float32; NaN stays NaN."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(a), np.float32(np.nan), out)


def is_bf16(a: np.ndarray) -> bool:
    return bool((np.asarray(a, np.float32).view(np.uint32) & 0xFFFF == 0).all())


def _model(tie=False):
    paddle.seed(3)
    cfg = ModelConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        tie_embeddings=tie,
        attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8, backend="reference"),
        moe=MoEConfig(num_experts=6, top_k=2, expert_hidden=16, shared_expert_hidden=8),
    )
    return Ernie5Model(cfg)


def _batch(b=2, s=24):
    ids = np.random.default_rng(0).integers(0, 97, size=(b, s))
    pos = np.broadcast_to(np.arange(s), (b, 3, s)).copy()
    idx = np.broadcast_to(causal_document([s // 2, s - s // 2]), (b, 1, s, 1)).copy()
    return {
        "input_ids": paddle.to_tensor(ids),
        "token_types": paddle.zeros([b, s], "int64"),
        "positions": paddle.to_tensor(pos),
        "startend_row_indices": paddle.to_tensor(idx),
    }


def test_rounding_is_round_to_nearest_even_bit_for_bit_with_identity_gradient():
    one = 1.0
    special = [
        one,
        one + 2**-8,  # tie between 1 and 1 + 2^-7: to even (1)
        one + 3 * 2**-8,  # tie: to even (1 + 2^-6)
        one + 2**-8 + 2**-20,  # just above the tie: up
        -3.14159,
        1e-40,  # subnormal
        -2.5e-39,
        3.4e38,  # rounds past the largest bfloat16: inf
        np.inf,
        -np.inf,
        np.nan,
        0.0,
        -0.0,
    ]
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            np.array(special, np.float32),
            (rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)).astype(np.float32),
        ]
    )
    x = paddle.to_tensor(values, stop_gradient=False)
    y = round_to_bf16(x)
    assert y.dtype == paddle.float32
    np.testing.assert_array_equal(
        y.numpy().view(np.uint32)[~np.isnan(values)],
        bf16_rne(values).view(np.uint32)[~np.isnan(values)],
    )
    assert np.isnan(y.numpy()[np.isnan(values)]).all()
    (y * paddle.arange(len(values), dtype="float32")).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), np.arange(len(values), dtype=np.float32))
    ints = paddle.to_tensor([1, 2, 3])
    assert round_to_bf16(ints) is ints


def test_one_linear_layer_equals_the_explicitly_rounded_reference():
    model = _model()
    qkv = model.blocks[0].attn.qkv
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((5, 32)).astype(np.float32))
    fp32 = qkv(x).numpy()
    with bf16_emulation(model):
        got = qkv(x).numpy()
    w = qkv.weight.numpy()
    want = bf16_rne(bf16_rne(x.numpy()) @ bf16_rne(w))
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, fp32)
    np.testing.assert_array_equal(qkv(x).numpy(), fp32)  # hooks gone after the block


@pytest.mark.parametrize("tie", [False, True])
def test_model_forward_rounds_and_masters_come_back_bit_for_bit(tie):
    model = _model(tie)
    batch = _batch()
    masters = {n: p.numpy().copy() for n, p in model.named_parameters()}
    fp32 = model(batch)
    with bf16_emulation(model):
        inside = {n: p.numpy().copy() for n, p in model.named_parameters()}
        out = model(batch)
    rounded = {id(p) for p in rounded_parameters(model)}
    for name, p in model.named_parameters():
        if id(p) in rounded:
            np.testing.assert_array_equal(inside[name], bf16_rne(masters[name]), err_msg=name)
        else:  # norms and the router keep float32 weights
            assert "norm" in name or "router" in name, name
            np.testing.assert_array_equal(inside[name], masters[name], err_msg=name)
        np.testing.assert_array_equal(p.numpy(), masters[name], err_msg=name)
    assert any("router" in n for n, p in model.named_parameters() if id(p) not in rounded)
    logits = out.logits.numpy()
    assert is_bf16(logits) and is_bf16(out.mtp_logits.numpy())
    # The text head on the final hidden state: round(round(h) @ round(W)), W the float32 master.
    head = (
        masters["embed.by_modality.text.table.weight"].T
        if tie
        else masters["text_head.proj.weight"]
    )
    want = bf16_rne(bf16_rne(out.hidden.numpy()) @ bf16_rne(head))
    np.testing.assert_array_equal(logits, want)
    diff = np.abs(logits - fp32.logits.numpy())
    assert diff.max() > 0 and diff.max() < 0.05 * np.abs(fp32.logits.numpy()).max()
    np.testing.assert_array_equal(model(batch).logits.numpy(), fp32.logits.numpy())


def test_gradients_reach_the_float32_masters_straight_through():
    model = _model()
    batch = _batch()
    with bf16_emulation(model):
        model(batch).logits.sum().backward()
    lin = model.blocks[1].attn.out
    assert lin.weight.grad is not None and lin.weight.grad.dtype == paddle.float32
    assert all(p.dtype == paddle.float32 for p in model.parameters())
    assert all(p.grad is not None for p in model.text_head.parameters())
