"""The fused AdamW (custom_ops/adamw, ops/adamw.py, optim/fused_adamw.py): the op against its
pure-Paddle reference and Paddle's AdamW, its sums of squares against numpy float64, thread-count
independence, the optimizer against paddle.optimizer.AdamW over 20 steps (decay, clipping, a
parameter that skips steps), checkpoints moving between the two optimizers, and which optimizer
build_optimizer picks."""

import os

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import LoopConfig, TrainConfig
from paddle_ernie5.ops import adamw as seam
from paddle_ernie5.ops import policy
from paddle_ernie5.optim.fused_adamw import FusedAdamW
from paddle_ernie5.optim.optimizer import (
    build_optimizer,
    clip_by_global_norm,
    global_grad_norm,
    load_optimizer_state,
    optimizer_state,
    tensor_sq_norms,
)

# Sizes around the vector width (16), the task size (8192) and the parallel threshold (65536).
SHAPES = [(1,), (15,), (16,), (17,), (3, 5), (8191,), (8193,), (64, 130), (70001,), (2, 3, 4)]
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.95, epsilon=1e-8, coeff=0.1)


@pytest.fixture(scope="module", autouse=True)
def op():
    return seam._op()


@pytest.fixture
def threads():
    """Set OMP_NUM_THREADS (the op reads it at every call) for the test; restored after."""
    before = os.environ.get("OMP_NUM_THREADS")

    def use(n: int) -> None:
        os.environ["OMP_NUM_THREADS"] = str(n)

    yield use
    if before is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = before


def _case(seed: int, shapes=SHAPES):
    """Parameters, gradients, moments part-way through training and per-parameter step counts."""
    rng = np.random.default_rng(seed)
    arrays = []
    for s in shapes:
        g = rng.standard_normal(s) * 10 ** rng.uniform(-5, 1)
        m = 0.1 * g + rng.standard_normal(s) * 1e-3
        arrays.append(
            [rng.standard_normal(s), g, m, (g * g) * rng.uniform(0.5, 2.0, s)]
        )  # p, g, m, v
    steps = rng.integers(1, 200, len(shapes))
    decay = [int(i % 3 != 1) for i in range(len(shapes))]
    return [[a.astype(np.float32) for a in row] for row in arrays], steps, decay


def _tensors(arrays):
    params = []
    for p, _, _, _ in arrays:
        t = paddle.create_parameter(list(p.shape), "float32")
        t.set_value(p)
        params.append(t)
    rest = [[paddle.to_tensor(row[k]) for row in arrays] for k in (1, 2, 3)]
    return params, *rest


def _pows(steps, beta):
    """beta^t in float32 formed as Paddle forms it: t - 1 float32 products starting from beta."""
    out = []
    for t in steps:
        p = np.float32(beta)
        for _ in range(int(t) - 1):
            p = np.float32(p * np.float32(beta))
        out.append(float(p))
    return out


def _run_step(arrays, steps, decay, fused: bool, grad_scale: float):
    params, grads, m1, m2 = _tensors(arrays)
    seam.adamw_step(
        params, grads, m1, m2, _pows(steps, HYPER["beta1"]), _pows(steps, HYPER["beta2"]),
        decay, **HYPER, grad_scale=grad_scale, fused=fused,
    )  # fmt: skip
    return [[t.numpy() for t in ts] for ts in (params, m1, m2)]


def _numpy_step(arrays, steps, decay, grad_scale: float):
    """The update in float64 from the same float32 inputs."""
    out = [[], [], []]
    lr, b1, b2, eps, wd = (HYPER[k] for k in ("lr", "beta1", "beta2", "epsilon", "coeff"))
    for (p, g, m, v), t, d in zip(arrays, steps, decay):
        p, g, m, v = (x.astype(np.float64) for x in (p, g, m, v))
        g = g * grad_scale
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd) if d else p
        root = np.sqrt(1 - b2**t)
        p = p - lr * root / (1 - b1**t) * m / (np.sqrt(v) + eps * root)
        for k, x in enumerate((p, m, v)):
            out[k].append(x)
    return out


def _close(got, want, what="", rtol=1e-6):
    """Within rtol elementwise, and within rtol of the tensor's largest magnitude for entries near
    zero (an update that cancels a parameter leaves no meaningful relative error)."""
    atol = rtol * float(np.abs(want).max()) + 1e-30
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
@pytest.mark.parametrize("seed", [0, 1])
def test_step_matches_reference_and_float64(seed, grad_scale):
    arrays, steps, decay = _case(seed)
    fused = _run_step(arrays, steps, decay, True, grad_scale)
    ref = _run_step(arrays, steps, decay, False, grad_scale)
    exact = _numpy_step(arrays, steps, decay, grad_scale)
    for what, f, r, x in zip(("param", "moment1", "moment2"), fused, ref, exact):
        for i, (a, b, c) in enumerate(zip(f, r, x)):
            _close(a, b, f"{what} {i} vs reference")
            _close(a, c, f"{what} {i} vs float64")
    # The update moved the parameters (the comparison is not of untouched values).
    for (p, *_), a in zip(arrays, fused[0]):
        assert np.mean(a != p) > 0.5


def test_step_does_not_depend_on_the_thread_count(threads):
    arrays, steps, decay = _case(2)
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(_run_step(arrays, steps, decay, True, 0.5))
    for other in results[1:]:
        for a_list, b_list in zip(results[0], other):
            for a, b in zip(a_list, b_list):
                np.testing.assert_array_equal(a, b)


def test_step_matches_paddle_adamw_kernel():
    """One step through paddle.optimizer.AdamW (its CPU kernel, decayed and not) and through the
    op agree to float32 rounding (bit for bit on AVX-512 CPUs, where both use the same FMAs)."""
    arrays, _, decay = _case(3)
    params, grads, m1, m2 = _tensors(arrays)
    names = {p.name for p, d in zip(params, decay) if d}
    opt = paddle.optimizer.AdamW(
        learning_rate=HYPER["lr"],
        parameters=params,
        beta1=HYPER["beta1"],
        beta2=HYPER["beta2"],
        epsilon=HYPER["epsilon"],
        weight_decay=HYPER["coeff"],
        apply_decay_param_fun=lambda n: n in names,
    )
    for p, g in zip(params, grads):
        p._set_grad_ivar(g)
    opt.step()
    mine = _run_step([[a[0], a[1], 0 * a[2], 0 * a[3]] for a in arrays], [1] * len(arrays),
                     decay, True, 1.0)  # fmt: skip
    for p, got in zip(params, mine[0]):
        _close(got, p.numpy())


def test_op_refuses_mismatched_lists_and_dtypes():
    arrays, steps, decay = _case(4, shapes=[(5,), (7,)])
    params, grads, m1, m2 = _tensors(arrays)
    b1, b2 = _pows(steps, 0.9), _pows(steps, 0.95)
    with pytest.raises(Exception, match="one entry per parameter"):
        seam.adamw_step(params, grads[:1], m1, m2, b1, b2, decay, **HYPER)
    with pytest.raises(Exception, match="elements"):
        seam.adamw_step(params, grads[::-1], m1, m2, b1, b2, decay, **HYPER)
    with pytest.raises(Exception, match="float32"):
        seam._op().adamw_sq_norms([g.astype("float64") for g in grads])


# ------------------------------------------------------------------------- sums of squares


def test_sq_norms_match_numpy_float64_and_reference():
    rng = np.random.default_rng(5)
    arrays = [
        (rng.standard_normal(s) * 10 ** rng.uniform(-3, 3)).astype(np.float32) for s in SHAPES
    ]
    grads = [paddle.to_tensor(a) for a in arrays]
    want = np.array([np.sum(a.astype(np.float64) ** 2) for a in arrays])
    got = seam.grad_sq_norms(grads)
    assert got.dtype == np.float64 and got.shape == (len(arrays),)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(seam.grad_sq_norms(grads, fused=False), want, rtol=1e-12)
    assert seam.grad_sq_norms([]).shape == (0,)


def test_sq_norms_do_not_depend_on_the_thread_count(threads):
    rng = np.random.default_rng(6)
    grads = [paddle.to_tensor(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append(seam.grad_sq_norms(grads))
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


def test_norm_helpers_fused_and_unfused_agree():
    """Both paths sum in float64: the norms agree far below float32 resolution."""
    model = _model(7)
    _backward(model, _inputs(8)[0])
    params = model.parameters()
    want = np.array([np.sum(p.grad.numpy().astype(np.float64) ** 2) for p in params])
    for fused in (True, False):
        np.testing.assert_allclose(tensor_sq_norms(params, fused), want, rtol=1e-12)
        assert global_grad_norm(params, fused) == pytest.approx(np.sqrt(want.sum()), rel=1e-12)


# --------------------------------------------------------------------------- the optimizer


class _Net(paddle.nn.Layer):
    """An MLP with a LayerNorm and biases (not decayed) and a side branch used on some steps only
    (its parameters have no gradient in the others, like layers an elastic view skips)."""

    def __init__(self):
        super().__init__()
        self.inp = paddle.nn.Linear(6, 40)
        self.out_norm = paddle.nn.LayerNorm(40)
        self.side = paddle.nn.Linear(40, 40)
        self.head = paddle.nn.Linear(40, 3)

    def forward(self, x, use_side: bool):
        h = paddle.tanh(self.inp(x))
        if use_side:
            h = h + paddle.tanh(self.side(h))
        return self.head(self.out_norm(h))


def _model(seed: int) -> _Net:
    paddle.seed(seed)
    return _Net()


def _inputs(seed: int, n: int = 1):
    rng = np.random.default_rng(seed)
    # Scaled so that some steps' gradients exceed the clip threshold and others do not.
    return [
        rng.standard_normal((8, 6)).astype(np.float32) * (1 + 3 * (i % 4 == 2)) for i in range(n)
    ]


def _backward(model, x, use_side=True):
    (model(paddle.to_tensor(x), use_side) ** 2).mean().backward()


def _optimizer(model, fused: bool, weight_decay: float):
    cfg = TrainConfig(lr=2e-2, weight_decay=weight_decay, fused_optimizer=fused)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, FusedAdamW) == fused
    return opt


def _train(model, opt, xs, max_norm: float, first_step: int = 0):
    """Steps over xs; returns the parameters after every step."""
    history = []
    for i, x in enumerate(xs):
        step = first_step + i
        opt.set_lr(2e-2 * (1 + step % 5) / 5)
        _backward(model, x, use_side=step % 3 != 1)
        clip_by_global_norm(model.parameters(), max_norm, opt)
        opt.step()
        opt.clear_grad(set_to_zero=False)
        history.append({n: p.numpy() for n, p in model.named_parameters()})
    return history


def _assert_close(got: dict, want: dict, what=""):
    for name, w in want.items():
        _close(got[name], w, f"{what} {name}")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("max_norm", [0.0, 0.5])
def test_fused_optimizer_tracks_paddle_adamw_over_20_steps(weight_decay, max_norm):
    xs = _inputs(9, 20)
    runs = []
    for fused in (True, False):
        model = _model(10)
        runs.append(_train(model, _optimizer(model, fused, weight_decay), xs, max_norm))
    for step, (got, want) in enumerate(zip(*runs)):
        _assert_close(got, want, what=f"step {step}")
    # The side branch skipped steps, and the parameters moved.
    assert not np.allclose(runs[0][-1]["inp.weight"], _model(10).inp.weight.numpy())


def test_clip_factor_is_applied_inside_the_fused_step():
    """With the fused optimizer the clip leaves the gradients alone and its step uses them scaled;
    over a subset of the parameters it scales them at once, as without."""
    model = _model(11)
    opt = _optimizer(model, True, 0.1)
    _backward(model, _inputs(12)[0] * 10)
    raw = {n: p.grad.numpy() for n, p in model.named_parameters()}
    norm = clip_by_global_norm(model.parameters(), 0.1, opt)
    assert norm > 0.1
    for n, p in model.named_parameters():
        np.testing.assert_array_equal(p.grad.numpy(), raw[n])
    subset = [model.head.weight]
    clip_by_global_norm(subset, 1e-3, opt)
    assert float(np.abs(model.head.weight.grad.numpy()).max()) < float(
        np.abs(raw["head.weight"]).max()
    )
    opt.clear_grad()
    assert opt._grad_scale == 1.0


def _portable_keys(state: dict) -> dict:
    return {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("first_fused", [True, False])
def test_state_moves_between_fused_and_paddle_adamw(first_fused):
    """Save after 6 steps from one optimizer, load into the other on a fresh model, continue 6
    steps: the parameters match a run that never switched; both save the same entries."""
    xs = _inputs(13, 12)
    straight_model = _model(14)
    straight_opt = _optimizer(straight_model, first_fused, 0.1)
    straight = _train(straight_model, straight_opt, xs, 0.5)
    model = _model(14)
    opt = _optimizer(model, first_fused, 0.1)
    _train(model, opt, xs[:6], 0.5)
    state = optimizer_state(model, opt)
    other_model = _model(15)
    other_model.set_state_dict(model.state_dict())
    other = _optimizer(other_model, not first_fused, 0.1)
    load_optimizer_state(other_model, other, state)
    resumed = _train(other_model, other, xs[6:], 0.5, first_step=6)
    for step, (got, want) in enumerate(zip(resumed, straight[6:])):
        _assert_close(got, want, what=f"step {6 + step}")
    after = optimizer_state(other_model, other)
    assert _portable_keys(after) == _portable_keys(optimizer_state(straight_model, straight_opt))
    assert {k.partition("::")[2] for k in after} == {
        "moment1_0",
        "moment2_0",
        "beta1_pow_acc_0",
        "beta2_pow_acc_0",
    }


def test_state_dict_round_trips_and_rejects_foreign_keys():
    model = _model(17)
    opt = _optimizer(model, True, 0.1)
    _train(model, opt, _inputs(18, 3), 0.0)
    state = {k: v.numpy() for k, v in opt.state_dict().items()}
    copy = FusedAdamW(parameters=model.parameters(), learning_rate=1.0)
    copy.set_state_dict(state)
    for key, value in copy.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[key])
    with pytest.raises(KeyError, match="belongs to no parameter"):
        copy.set_state_dict({"no_such.w_0_moment1_0": np.zeros(1)})
    first = next(iter(state))
    with pytest.raises(KeyError, match="lacks"):
        copy.set_state_dict({first: state[first]})


def test_build_optimizer_choice():
    model = _model(19)
    assert isinstance(build_optimizer(model, TrainConfig()), FusedAdamW)
    for cfg, kw in (
        (TrainConfig(fused_optimizer=False), {}),
        (TrainConfig(), {"allow_fused": False}),
        (LoopConfig(), {}),
    ):
        opt = build_optimizer(model, cfg, **kw)
        assert isinstance(opt, paddle.optimizer.AdamW)
    with policy.reference_kernels():
        assert isinstance(build_optimizer(model, TrainConfig()), paddle.optimizer.AdamW)
