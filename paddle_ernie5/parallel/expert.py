"""Expert parallelism: each rank of the ep group holds E/ep experts; dispatchers move tokens to
them.

Legend: R ranks in the ep group, T tokens of this rank, M width, K top-k, E experts in all,
L = E/R experts held here, C capacity (rows per expert).

The model is built whole (same seed on every rank), then `shard_experts` swaps every MoE layer's
expert weights for this rank's rows and its dispatcher for a distributed one. Parameter names do
not change, so a full checkpoint maps onto any ep degree by cutting or joining rows
(`gather_expert_rows`, `slice_expert_rows`).

All-gather dispatcher (any backend, gloo included):

    x_TM ── gather_rows ──> x_(RT)M ── group by expert (grid of one process) ── my L experts' rows
    y_TM <── reduce_rows ── partial y_(RT)M (only my experts' contributions) <── combine

All-to-all dispatcher (NCCL): tokens are grouped per expert locally into [E, C, M], the E = R x L
blocks are exchanged so each rank receives [R, L, C, M] for its experts, and the reverse exchange
brings results home. C is the largest per-rank expert load over the group (dropless), or the
capacity-factor bound computed from this rank's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle

from ..model.dispatch import DispatchMeta, LocalDispatcher
from ..model.router import Routing
from ..ops.grouping import group_by_expert
from . import comm


@dataclass
class AllGatherMeta(DispatchMeta):
    ranks: int = 1
    hidden: int = 0
    top_k: int = 0


@dataclass
class AllToAllMeta(DispatchMeta):
    ranks: int = 1
    hidden: int = 0
    num_experts: int = 0


def _combine_rows(expert_outputs_ECM, meta: DispatchMeta):
    """Weighted sum of each token's K expert outputs from a flat [E*C] grid (slot E*C = zero)."""
    return LocalDispatcher().combine(expert_outputs_ECM, meta)


class AllGatherDispatcher:
    """Every rank sees every token of the ep group; each computes only its own experts' rows."""

    name = "allgather"

    def __init__(self, group, ep_rank: int, ep: int, capacity_factor: float = 0.0):
        self.group, self.ep_rank, self.ep = group, ep_rank, ep
        self.capacity_factor = capacity_factor

    def dispatch(self, x_TM, routing: Routing, num_experts: int):
        t, m = x_TM.shape
        k = routing.topk_ids_TK.shape[-1]
        local = num_experts // self.ep
        first = self.ep_rank * local
        x_all = comm.gather_rows(x_TM, self.group)
        weights_all = comm.gather_rows(routing.topk_weights_TK, self.group)
        ids_all = comm.gather_rows_nograd(routing.topk_ids_TK, self.group).numpy()
        # The grid of one process over the whole group's tokens; this rank keeps its experts' rows.
        slot_N, source_EC, counts_E, capacity = group_by_expert(
            ids_all, num_experts, self.capacity_factor
        )
        lo, hi = first * capacity, (first + local) * capacity
        mine_N = (slot_N >= lo) & (slot_N < hi)
        slot_N = np.where(mine_N, slot_N - lo, local * capacity)
        x_pad = paddle.concat([x_all, paddle.zeros([1, m], dtype=x_all.dtype)], axis=0)
        inputs_LCM = paddle.gather(x_pad, paddle.to_tensor(source_EC[lo:hi])).reshape(
            [local, capacity, m]
        )
        meta = AllGatherMeta(
            paddle.to_tensor(slot_N),
            weights_all,
            x_all.shape[0],
            capacity,
            ranks=self.ep,
            hidden=m,
            top_k=k,
        )
        return inputs_LCM, counts_E[first : first + local], meta

    def combine(self, expert_outputs_LCM, meta: AllGatherMeta):
        return comm.reduce_rows(_combine_rows(expert_outputs_LCM, meta), self.group)

    @staticmethod
    def bytes_sent(meta: AllGatherMeta, dtype_bytes: int = 4) -> int:
        """Bytes one rank sends per layer, forward + backward, with ring collectives.

        all_gather of n bytes per rank sends (R-1) n; all_reduce of N bytes sends 2 (R-1)/R N.
        Forward: gather x, weights, ids; all_reduce partial outputs. Backward: all_reduce the
        gradients of x and weights; all_gather output gradients."""
        r, t = meta.ranks, meta.num_tokens // meta.ranks
        x = t * meta.hidden * dtype_bytes
        w, ids = t * meta.top_k * 4, t * meta.top_k * 8
        gather = (r - 1) * (x + w + ids)
        reduce_out = 2 * (r - 1) * x  # all_reduce of the R*T rows
        backward = 2 * (r - 1) * (x + w) + (r - 1) * x
        return gather + reduce_out + backward


class AllToAllDispatcher:
    """Tokens travel only to the rank that holds their expert (NCCL all-to-all)."""

    name = "alltoall"

    def __init__(
        self,
        group,
        ep_rank: int,
        ep: int,
        capacity_factor: float = 0.0,
        exchange=comm.nccl_all_to_all,
    ):
        self.group, self.ep_rank, self.ep = group, ep_rank, ep
        self.capacity_factor = capacity_factor
        self.exchange = exchange  # comm.all_gather_all_to_all emulates it on gloo for tests

    def dispatch(self, x_TM, routing: Routing, num_experts: int):
        t, m = x_TM.shape
        r, local = self.ep, num_experts // self.ep
        slot_N, source_EC, _, capacity = group_by_expert(
            routing.topk_ids_TK.numpy(), num_experts, self.capacity_factor
        )
        counts_RE = comm.gather_rows_nograd(
            paddle.to_tensor(
                np.bincount(routing.topk_ids_TK.numpy().reshape(-1), minlength=num_experts)
            ).unsqueeze(0),
            self.group,
        ).numpy()
        if self.capacity_factor == 0:
            # Dropless: every rank pads to the largest per-rank load so the exchanged blocks agree.
            slot_N, source_EC, capacity = _regrid(
                slot_N, source_EC, capacity, int(max(1, counts_RE.max())), num_experts, t
            )
        x_pad = paddle.concat([x_TM, paddle.zeros([1, m], dtype=x_TM.dtype)], axis=0)
        grid_RLCM = paddle.gather(x_pad, paddle.to_tensor(source_EC)).reshape(
            [r, local, capacity, m]
        )
        recv_RLCM = comm.all_to_all(grid_RLCM, self.group, self.exchange)
        inputs_LCM = recv_RLCM.transpose([1, 0, 2, 3]).reshape([local, r * capacity, m])
        meta = AllToAllMeta(
            paddle.to_tensor(slot_N),
            routing.topk_weights_TK,
            t,
            capacity,
            ranks=r,
            hidden=m,
            num_experts=num_experts,
        )
        first = self.ep_rank * local
        return inputs_LCM, counts_RE.sum(0)[first : first + local], meta

    def combine(self, expert_outputs_LCM, meta: AllToAllMeta):
        r, c, m = meta.ranks, meta.capacity, meta.hidden
        local = expert_outputs_LCM.shape[0]
        back_RLCM = comm.all_to_all(
            expert_outputs_LCM.reshape([local, r, c, m]).transpose([1, 0, 2, 3]),
            self.group,
            self.exchange,
        )
        return _combine_rows(back_RLCM.reshape([r * local, c, m]), meta)

    @staticmethod
    def bytes_sent(meta: AllToAllMeta, dtype_bytes: int = 4) -> int:
        """Bytes one rank sends per layer, forward + backward: four exchanges of the [E, C, M] grid
        (of which (R-1)/R leaves the rank) and the all_gather of the per-expert counts."""
        r = meta.ranks
        grid = meta.num_experts * meta.capacity * meta.hidden * dtype_bytes
        return 4 * (r - 1) * grid // r + (r - 1) * meta.num_experts * 8


def _regrid(slot_N, source_EC, capacity, new_capacity, num_experts, num_tokens):
    """Re-lay a dropless [E, capacity] grid as [E, new_capacity] (new_capacity >= capacity)."""
    e_N, rank_N = np.divmod(slot_N, capacity)
    slot_N = e_N * new_capacity + rank_N
    grid = np.full([num_experts, new_capacity], num_tokens, dtype=np.int64)
    grid[:, :capacity] = source_EC.reshape(num_experts, capacity)
    return slot_N, grid.reshape(-1), new_capacity


# ------------------------------------------------------------------------ weights of the shard


def expert_banks(model) -> list[tuple[str, object]]:
    """(name prefix, GroupedExperts) of every distinct expert bank: one per MoE layer, or the
    universal pool once (MoUE: every MoE layer runs the same bank)."""
    if getattr(model, "universal", None) is not None:
        return [("universal.experts", model.universal.experts)]
    return [(f"blocks.{i}.ffn.experts", moe.experts) for i, moe in model.moe_layers()]


def expert_param_names(model) -> list[str]:
    """Structured names of the stacked expert weights (rows = experts) of every expert bank."""
    return [f"{prefix}.{w}" for prefix, _ in expert_banks(model) for w in ("w_gate_up", "w_down")]


def make_dispatcher(kind: str, group, ep_rank: int, ep: int, capacity_factor: float):
    if kind == "allgather":
        return AllGatherDispatcher(group, ep_rank, ep, capacity_factor)
    if kind == "alltoall":
        return AllToAllDispatcher(group, ep_rank, ep, capacity_factor)
    raise ValueError(f"dispatcher {kind!r} cannot serve ep={ep}; use allgather or alltoall")


def resolve_dispatcher(kind: str, ep: int, cuda: bool) -> str:
    """The concrete dispatcher `parallel.dispatcher` means: auto -> alltoall on GPU builds."""
    if ep == 1:
        return "local"
    if kind == "auto":
        return "alltoall" if cuda else "allgather"
    if kind == "alltoall" and not cuda:
        raise RuntimeError(
            "parallel.dispatcher=alltoall needs NCCL (a GPU build of Paddle); gloo on "
            "CPU has no all-to-all: use parallel.dispatcher=allgather or auto"
        )
    if kind == "local":
        raise RuntimeError(
            f"parallel.dispatcher=local cannot run with parallel.ep={ep}: each rank "
            "holds only its own experts; use auto, allgather or alltoall"
        )
    return kind


def shard_experts(model, ep_rank: int, ep: int, dispatcher) -> None:
    """Keep rows [ep_rank*L, (ep_rank+1)*L) of every expert bank's weights (a universal pool's
    once) and install `dispatcher` in every MoE layer."""
    for _, bank in expert_banks(model):
        for name in ("w_gate_up", "w_down"):
            full = getattr(bank, name)
            local = full.shape[0] // ep
            part = full.numpy()[ep_rank * local : (ep_rank + 1) * local]
            setattr(
                bank,
                name,
                paddle.create_parameter(
                    part.shape,
                    str(full.dtype).replace("paddle.", ""),
                    default_initializer=paddle.nn.initializer.Assign(part),
                ),
            )
    for _, moe in model.moe_layers():
        moe.dispatcher = dispatcher


def gather_expert_rows(state: dict[str, np.ndarray], names: list[str], group, local_shapes) -> dict:
    """Full-size copies of the expert entries of `state` (model or optimizer, '::' suffixes
    allowed)."""
    out = dict(state)
    for key in sorted(state):  # the same order on every rank: each gather is a collective
        name = key.partition("::")[0]
        if name in names and tuple(state[key].shape) == local_shapes[name]:
            out[key] = comm.gather_rows_nograd(paddle.to_tensor(state[key]), group).numpy()
    return out


def slice_expert_rows(
    state: dict[str, np.ndarray], names: list[str], ep_rank: int, ep: int, full_rows: int
) -> dict:
    """This rank's rows of the expert entries of a full `state`."""
    out = dict(state)
    local = full_rows // ep
    for key, value in state.items():
        if key.partition("::")[0] in names and value.ndim >= 1 and value.shape[0] == full_rows:
            out[key] = value[ep_rank * local : (ep_rank + 1) * local]
    return out
