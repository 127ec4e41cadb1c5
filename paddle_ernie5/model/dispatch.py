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

from dataclasses import dataclass

import paddle

from ..ops.grouping import combine_grouped, gather_grouped, group_by_expert
from .router import Routing


@dataclass
class DispatchMeta:
    # per assignment (token-major, N = T*K): row in the flat [E*C] grid, or E*C if dropped
    slot_N: paddle.Tensor
    weights_TK: paddle.Tensor
    num_tokens: int
    capacity: int
    # Some assignment points at the zero row E*C (dropped, or owned by another rank): combine must
    # append that row. Dropless single-device dispatch skips the copy.
    has_sentinel: bool = True


class LocalDispatcher:
    """Single-device dispatcher: every expert lives here."""

    def __init__(self, capacity_factor: float = 0.0):
        self.capacity_factor = capacity_factor

    def dispatch(self, x_TM, routing: Routing, num_experts: int):
        t = x_TM.shape[0]
        slot_N, source_EC, counts_E, capacity = group_by_expert(
            routing.topk_ids_TK.numpy(), num_experts, self.capacity_factor
        )
        expert_inputs_ECM = gather_grouped(x_TM, source_EC, num_experts, capacity)
        meta = DispatchMeta(
            paddle.to_tensor(slot_N),
            routing.topk_weights_TK,
            t,
            capacity,
            has_sentinel=bool((slot_N == num_experts * capacity).any()),
        )
        return expert_inputs_ECM, counts_E, meta

    def combine(self, expert_outputs_ECM, meta: DispatchMeta):
        return combine_grouped(
            expert_outputs_ECM, meta.slot_N, meta.weights_TK, meta.num_tokens, meta.has_sentinel
        )
