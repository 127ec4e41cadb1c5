"""The unified ERNIE 5.0 backbone.

Legend: B batch, S sequence, M width, V text vocabulary.

    batch ─ ModalityEmbeddings ─ [Block] x L ─ RMSNorm ─ text head ─> logits_BSV
                                                 │  └─ modality heads ─> extra[name] (heads.py)
                                                 └─ MTP module ─ text head ─> mtp_logits_BSV

Inputs (dict of tensors): input_ids [B,S] int64, token_types [B,S] int64, positions [B,3,S] int64
(Uni-RoPE t, h, w), startend_row_indices [B,1,S,C] int32 (FlashMask) and optionally mask_causal
(bool, default True; False for layouts with bidirectional blocks, e.g. [LTS, UTE] from
data/multimodal.py). Outputs: `ModelOutput` with logits, the modality heads' predictions and one
`RouterStats` per MoE layer that ran. Modality inputs and targets other than text ride in the batch
under keys their modules define (embeddings/heads registered by model/vision.py, model/audio.py).
`router_replay` (RL): layer index -> expert ids [B,S,K] recorded during rollout; those layers use
them instead of choosing (model/router.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import paddle
from paddle import nn

from ..config import ModelConfig
from .block import Block
from .embeddings import ModalityEmbeddings
from .generation import KVCache
from .heads import MTPModule, TextHead, build_heads
from .moe import RouterStats
from .norm import RMSNorm
from .rope import rope_cos_sin
from .view import FULL_VIEW, ElasticView


@dataclass
class ModelOutput:
    logits: paddle.Tensor
    mtp_logits: paddle.Tensor | None
    hidden: paddle.Tensor
    router_stats: dict[int, RouterStats]  # layer index -> stats, MoE layers that ran
    extra: dict[str, dict] = field(default_factory=dict)  # modality head name -> its predictions


class Ernie5Model(nn.Layer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = ModalityEmbeddings(cfg)
        self.blocks = nn.LayerList(
            [Block(cfg, use_moe=i >= cfg.moe.first_dense_layers) for i in range(cfg.num_layers)]
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.fused_ops)
        self.text_head = TextHead(cfg, self.embed.text_table() if cfg.tie_embeddings else None)
        self.mtp = MTPModule(cfg) if cfg.num_mtp_modules > 0 else None
        self.heads = build_heads(cfg)

    def forward(
        self,
        batch,
        view: ElasticView = FULL_VIEW,
        with_mtp: bool = True,
        cache: KVCache | None = None,
        router_replay: dict | None = None,
    ) -> ModelOutput:
        """`cache`: incremental decoding (generation.py); the batch then holds only the new
        positions."""
        att = self.cfg.attention
        cos, sin = rope_cos_sin(batch["positions"], att.head_dim, att.rope_base, att.rope_sections)
        mask = batch.get("startend_row_indices")
        causal = batch.get("mask_causal", True)
        x = self.embed(batch)
        stats = {}
        layers = range(len(self.blocks)) if view.layers is None else view.layers
        for i in layers:
            x, layer_stats = self.blocks[i](
                x,
                cos,
                sin,
                mask,
                view.for_layer(i),
                None if cache is None else cache.layer(i),
                None if router_replay is None else router_replay.get(i),
                causal,
            )
            if layer_stats is not None:
                stats[i] = layer_stats
        next_embed = None
        if with_mtp and self.mtp is not None:
            next_embed = next_token_embeddings(self.embed, batch["input_ids"])
        return output_heads(self, x, batch, (cos, sin, mask, causal), next_embed, stats)

    def head_losses(
        self, out: ModelOutput, batch
    ) -> dict[str, tuple[paddle.Tensor, paddle.Tensor, float]]:
        """Loss name -> (mean loss, number of targets, weight) of every modality head."""
        return head_losses(self.heads, out, batch)

    def num_params(self) -> int:
        return sum(int(p.numel()) for p in self.parameters())

    def moe_layers(self):
        """(layer index, MoE layer) for every block whose FFN is an MoE."""
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if hasattr(b.ffn, "router")]


# The pieces of the forward that run outside the blocks, shared with the pipeline's stages
# (parallel/pipeline.py), which hold the same modules under the same attribute names.
def next_token_embeddings(embed: ModalityEmbeddings, input_ids_BS):
    """[B, S, M] text embedding of token i+1 at position i (the last position repeats its own
    token): the MTP module's second input."""
    next_ids = paddle.concat([input_ids_BS[:, 1:], input_ids_BS[:, -1:]], axis=1)
    return embed.text_table()(next_ids)


def output_heads(layers, x_BSM, batch, attn_args, next_embed=None, stats=None) -> ModelOutput:
    """Final norm, text head, MTP (when `next_embed` is given) and modality heads over the last
    block's output. `layers` holds `norm`, `text_head`, `mtp` and `heads` (the model, or the
    pipeline's head stage); `attn_args` = (cos, sin, FlashMask indices, causal) of the MTP
    block."""
    h = layers.norm(x_BSM)
    logits = layers.text_head(h)
    mtp_logits = None
    if next_embed is not None:
        mtp_logits = layers.text_head(layers.mtp(x_BSM, next_embed, *attn_args))
    extra = {name: head(h, batch) for name, head in layers.heads.items()}
    return ModelOutput(logits, mtp_logits, h, {} if stats is None else stats, extra)


def head_losses(heads, out: ModelOutput, batch) -> dict[str, tuple]:
    """Loss name -> (mean loss, number of targets, weight) of every modality head in `heads`. A
    head's loss entry is (loss, count), weighted by head.loss_weight, or (loss, count, weight) with
    its own weight (e.g. one entry per audio level)."""
    losses = {}
    for name, head in heads.items():
        for key, (loss, count, *weight) in head.loss(out.extra[name], batch).items():
            losses[key] = (loss, count, float(weight[0] if weight else head.loss_weight))
    return losses
