"""Grouping of (token, expert) assignments by expert: host-side index arithmetic plus one gather
each way. Shared by the dispatchers (model/dispatch.py, parallel/expert.py) and the experts op's
reference (ops/moe_experts.py).

Legend: T tokens, K top-k, E experts, C rows per expert, M width, N = T*K assignments.
"""

from __future__ import annotations

import math

import numpy as np
import paddle


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
        1, int(counts_E.max()) if counts_E.size else 1
    )
    kept_N = rank_N < capacity
    slot_N = np.where(kept_N, ids_N * capacity + rank_N, num_experts * capacity)
    source_EC = np.full([num_experts * capacity], t, dtype=np.int64)
    source_EC[slot_N[kept_N]] = np.arange(ids_N.size)[kept_N] // k
    return slot_N.astype(np.int64), source_EC, np.minimum(counts_E, capacity), capacity


def gather_grouped(x_TM, source_EC: np.ndarray, num_experts: int, capacity: int):
    """Rows of x_TM in expert-grouped order, [E, C, M]; a row whose source is T is zero."""
    m = x_TM.shape[1]
    x_pad = paddle.concat([x_TM, paddle.zeros([1, m], dtype=x_TM.dtype)], axis=0)
    return paddle.gather(x_pad, paddle.to_tensor(source_EC)).reshape([num_experts, capacity, m])


def combine_grouped(y_ECM, slot_N, weights_TK, num_tokens: int, has_sentinel: bool = True):
    """y_TM = sum_k weights_TK[:, k] * y at the grid row of assignment (t, k); a slot equal to E*C
    (dropped, or held by another rank) reads the zero row appended when `has_sentinel`."""
    e, c, m = y_ECM.shape
    flat = y_ECM.reshape([e * c, m])
    if has_sentinel:
        flat = paddle.concat([flat, paddle.zeros([1, m], dtype=flat.dtype)], axis=0)
    k = weights_TK.shape[-1]
    picked_TKM = paddle.gather(flat, slot_N).reshape([num_tokens, k, m])
    weights_T1K = weights_TK.astype(picked_TKM.dtype).unsqueeze(1)
    return paddle.bmm(weights_T1K, picked_TKM).squeeze(1)
