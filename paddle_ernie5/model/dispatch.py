"""Token dispatch: group (token, expert) assignments by expert and scatter results back.

Legend: T tokens, K top-k, E experts, C capacity (tokens per expert after grouping), M width.

    x_TM --dispatch--> expert_inputs_ECM --experts--> expert_outputs_ECM --combine--> y_TM

The interface is shared by every dispatcher (local here; all-gather and all-to-all dispatchers for
expert parallelism live in paddle_ernie5/parallel/): metadata is returned and passed back
explicitly, nothing is kept on the dispatcher. Grouping is index arithmetic on the host plus one
gather each way; dropless by default (C = the largest expert load), or with a capacity factor, in
which case assignments beyond an expert's capacity are dropped (they contribute zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import paddle

from .router import Routing


@dataclass
class DispatchMeta:
    slot_N: paddle.Tensor  # per assignment (token-major, N = T*K): row in the flat [E*C] grid, or E*C if dropped
    weights_TK: paddle.Tensor
    num_tokens: int
    capacity: int
    # Some assignment points at the zero row E*C (dropped, or owned by another rank): combine must
    # append that row. Dropless single-device dispatch skips the copy.
    has_sentinel: bool = True


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows each expert keeps under a capacity factor: ceil(factor * T * K / E); 0 = dropless."""
    if capacity_factor <= 0:
        return 0
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def group_by_expert(topk_ids_TK: np.ndarray, num_experts: int, capacity_factor: float = 0.0):
    """Host-side grouping. Returns (slot_N, source_token_EC, counts_E, capacity).

    slot_N[n] is where assignment n (token n // K) lands in the [E*C] grid (E*C when dropped);
    source_token_EC[g] is the token feeding grid row g (T for an empty row)."""
    t, k = topk_ids_TK.shape
    ids_N = topk_ids_TK.reshape(-1)
    counts_E = np.bincount(ids_N, minlength=num_experts)
    order = np.argsort(ids_N, kind="stable")  # stable: tokens keep their order inside an expert
    starts_E = np.cumsum(counts_E) - counts_E
    rank_N = np.empty_like(ids_N)
    rank_N[order] = np.arange(ids_N.size) - starts_E[ids_N[order]]
    capacity = expert_capacity(t, k, num_experts, capacity_factor) or max(
        1, int(counts_E.max()) if counts_E.size else 1)
    kept_N = rank_N < capacity
    slot_N = np.where(kept_N, ids_N * capacity + rank_N, num_experts * capacity)
    source_EC = np.full([num_experts * capacity], t, dtype=np.int64)
    source_EC[slot_N[kept_N]] = np.arange(ids_N.size)[kept_N] // k
    return slot_N.astype(np.int64), source_EC, np.minimum(counts_E, capacity), capacity


class LocalDispatcher:
    """Single-device dispatcher: every expert lives here."""

    def __init__(self, capacity_factor: float = 0.0):
        self.capacity_factor = capacity_factor

    def dispatch(self, x_TM, routing: Routing, num_experts: int):
        t, m = x_TM.shape
        slot_N, source_EC, counts_E, capacity = group_by_expert(
            routing.topk_ids_TK.numpy(), num_experts, self.capacity_factor)
        x_pad = paddle.concat([x_TM, paddle.zeros([1, m], dtype=x_TM.dtype)], axis=0)
        expert_inputs_ECM = paddle.gather(x_pad, paddle.to_tensor(source_EC)).reshape([num_experts, capacity, m])
        meta = DispatchMeta(paddle.to_tensor(slot_N), routing.topk_weights_TK, t, capacity,
                            has_sentinel=bool((slot_N == num_experts * capacity).any()))
        return expert_inputs_ECM, counts_E, meta

    def combine(self, expert_outputs_ECM, meta: DispatchMeta):
        e, c, m = expert_outputs_ECM.shape
        flat = expert_outputs_ECM.reshape([e * c, m])
        if meta.has_sentinel:
            flat = paddle.concat([flat, paddle.zeros([1, m], dtype=flat.dtype)], axis=0)
        k = meta.weights_TK.shape[-1]
        picked_TKM = paddle.gather(flat, meta.slot_N).reshape([meta.num_tokens, k, m])
        weights_T1K = meta.weights_TK.astype(picked_TKM.dtype).unsqueeze(1)
        return paddle.bmm(weights_T1K, picked_TKM).squeeze(1)
