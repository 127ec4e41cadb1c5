"""Output projection + cross-entropy without the full logits: a thin seam over custom_ops/linear_ce,
the pure-Paddle reference beside it.

Legend: T rows (tokens), M width, V vocabulary.

    linear_cross_entropy(h_TM, weight, labels_T, transpose_weight)  ->  loss_T

    logits_TV = h_TM @ weight          weight [M, V] (a Linear's weight), transpose_weight=False
              = h_TM @ weight^T        weight [V, M] (a tied embedding table), transpose_weight=True
    loss_T[t] = logsumexp(logits_TV[t]) - logits_TV[t, labels_T[t]],   0 where labels_T[t] = -100

The result is the per-row loss (reduction "none", as `F.cross_entropy(..., reduction="none")`
gives it); the caller takes the mean over the rows with a target (model/losses.py). It is
differentiable in h and weight.

The C++ op runs when `policy.fused_allowed(fused, h, weight)` holds (the switch, from
`model.fused_ops`, is on, both tensors are float32 on the CPU and no `reference_kernels()` block is
active). It computes the logits a tile of 96 rows x 256 columns at a time with an online
logsumexp, keeps only the per-row logsumexp for the backward pass, and there recomputes each tile
to form dloss * (softmax - onehot) and accumulate dh and dweight: no [T, V] tensor is ever
allocated. Its gradients are bit-identical for any thread count. The two paths agree to float32
rounding, forward and backward (tests/ops/test_linear_ce.py).

The op library is built on first use (paddle_ernie5.ops.build) and loaded once per process.
"""

from __future__ import annotations

import functools

import paddle
from paddle.nn import functional as F

from . import policy

IGNORE_INDEX = -100


@functools.lru_cache(maxsize=1)
def _op():
    # Imported lazily: loading registers the op with Paddle and may build it on first use.
    from paddle_ernie5.ops import build

    return build.load(auto_build=True, op="linear_ce")


def _check(h_TM, weight, labels_T, transpose_weight: bool) -> None:
    if len(h_TM.shape) != 2 or len(weight.shape) != 2 or len(labels_T.shape) != 1:
        raise ValueError(
            "linear_cross_entropy: h must be [T, M], weight 2-D and labels [T]; got "
            f"{h_TM.shape}, {weight.shape}, {labels_T.shape}"
        )
    m = weight.shape[1] if transpose_weight else weight.shape[0]
    if m != h_TM.shape[1] or labels_T.shape[0] != h_TM.shape[0]:
        layout = "[V, M]" if transpose_weight else "[M, V]"
        raise ValueError(
            f"linear_cross_entropy: h {h_TM.shape}, weight {weight.shape} (expected {layout}) and "
            f"labels {labels_T.shape} disagree"
        )


def linear_cross_entropy_reference(h_TM, weight, labels_T, transpose_weight: bool):
    """The logits as one [T, V] tensor, then Paddle's cross-entropy (float32), per row."""
    _check(h_TM, weight, labels_T, transpose_weight)
    logits_TV = paddle.matmul(h_TM, weight, transpose_y=transpose_weight)
    return F.cross_entropy(
        logits_TV.astype("float32"),
        labels_T.reshape([-1, 1]),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).reshape([-1])


def _contiguous(t):
    return t if t.is_contiguous() else t.contiguous()


def linear_cross_entropy(h_TM, weight, labels_T, transpose_weight: bool, fused: bool = True):
    """Per-row cross-entropy [T] of the logits h_TM @ weight (weight^T when `transpose_weight`),
    0 for rows whose label is -100; through the C++ op when allowed (see the module docstring)."""
    if not policy.fused_allowed(fused, h_TM, weight):
        return linear_cross_entropy_reference(h_TM, weight, labels_T, transpose_weight)
    _check(h_TM, weight, labels_T, transpose_weight)
    labels_T = labels_T if labels_T.dtype == paddle.int64 else labels_T.astype("int64")
    loss_T, _ = _op().linear_ce_cpu(
        _contiguous(h_TM),
        _contiguous(weight),
        _contiguous(labels_T),
        bool(transpose_weight),
        IGNORE_INDEX,
    )
    return loss_T
