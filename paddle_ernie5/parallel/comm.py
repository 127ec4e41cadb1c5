"""Collectives with autograd, built only from operations gloo (CPU) and NCCL (GPU) both provide.

Each differentiable op is a PyLayer whose backward is the adjoint collective:

    gather_rows   forward: all_gather rows of every rank, concatenated  [T, M] -> [R*T, M]
                  backward: all_reduce the [R*T, M] gradient, keep this rank's rows
    reduce_rows   forward: all_reduce [R*T, M] partial sums, keep this rank's rows -> [T, M]
                  backward: all_gather the row gradients of every rank
    all_to_all    forward: block p of this rank goes to rank p  [R, ...] -> [R, ...]
                  backward: the same exchange applied to the gradient (it is its own adjoint)

`group` is a paddle.distributed Group, `Solo` for a role this rank holds alone (every collective
over it is the identity), or None for the global group. All ranks pass equal shapes.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist
from paddle.autograd import PyLayer


class Solo:
    """A group of one rank: collectives over it return their input."""

    nranks, rank = 1, 0

    def __init__(self, global_rank: int):
        self.ranks = [global_rank]


def group_size(group) -> int:
    return dist.get_world_size() if group is None else group.nranks


def group_rank(group) -> int:
    return dist.get_rank() if group is None else group.rank


def _all_gather_cat(x, group):
    if group_size(group) == 1:
        return x
    parts: list = []
    dist.all_gather(parts, x.contiguous(), group=group)
    return paddle.concat(parts, axis=0)


def _all_reduce(x, group):
    x = x.clone()
    if group_size(group) == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def _my_rows(x, group):
    rows = x.shape[0] // group_size(group)
    start = group_rank(group) * rows
    return x[start : start + rows]


class _GatherRows(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_cat(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _my_rows(_all_reduce(grad, ctx.group), ctx.group)


class _ReduceRows(PyLayer):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _my_rows(_all_reduce(x, group), group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_cat(grad, ctx.group)


def gather_rows(x, group):
    """Rows of every rank of `group`, concatenated in rank order (differentiable)."""
    return _GatherRows.apply(x, group)


def reduce_rows(x, group):
    """Sum of `x` over the ranks of `group`, this rank's share of rows (differentiable)."""
    return _ReduceRows.apply(x, group)


def gather_rows_nograd(x, group):
    return _all_gather_cat(x, group)


def nccl_all_to_all(x_R, group):
    """Exchange blocks x_R[p] -> rank p with paddle.distributed.alltoall (NCCL; gloo lacks it)."""
    out: list = []
    dist.alltoall(out, list(x_R.unbind(0)), group=group)
    return paddle.stack(out, axis=0)


def all_gather_all_to_all(x_R, group):
    """The same exchange built from all_gather (every rank sees every block): for tests on gloo."""
    me = group_rank(group)
    everyone = _all_gather_cat(x_R.unsqueeze(0), group)  # [src, dst, ...]
    return everyone[:, me]


class _AllToAll(PyLayer):
    @staticmethod
    def forward(ctx, x_R, group, exchange):
        ctx.group, ctx.exchange = group, exchange
        return exchange(x_R, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.exchange(grad, ctx.group)


def all_to_all(x_R, group, exchange=nccl_all_to_all):
    """Differentiable block exchange: out[p] on rank q = x_R[q] of rank p."""
    return _AllToAll.apply(x_R, group, exchange)


def all_reduce_numpy(values: np.ndarray, group, op: str = "sum") -> np.ndarray:
    """Sum (or max) of a small host array over `group`, returned on every rank."""
    if group_size(group) == 1:
        return np.array(values)
    t = paddle.to_tensor(np.ascontiguousarray(values))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t.numpy()
