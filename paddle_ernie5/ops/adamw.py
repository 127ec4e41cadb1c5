"""Fused AdamW step and per-tensor gradient sums of squares over lists of tensors: thin seams over
custom_ops/adamw, references beside.

    adamw_step(params, grads, moment1, moment2, beta1_pows, beta2_pows, decay, lr, beta1, beta2,
               epsilon, coeff, grad_scale)
        for every parameter p with gradient g, moments m, v and beta powers b1^t, b2^t:
            g <- grad_scale * g
            p <- p - (lr * coeff) * p                           (where decay is set)
            m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
            p <- p - lr_t * m / (sqrt(v) + eps_t)
        with lr_t = lr sqrt(1 - b2^t) / (1 - b1^t), eps_t = epsilon sqrt(1 - b2^t): Paddle's AdamW
        (its bias correction folded into the step size and epsilon), updated in place. The beta
        powers are host floats; the caller multiplies them by beta1, beta2 after the step.
    grad_sq_norms(grads) -> float64 [len(grads)]: sum of g^2 of each gradient

Each runs the C++ CPU op when `policy.fused_allowed(fused, ...)` holds (the switch, from
`train.fused_optimizer`, is on, the tensors are float32 on the CPU and no `reference_kernels()`
block is active) and otherwise its pure-Paddle reference. The op's step matches Paddle's AdamW CPU
kernel bit for bit on AVX-512 machines (same float32 operations and fused multiply-adds); the
reference, written with separate Paddle ops, agrees with both to float32 rounding. Both sums of
squares accumulate in float64 (the op in a fixed order, independent of the thread count), so a clip
factor formed from either rounds to the same float32 number but in rare ties.
"""

from __future__ import annotations

import functools

import numpy as np
import paddle

from . import policy


@functools.lru_cache(maxsize=1)
def _op():
    # Imported lazily: loading registers the ops with Paddle and may build them on first use.
    from paddle_ernie5.ops import build

    return build.load(auto_build=True, op="adamw")


# -------------------------------------------------------------------------------------- step


@paddle.no_grad()
def adamw_step_reference(
    params,
    grads,
    moment1,
    moment2,
    beta1_pows,
    beta2_pows,
    decay,
    lr: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    coeff: float,
    grad_scale: float = 1.0,
) -> None:
    """The step with one Paddle op per term, parameter by parameter; the scalar factors are formed
    in float32 as Paddle's kernel forms them."""
    f32, one = np.float32, np.float32(1.0)
    b1, b2 = f32(beta1), f32(beta2)
    decay_factor = float(f32(lr) * f32(coeff))
    for p, g, m, v, b1p, b2p, d in zip(
        params, grads, moment1, moment2, beta1_pows, beta2_pows, decay
    ):
        root = np.sqrt(one - f32(b2p))
        lr_t = float(f32(lr) * (root / (one - f32(b1p))))
        eps_t = float(f32(epsilon) * root)
        g = g * float(f32(grad_scale)) if grad_scale != 1.0 else g
        m_new = float(b1) * m + float(one - b1) * g
        v_new = float(b2) * v + float(one - b2) * (g * g)
        base = p - decay_factor * p if d else p
        p.set_value(base - lr_t * (m_new / (paddle.sqrt(v_new) + eps_t)))
        m.set_value(m_new)
        v.set_value(v_new)


def adamw_step(
    params,
    grads,
    moment1,
    moment2,
    beta1_pows,
    beta2_pows,
    decay,
    lr: float,
    beta1: float,
    beta2: float,
    epsilon: float,
    coeff: float,
    grad_scale: float = 1.0,
    fused: bool = True,
) -> None:
    """`adamw_step_reference`, as one op call over every parameter when allowed (OpenMP over
    chunks of all of them). The policy looks at the parameters only: gradients and moments have
    their dtype and place."""
    if not params:
        return
    if not policy.fused_allowed(fused, *params):
        adamw_step_reference(
            params,
            grads,
            moment1,
            moment2,
            beta1_pows,
            beta2_pows,
            decay,
            lr,
            beta1,
            beta2,
            epsilon,
            coeff,
            grad_scale,
        )
        return
    _op().adamw_step(
        # Paddle refuses in-place custom ops on leaves that require gradients; a detached tensor
        # shares the parameter's storage.
        [p.detach() for p in params],
        list(grads),
        list(moment1),
        list(moment2),
        [float(b) for b in beta1_pows],
        [float(b) for b in beta2_pows],
        [int(bool(d)) for d in decay],
        float(lr),
        float(beta1),
        float(beta2),
        float(epsilon),
        float(coeff),
        float(grad_scale),
    )


# ----------------------------------------------------------------------------- sums of squares


@paddle.no_grad()
def grad_sq_norms_reference(grads) -> np.ndarray:
    """Sum of squares of each gradient, in float64 (Paddle's reduction order)."""
    if not grads:
        return np.zeros(0, dtype=np.float64)
    sums = [paddle.sum(paddle.square(g.astype("float64"))) for g in grads]
    return paddle.stack(sums).numpy()


def grad_sq_norms(grads, fused: bool = True) -> np.ndarray:
    """`grad_sq_norms_reference`, as one op call and one host copy when allowed."""
    if not grads:
        return np.zeros(0, dtype=np.float64)
    if not policy.fused_allowed(fused, *grads):
        return grad_sq_norms_reference(grads)
    return _op().adamw_sq_norms(list(grads)).numpy()
