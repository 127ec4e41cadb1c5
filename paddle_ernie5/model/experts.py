"""SwiGLU feed-forward networks: one dense FFN and a stacked pool of experts.

Legend: T tokens, M model width, F expert hidden width, E experts, K top-k, C tokens per expert
(capacity).
"""

from __future__ import annotations

import paddle
from paddle import nn
from paddle.nn.functional import swiglu  # silu(first half) * second half, one fused kernel

from ..ops import fused as fused_ops
from ..ops.moe_experts import grouped_swiglu, moe_experts


class SwiGLU(nn.Layer):
    """Dense SwiGLU FFN (shared expert, dense layers); gate and up projections in one matmul.
    `fused` (model.fused_ops): the activation through the fused CPU op of ops/fused.py where it
    applies, else Paddle's swiglu kernel."""

    def __init__(self, hidden_size: int, ffn_hidden: int, init_std: float, fused: bool = True):
        super().__init__()
        self.fused = fused
        init = nn.initializer.Normal(std=init_std)
        self.gate_up = nn.Linear(hidden_size, 2 * ffn_hidden, weight_attr=init, bias_attr=False)
        self.down = nn.Linear(ffn_hidden, hidden_size, weight_attr=init, bias_attr=False)

    def forward(self, x):
        return self.down(fused_ops.swiglu(self.gate_up(x), self.fused))


class GroupedExperts(nn.Layer):
    """E SwiGLU experts, on tokens already grouped per expert ([E, C, M] -> [E, C, M], one batched
    matmul per projection) or on routed tokens (`routed`, the fused op of ops/moe_experts.py)."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden: int, init_std: float):
        super().__init__()
        init = nn.initializer.Normal(std=init_std)
        self.w_gate_up = self.create_parameter(
            [num_experts, hidden_size, 2 * ffn_hidden], default_initializer=init
        )
        self.w_down = self.create_parameter(
            [num_experts, ffn_hidden, hidden_size], default_initializer=init
        )

    def forward(self, x_ECM, experts=None):
        """`experts`: optional int64 tensor of the expert indices the rows of x_ECM belong to."""
        w_gate_up, w_down = self.w_gate_up, self.w_down
        if experts is not None:
            w_gate_up, w_down = paddle.gather(w_gate_up, experts), paddle.gather(w_down, experts)
        return grouped_swiglu(x_ECM, w_gate_up, w_down)

    def routed(self, x_TM, topk_ids_TK, topk_weights_TK, capacity_factor: float, backend: str):
        """y_TM = sum_k topk_weights_TK[:, k] * expert_{topk_ids_TK[:, k]}(x_TM): dispatch, experts
        and the weighted combine in one call."""
        return moe_experts(
            x_TM,
            self.w_gate_up,
            self.w_down,
            topk_ids_TK,
            topk_weights_TK,
            capacity_factor,
            backend,
        )

    def expert_forward(self, e: int, x_CM):
        """One expert on its own tokens; used by the naive reference path."""
        return paddle.matmul(swiglu(paddle.matmul(x_CM, self.w_gate_up[e])), self.w_down[e])
