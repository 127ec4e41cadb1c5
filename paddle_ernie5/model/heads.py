"""Output heads: text next-token head, the multi-token-prediction (MTP) module, and the registry of
modality output heads (visual bits, audio depth-wise codes).

MTP (DeepSeek-V3 style, depth 1): at position i the module combines the final hidden state h_i with
the embedding of token i+1 and predicts token i+2 through one extra block and the shared text head.

    h_i ─ RMSNorm ─┐
                   concat ─ Linear(2M -> M) ─ Block ─ RMSNorm ─ text head ─> logits for x_{i+2}
    emb(x_{i+1}) ─ RMSNorm ─┘

The MTP block uses a dense SwiGLU (width of the activated experts) rather than the expert pool: it
is a training-time auxiliary, and keeping it dense keeps expert statistics those of the backbone
only.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle
from paddle import nn

from ..config import ModelConfig
from ..ops import policy
from .block import Block
from .norm import RMSNorm


class TextHead(nn.Layer):
    """h [.., M] -> logits [.., V]: a Linear without bias ([M, V] weight) or the tied embedding
    table ([V, M], transposed). The training loss may skip the logits and take the cross-entropy
    from h with the weight directly (`weight_layout`, `may_defer`; model/losses.py)."""

    def __init__(self, cfg: ModelConfig, tied_table=None):
        super().__init__()
        self.fused_ops = cfg.fused_ops
        self.tied_table = tied_table
        self.proj = (
            None
            if tied_table is not None
            else nn.Linear(
                cfg.hidden_size,
                cfg.text_vocab,
                weight_attr=nn.initializer.Normal(std=cfg.init_std),
                bias_attr=False,
            )
        )

    def weight_layout(self):
        """(weight, transposed): the projection's [M, V] weight and False, or the tied table's
        [V, M] and True (logits = h @ weight, or h @ weight^T when transposed)."""
        if self.tied_table is not None:
            return self.tied_table.weight, True
        return self.proj.weight, False

    def may_defer(self, h_BSM) -> bool:
        """True when the forward may leave the logits of h_BSM uncomputed: the fused output
        projection + cross-entropy op may run on h and the weight (ops/policy.py), and no forward
        hook watches this head (the bf16 emulation rounds its input and output, so the head must
        run as a layer inside the forward)."""
        watched = [self] if self.proj is None else [self, self.proj]
        if any(layer._forward_pre_hooks or layer._forward_post_hooks for layer in watched):
            return False
        return policy.fused_allowed(self.fused_ops, h_BSM, self.weight_layout()[0])

    def forward(self, h_BSM):
        if self.tied_table is not None:
            return paddle.matmul(h_BSM, self.tied_table.weight, transpose_y=True)
        return self.proj(h_BSM)


class MTPModule(nn.Layer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.fused_ops)
        self.embed_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.fused_ops)
        self.merge = nn.Linear(
            2 * cfg.hidden_size,
            cfg.hidden_size,
            weight_attr=nn.initializer.Normal(std=cfg.init_std),
            bias_attr=False,
        )
        self.block = Block(cfg, use_moe=False)
        self.out_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.fused_ops)

    def forward(self, h_BSM, next_embed_BSM, cos, sin, startend_row_indices, causal: bool = True):
        x = self.merge(
            paddle.concat([self.hidden_norm(h_BSM), self.embed_norm(next_embed_BSM)], -1)
        )
        x, _ = self.block(x, cos, sin, startend_row_indices, causal=causal)
        return self.out_norm(x)


# ---------------------------------------------------------------------------------- modality heads
# A modality head maps the final hidden states to its own predictions and scores them:
#
#     head(h_BSM, batch) -> dict of tensors          (kept in ModelOutput.extra[name])
#     head.loss(pred, batch) -> {loss name: (mean loss, number of targets[, weight])}
#     head.loss_weight: float                        (weight of each of its losses that has none)
#
# Targets and inputs travel in the batch as extra keys named by the modality's own module (for
# example per-position bit targets); positions without a target are masked there, not here.
_HEADS: dict[str, tuple[tuple[str, ...], Callable[[ModelConfig], nn.Layer]]] = {}


def register_head(name: str, modalities: tuple[str, ...]):
    """Class decorator, e.g.
    `@register_head("visual", ("image", "video")) class VisualBitHead(nn.Layer)`.
    The model builds the head when any of `modalities` is in `model.modalities`."""

    def wrap(factory):
        _HEADS[name] = (tuple(modalities), factory)
        return factory

    return wrap


def build_heads(cfg: ModelConfig) -> nn.LayerDict:
    return nn.LayerDict(
        {
            name: factory(cfg)
            for name, (mods, factory) in sorted(_HEADS.items())
            if set(mods) & set(cfg.modalities)
        }
    )
