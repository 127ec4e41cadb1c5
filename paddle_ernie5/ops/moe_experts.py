"""Routed SwiGLU experts: y_t = sum_k w_tk * SwiGLU_{e_tk}(x_t), one entry point, two backends.

Legend: T tokens, M width, E experts, F expert hidden width, K top-k, C rows per expert.

Shapes: x_TM [T, M], w_gate_up [E, M, 2F] (gate columns, then up), w_down [E, F, M],
topk_ids_TK int64 [T, K], topk_weights_TK [T, K]. Differentiable in x, both weights and the combine
weights (the router's scores get their gradient through them).

Backends (`backend=`, from `model.moe.expert_backend`):
  "cpu_op"   the C++ custom op in custom_ops/moe_experts: token rows read by index, no grid padded
             to the busiest expert, OpenMP over experts (fp32 math; other dtypes are cast)
  "grouped"  the pure-Paddle reference: host-side grouping into an [E, C, M] grid, two batched
             matmuls with a fused swiglu, a gather back and a weighted sum (any device)
  "auto"     "cpu_op" for CPU tensors, "grouped" for GPU tensors (the CPU op never receives GPU
             tensors; under the trainer's GPU auto_cast, "bmm" is white-listed so the grouped
             matmuls run in bfloat16/float16)
With a capacity factor, assignments past the first C of an expert (in token order) contribute zero
on both backends.
"""

from __future__ import annotations

import functools

import paddle
from paddle.nn.functional import swiglu

from .grouping import combine_grouped, expert_capacity, gather_grouped, group_by_expert

BACKENDS = ("auto", "cpu_op", "grouped")


def resolve(backend: str, on_gpu: bool) -> str:
    """The concrete backend `backend` means for tensors on a GPU (`on_gpu`) or on the CPU. Pure:
    the place is an argument. auto -> "cpu_op" on the CPU, "grouped" on a GPU (any dtype)."""
    if backend not in BACKENDS:
        raise ValueError(f"MoE expert backend {backend!r} is unknown; choose one of {BACKENDS}")
    if backend == "auto":
        return "grouped" if on_gpu else "cpu_op"
    if backend == "cpu_op" and on_gpu:
        raise RuntimeError(
            "MoE expert backend 'cpu_op' needs CPU tensors, got GPU tensors; "
            "use 'grouped' or 'auto'"
        )
    return backend


def resolve_backend(backend: str, x_TM) -> str:
    """The concrete backend `backend` means for this input tensor (see `resolve`)."""
    return resolve(backend, not x_TM.place.is_cpu_place())


def grouped_swiglu(x_ECM, w_gate_up, w_down):
    """E SwiGLU experts on rows already grouped per expert: [E, C, M] -> [E, C, M]."""
    return paddle.bmm(swiglu(paddle.bmm(x_ECM, w_gate_up)), w_down)


def _check(x_TM, w_gate_up, w_down, topk_ids_TK, topk_weights_TK) -> None:
    if len(x_TM.shape) != 2 or len(w_gate_up.shape) != 3 or len(w_down.shape) != 3:
        raise ValueError(
            "moe_experts: x must be [T, M], w_gate_up [E, M, 2F], w_down [E, F, M]; "
            f"got {x_TM.shape}, {w_gate_up.shape}, {w_down.shape}"
        )
    t, m = x_TM.shape
    e, m2, f2 = w_gate_up.shape
    if m2 != m or f2 % 2 or list(w_down.shape) != [e, f2 // 2, m]:
        raise ValueError(
            f"moe_experts: x {x_TM.shape}, w_gate_up {w_gate_up.shape} and w_down "
            f"{w_down.shape} disagree (expected [T, M], [E, M, 2F], [E, F, M])"
        )
    if (
        list(topk_ids_TK.shape) != list(topk_weights_TK.shape)
        or len(topk_ids_TK.shape) != 2
        or topk_ids_TK.shape[0] != t
    ):
        raise ValueError(
            f"moe_experts: topk ids {topk_ids_TK.shape} and weights "
            f"{topk_weights_TK.shape} must both be [T={t}, K]"
        )


def moe_experts_reference(
    x_TM, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, capacity_factor: float = 0.0
):
    """The grouped pure-Paddle path (the local dispatcher around `grouped_swiglu`)."""
    _check(x_TM, w_gate_up, w_down, topk_ids_TK, topk_weights_TK)
    e = w_gate_up.shape[0]
    slot_N, source_EC, _, capacity = group_by_expert(topk_ids_TK.numpy(), e, capacity_factor)
    x_ECM = gather_grouped(x_TM, source_EC, e, capacity)
    return combine_grouped(
        grouped_swiglu(x_ECM, w_gate_up, w_down),
        paddle.to_tensor(slot_N),
        topk_weights_TK,
        x_TM.shape[0],
    )


@functools.lru_cache(maxsize=1)
def _cpu_op():
    # Imported lazily: loading registers the op with Paddle and may build it on first use.
    from paddle_ernie5.ops import build

    return build.load(auto_build=True, op="moe_experts")


def _fp32(t):
    t = t if t.dtype == paddle.float32 else t.astype("float32")
    return t if t.is_contiguous() else t.contiguous()


def _moe_experts_cpu(x_TM, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, capacity_factor):
    t, k = topk_ids_TK.shape
    capacity = expert_capacity(t, k, w_gate_up.shape[0], capacity_factor)
    ids = topk_ids_TK.astype("int64") if topk_ids_TK.dtype != paddle.int64 else topk_ids_TK
    y_TM, _, _, _ = _cpu_op().moe_experts_cpu(
        _fp32(x_TM),
        _fp32(w_gate_up),
        _fp32(w_down),
        _fp32(topk_weights_TK),
        ids if ids.is_contiguous() else ids.contiguous(),
        capacity,
    )
    return y_TM if x_TM.dtype == paddle.float32 else y_TM.astype(x_TM.dtype)


def moe_experts(
    x_TM,
    w_gate_up,
    w_down,
    topk_ids_TK,
    topk_weights_TK,
    capacity_factor: float = 0.0,
    backend: str = "auto",
):
    """y_TM = sum_k topk_weights_TK[:, k] * SwiGLU_{topk_ids_TK[:, k]}(x_TM) on the chosen backend.

    `capacity_factor` as in the dispatcher: 0 = dropless."""
    chosen = resolve_backend(backend, x_TM)
    if chosen == "grouped":
        return moe_experts_reference(
            x_TM, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, capacity_factor
        )
    _check(x_TM, w_gate_up, w_down, topk_ids_TK, topk_weights_TK)
    return _moe_experts_cpu(x_TM, w_gate_up, w_down, topk_ids_TK, topk_weights_TK, capacity_factor)
