"""The routed-experts C++ op against the grouped reference and a naive per-expert loop."""

import dataclasses
import subprocess
import sys

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import ConfigError, MoEConfig, load_config
from paddle_ernie5.model.dispatch import LocalDispatcher
from paddle_ernie5.model.moe import MoE
from paddle_ernie5.model.view import FULL_VIEW, ElasticView
from paddle_ernie5.ops import build
from paddle_ernie5.ops import moe_experts as seam
from paddle_ernie5.ops.grouping import expert_capacity


@pytest.fixture(scope="module")
def op():
    return seam._cpu_op()


def _param(array):
    t = paddle.to_tensor(array.astype(np.float32))
    t.stop_gradient = False
    return t


def _ids(rng, t, e, k, loads):
    if loads == "uniform":  # k distinct experts per token, as the router picks them
        return np.stack([rng.choice(e, k, replace=False) for _ in range(t)])
    if loads == "skewed":  # a few hot experts, several with no token at all
        hot = min(e - 1, max(k + 2, e // 2))
        p = np.zeros(e)
        p[:hot] = rng.random(hot) ** 4 + 0.01
        return np.stack([rng.choice(e, k, replace=False, p=p / p.sum()) for _ in range(t)])
    return rng.integers(0, e, size=(t, k))  # "repeats": a token may pick an expert twice


def _case(t, m, e, f, k, loads, seed=0):
    rng = np.random.default_rng(seed)
    x = _param(rng.standard_normal((t, m)))
    w_gate_up = _param(0.2 * rng.standard_normal((e, m, 2 * f)))
    w_down = _param(0.2 * rng.standard_normal((e, f, m)))
    ids = paddle.to_tensor(_ids(rng, t, e, k, loads).astype(np.int64))
    weights = _param(rng.random((t, k)) + 0.1)
    dy = paddle.to_tensor(rng.standard_normal((t, m)).astype(np.float32))
    return (x, w_gate_up, w_down, ids, weights), dy


def naive_loop(x, w_gate_up, w_down, ids, weights, capacity_factor=0.0):
    """One expert at a time over its tokens (the first C in token order when capacity-bound)."""
    t, k = ids.shape
    e = w_gate_up.shape[0]
    capacity = expert_capacity(t, k, e, capacity_factor)
    ids_np = ids.numpy()
    y = paddle.zeros_like(x)
    for expert in range(e):
        tok, slot = np.nonzero(ids_np == expert)  # row-major: token order
        if capacity:
            tok, slot = tok[:capacity], slot[:capacity]
        if tok.size == 0:
            continue
        h = paddle.matmul(paddle.gather(x, paddle.to_tensor(tok)), w_gate_up[expert])
        out = paddle.matmul(paddle.nn.functional.swiglu(h), w_down[expert])
        w = paddle.gather_nd(weights, paddle.to_tensor(np.stack([tok, slot], 1)))
        y = paddle.index_add(y, paddle.to_tensor(tok), 0, out * w.unsqueeze(-1))
    return y


def _value_and_grads(fn, inputs, dy, **kw):
    x, w_gate_up, w_down, ids, weights = inputs
    y = fn(x, w_gate_up, w_down, ids, weights, **kw)
    grads = paddle.grad([y], [x, w_gate_up, w_down, weights], grad_outputs=[dy])
    return [y.numpy()] + [g.numpy() for g in grads]


def _assert_close(got, want):
    for name, a, b in zip(("y", "dx", "dw_gate_up", "dw_down", "dweights"), got, want):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * scale, err_msg=name)


CASES = [  # T, M, E, F, K, loads, capacity factor
    (37, 32, 8, 24, 2, "uniform", 0.0),
    (64, 48, 16, 32, 4, "skewed", 0.0),
    (5, 17, 4, 7, 1, "uniform", 0.0),  # widths that are not multiples of the 16-float vectors
    (3, 16, 12, 16, 4, "uniform", 0.0),  # most experts get no token
    (150, 40, 6, 20, 1, "skewed", 0.0),  # top-1, tiles of more than 96 rows for one expert
    (50, 20, 6, 16, 4, "skewed", 1.0),  # capacity drops assignments past the first C
    (41, 24, 5, 12, 3, "repeats", 0.0),  # a token may be assigned the same expert twice
    (300, 64, 4, 128, 2, "uniform", 0.0),
    (2500, 16, 2, 8, 1, "uniform", 0.0),  # backward splits each expert's rows into chunks
]


@pytest.mark.parametrize("t,m,e,f,k,loads,cf", CASES)
def test_op_matches_grouped_reference_and_naive_loop(op, t, m, e, f, k, loads, cf):
    inputs, dy = _case(t, m, e, f, k, loads, seed=t)
    load = np.bincount(inputs[3].numpy().ravel(), minlength=e)
    if loads == "skewed":
        assert (load == 0).any() and load.max() > 2 * load[load > 0].min()
    got = _value_and_grads(seam.moe_experts, inputs, dy, capacity_factor=cf, backend="cpu_op")
    grouped = _value_and_grads(seam.moe_experts_reference, inputs, dy, capacity_factor=cf)
    naive = _value_and_grads(naive_loop, inputs, dy, capacity_factor=cf)
    _assert_close(got, grouped)
    _assert_close(got, naive)
    if cf:  # a dropped assignment contributes nothing and its combine weight gets no gradient
        capacity = expert_capacity(t, k, e, cf)
        ids = inputs[3].numpy().ravel()
        rank = np.array([np.sum(ids[:n] == ids[n]) for n in range(ids.size)])
        dropped = (rank >= capacity).reshape(t, k)
        assert dropped.any()
        assert np.all(got[4][dropped] == 0)


def test_op_results_do_not_depend_on_the_thread_count(op, monkeypatch):
    inputs, dy = _case(1100, 24, 3, 40, 2, "skewed", seed=3)  # 2200 rows: chunked backward
    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        results.append(_value_and_grads(seam.moe_experts, inputs, dy, backend="cpu_op"))
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_op_rejects_expert_ids_out_of_range(op):
    inputs, _ = _case(6, 16, 4, 16, 2, "uniform")
    x, w_gate_up, w_down, _, weights = inputs
    bad = paddle.to_tensor(np.array([[0, 4]] * 6, dtype=np.int64))
    with pytest.raises(Exception, match="outside"):
        seam.moe_experts(x, w_gate_up, w_down, bad, weights, backend="cpu_op")


def test_backend_resolution():
    x = paddle.zeros([2, 4])
    assert seam.resolve_backend("auto", x) == "cpu_op"
    assert seam.resolve_backend("grouped", x) == "grouped"
    with pytest.raises(ValueError, match="unknown"):
        seam.resolve_backend("fast", x)


def _moe_pair(cf=0.0, shared=1):
    paddle.seed(5)
    cfg = MoEConfig(
        num_experts=8,
        top_k=3,
        expert_hidden=24,
        shared_expert_hidden=16,
        num_shared_experts=shared,
        capacity_factor=cf,
        expert_backend="cpu_op",
    )
    fused = MoE(32, cfg, init_std=0.1)
    grouped = MoE(32, dataclasses.replace(cfg, expert_backend="grouped"), init_std=0.1)
    grouped.set_state_dict(fused.state_dict())
    return fused, grouped


def _layer_value_and_grads(moe, x, view=FULL_VIEW, replay=None):
    y, stats = moe(x, view, replay)
    dy = paddle.to_tensor(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
    grads = paddle.grad([y], [x, *moe.parameters()], grad_outputs=[dy])
    return [y.numpy(), stats.load_E.numpy()] + [g.numpy() for g in grads]


@pytest.mark.parametrize(
    "cf,view,replay",
    [
        (0.0, ElasticView(), False),
        (0.0, ElasticView(experts=(1, 2, 5, 6), top_k=2), False),  # elastic subset: masked experts
        (1.0, ElasticView(), False),
        (0.0, ElasticView(), True),  # router replay: forced expert ids
    ],
)
def test_moe_layer_backends_agree(op, cf, view, replay):
    fused, grouped = _moe_pair(cf)
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 23, 32)).astype(np.float32))
    x.stop_gradient = False
    ids = None
    if replay:
        ids = paddle.to_tensor(np.random.default_rng(2).integers(0, 8, (2, 23, 3)).astype(np.int64))
    a = _layer_value_and_grads(fused, x, view, ids)
    b = _layer_value_and_grads(grouped, x, view, ids)
    np.testing.assert_array_equal(a[1], b[1])
    for u, v in zip(a[:1] + a[2:], b[:1] + b[2:]):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


class _CountingDispatcher:
    """Stands in for an expert-parallel dispatcher: not the local one, so the op must step aside."""

    def __init__(self):
        self.inner, self.calls = LocalDispatcher(), 0

    def dispatch(self, x_TM, routing, num_experts):
        self.calls += 1
        return self.inner.dispatch(x_TM, routing, num_experts)

    def combine(self, expert_outputs_ECM, meta):
        return self.inner.combine(expert_outputs_ECM, meta)


def test_non_local_dispatcher_falls_back_to_the_grouped_path(op):
    fused, grouped = _moe_pair()
    fused.dispatcher = _CountingDispatcher()
    x = paddle.randn([1, 10, 32])
    y, _ = fused(x)
    assert fused.dispatcher.calls == 1
    np.testing.assert_allclose(y.numpy(), grouped(x)[0].numpy(), rtol=1e-6, atol=1e-7)


def test_expert_backend_is_validated(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  moe:\n    expert_backend: fast\n")
    with pytest.raises(ConfigError, match="expert_backend"):
        load_config(recipe)


def test_make_ops_builds_the_moe_op(op):
    assert "moe_experts" in build.OPS
    assert build.is_up_to_date(op="moe_experts")
    assert build.build(op="moe_experts") is False
    flags = build.cxx_flags()
    assert build.fingerprint(flags, "moe_experts") != build.fingerprint(flags, "flashmask")


def test_importing_the_model_does_not_load_the_op():
    code = (
        "import paddle_ernie5.model.model, paddle_ernie5.model.moe\n"
        "from paddle_ernie5.ops import moe_experts\n"
        "print('loaded', moe_experts._cpu_op.cache_info().currsize)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "loaded 0" in done.stdout
