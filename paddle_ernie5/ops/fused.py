"""Fused RMSNorm, RoPE on q and k, and SwiGLU: thin seams over custom_ops/fused, references beside.

Legend: B batch, S sequence, H query heads, K key/value heads, D head_dim, M width, F SwiGLU width.

Each function runs the C++ CPU op when `policy.fused_allowed(fused, ...)` holds (the switch, from
`model.fused_ops`, is on, every tensor is float32 on the CPU and no `reference_kernels()` block is
active) and otherwise its pure-Paddle reference, which is written next to it and takes the same
arguments. The two agree to float32 rounding, forward and backward (tests/ops/test_fused.py).

    rms_norm(x, weight, eps)                    y = x * rsqrt(mean(x^2) + eps) * weight
    rope_qkv(qkv_BSND, cos, sin, H, K)          split [H, K, K] + rotate-half RoPE on q and k
    swiglu(x)                                   silu(x[..., :F]) * x[..., F:]

The op library is built on first use (paddle_ernie5.ops.build) and loaded once per process; a
build that fails raises with the compiler's reason (model.fused_ops=false runs the references).
"""

from __future__ import annotations

import functools

import paddle
from paddle.nn import functional as F

from . import policy


@functools.lru_cache(maxsize=1)
def _op():
    # Imported lazily: loading registers the ops with Paddle and may build them on first use.
    from paddle_ernie5.ops import build

    return build.load(auto_build=True, op="fused")


def _contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


# ----------------------------------------------------------------------------------- RMSNorm


def rms_norm_reference(x, weight, eps: float):
    """RMSNorm over the last axis with float32 statistics, cast back to x's dtype, times weight."""
    x32 = x.astype("float32")
    y = x32 * paddle.rsqrt(x32.pow(2).mean(axis=-1, keepdim=True) + eps)
    return y.astype(x.dtype) * weight


def rms_norm(x, weight, eps: float, fused: bool = True):
    """`rms_norm_reference`, through the fused op when allowed (one kernel forward, one backward;
    the weight gradient is summed in a fixed order, so it does not depend on the thread count)."""
    if not policy.fused_allowed(fused, x, weight):
        return rms_norm_reference(x, weight, eps)
    y, _ = _op().fused_rms_norm(_contiguous(x), _contiguous(weight), float(eps))
    return y


# -------------------------------------------------------------------------------------- RoPE


def apply_rope(x_BSHD, cos, sin):
    """Rotate-half RoPE: pairs are (i, i + D/2)."""
    half = x_BSHD.shape[-1] // 2
    x1, x2 = x_BSHD[..., :half], x_BSHD[..., half:]
    rotated = paddle.concat([-x2, x1], axis=-1)
    return x_BSHD * cos + rotated * sin


def rope_qkv_reference(qkv_BSND, cos, sin, num_heads: int, num_kv_heads: int):
    """qkv [B, S, H + 2K, D] -> (q [B, S, H, D], k [B, S, K, D], v [B, S, K, D]) with RoPE applied
    to q and k; cos/sin [B, S, 1, D] (model/rope.py `rope_cos_sin`)."""
    q_BSHD, k_BSKD, v_BSKD = qkv_BSND.split([num_heads, num_kv_heads, num_kv_heads], axis=2)
    return apply_rope(q_BSHD, cos, sin), apply_rope(k_BSKD, cos, sin), v_BSKD


def rope_qkv(qkv_BSND, cos, sin, num_heads: int, num_kv_heads: int, fused: bool = True):
    """`rope_qkv_reference`, through the fused op when allowed: the split and both rotations are one
    kernel (v is a copy), and the backward writes d qkv in one pass (the tables get no gradient)."""
    if not policy.fused_allowed(fused, qkv_BSND, cos, sin):
        return rope_qkv_reference(qkv_BSND, cos, sin, num_heads, num_kv_heads)
    q, k, v = _op().fused_rope_qkv(
        _contiguous(qkv_BSND), _contiguous(cos), _contiguous(sin), num_heads, num_kv_heads
    )
    return q, k, v


# ------------------------------------------------------------------------------------ SwiGLU


def swiglu_reference(x):
    """silu(a) * b for x = [a | b] along the last axis (Paddle's one-input swiglu kernel)."""
    return F.swiglu(x)


def swiglu(x, fused: bool = True):
    """`swiglu_reference`, through the fused op when allowed."""
    if not policy.fused_allowed(fused, x):
        return swiglu_reference(x)
    return _op().fused_swiglu(_contiguous(x))
