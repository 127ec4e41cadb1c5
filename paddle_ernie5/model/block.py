"""Transformer block: pre-norm attention and feed-forward (MoE or dense), two residual lines.

x ─┬─ RMSNorm ─ Attention ─(+)─┬─ RMSNorm ─ MoE / SwiGLU ─(+)─> x
   └────────────────────────────┘  └──────────────────────────┘
"""

from __future__ import annotations

from paddle import nn

from ..config import ModelConfig
from .attention import Attention
from .experts import SwiGLU
from .moe import MoE
from .norm import RMSNorm
from .view import FULL_VIEW


class Block(nn.Layer):
    def __init__(
        self, cfg: ModelConfig, use_moe: bool, layer: int | None = None, pool=None, window=None
    ):
        """`layer`: the backbone layer's index (its attention's head counts); None for the MTP
        block. `pool`, `window`: the universal expert pool and this layer's window of it (MoUE)."""
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.fused_ops)
        self.attn = Attention(cfg.hidden_size, cfg.attention, cfg.init_std, cfg.fused_ops, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.fused_ops)
        moe = cfg.moe
        self.ffn = (
            MoE(cfg.hidden_size, moe, cfg.init_std, cfg.fused_ops, pool, window)
            if use_moe
            else SwiGLU(cfg.hidden_size, moe.dense_width(), cfg.init_std, cfg.fused_ops)
        )

    def forward(
        self,
        x,
        cos,
        sin,
        startend_row_indices,
        view=FULL_VIEW,
        cache=None,
        replay_ids=None,
        causal: bool = True,
        route_state=None,
    ):
        """`route_state`: the universal router's trajectory state from the previous MoE layer."""
        x = x + self.attn(self.attn_norm(x), cos, sin, startend_row_indices, cache, causal)
        if isinstance(self.ffn, MoE):
            y, stats = self.ffn(self.ffn_norm(x), view, replay_ids, route_state)
            return x + y, stats
        return x + self.ffn(self.ffn_norm(x)), None
