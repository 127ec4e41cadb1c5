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
from .universal import UniversalPool, layer_windows
from .view import FULL_VIEW, ElasticView


class ModelOutput:
    """What the forward returns: `logits` [B, S, V], `mtp_logits` (None without MTP), `hidden`
    (the final normed hidden state [B, S, M]), `router_stats` (layer index -> stats of the MoE
    layers that ran) and `extra` (modality head name -> its predictions).

    The logits may be deferred (`output_heads`): the output then keeps the text head and the MTP
    module's output `mtp_hidden`, and computes `logits` / `mtp_logits` on first read (once, cached,
    with the grad mode of the forward), so readers see the tensors an eager forward would give. The
    training loss reads neither while they are unread: it takes the cross-entropy from the hidden
    states through the fused op (model/losses.py), and the [B, S, V] logits are never formed.
    Deferred logits use the head's weights at the time of the read: read them before an optimizer
    step changes the weights."""

    def __init__(
        self,
        logits,
        mtp_logits,
        hidden,
        router_stats: dict[int, RouterStats],
        extra: dict[str, dict] | None = None,
        *,
        text_head: TextHead | None = None,
        mtp_hidden=None,
    ):
        self._logits, self._mtp_logits = logits, mtp_logits
        self.hidden = hidden
        self.router_stats = router_stats
        self.extra = {} if extra is None else extra
        self.text_head = text_head  # set only when the logits are deferred
        self.mtp_hidden = mtp_hidden
        self._grad_enabled = paddle.is_grad_enabled()

    @property
    def has_mtp(self) -> bool:
        return self._mtp_logits is not None or self.mtp_hidden is not None

    @property
    def logits(self):
        if self._logits is None and self.text_head is not None:
            self._logits = self._project(self.hidden)
        return self._logits

    @property
    def mtp_logits(self):
        if self._mtp_logits is None and self.text_head is not None and self.mtp_hidden is not None:
            self._mtp_logits = self._project(self.mtp_hidden)
        return self._mtp_logits

    def unread_head_input(self, mtp: bool = False):
        """(text head, its input [B, S, M]) while the text (or MTP) logits are deferred and not yet
        read, else None."""
        if self.text_head is None or (self._mtp_logits if mtp else self._logits) is not None:
            return None
        h_BSM = self.mtp_hidden if mtp else self.hidden
        return None if h_BSM is None else (self.text_head, h_BSM)

    def _project(self, h_BSM):
        with paddle.set_grad_enabled(self._grad_enabled):
            return self.text_head(h_BSM)


class Ernie5Model(nn.Layer):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = ModalityEmbeddings(cfg)
        # MoUE: one expert pool for every MoE layer, each reaching its window (model/universal.py)
        self.universal = UniversalPool(cfg) if cfg.moe.universal.enabled else None
        windows = layer_windows(cfg) if self.universal is not None else {}
        self.blocks = nn.LayerList(
            [
                Block(
                    cfg,
                    use_moe=i >= cfg.moe.first_dense_layers,
                    layer=i,
                    pool=self.universal,
                    window=windows.get(i),
                )
                for i in range(cfg.num_layers)
            ]
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
        positions, and may carry their RoPE tables as `rope_cos_sin` (computed once per call)."""
        tables = batch.get("rope_cos_sin")
        if tables is None:
            att = self.cfg.attention
            tables = rope_cos_sin(
                batch["positions"], att.head_dim, att.rope_base, att.rope_sections
            )
        cos, sin = tables
        mask = batch.get("startend_row_indices")
        causal = batch.get("mask_causal", True)
        x = self.embed(batch)
        stats = {}
        route_state = None  # universal router's trajectory state, carried over the depth
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
                route_state,
            )
            if layer_stats is not None:
                stats[i] = layer_stats
                route_state = layer_stats.trajectory_TD
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
    block. When `TextHead.may_defer` allows it, the text head does not run here: the output
    computes the logits on first read (`ModelOutput`)."""
    h = layers.norm(x_BSM)
    mtp_h = None if next_embed is None else layers.mtp(x_BSM, next_embed, *attn_args)
    extra = {name: head(h, batch) for name, head in layers.heads.items()}
    stats = {} if stats is None else stats
    text_head = layers.text_head
    if text_head.may_defer(h):  # the loss needs only h and mtp_h; logits on first read
        return ModelOutput(None, None, h, stats, extra, text_head=text_head, mtp_hidden=mtp_h)
    mtp_logits = None if mtp_h is None else text_head(mtp_h)
    return ModelOutput(text_head(h), mtp_logits, h, stats, extra)


def head_losses(heads, out: ModelOutput, batch) -> dict[str, tuple]:
    """Loss name -> (mean loss, number of targets, weight) of every modality head in `heads`. A
    head's loss entry is (loss, count), weighted by head.loss_weight, or (loss, count, weight) with
    its own weight (e.g. one entry per audio level)."""
    losses = {}
    for name, head in heads.items():
        for key, (loss, count, *weight) in head.loss(out.extra[name], batch).items():
            losses[key] = (loss, count, float(weight[0] if weight else head.loss_weight))
    return losses
