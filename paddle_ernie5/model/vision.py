"""Images and video in the backbone: the layout of visual tokens, their input embeddings, the
patch merger for understanding and the bit-wise next-scale head.

Generation (next-frame-and-scale prediction). A frame is coded by the frozen tokenizer
(tokenizers/visual.py) as token maps of growing side (1x1, 2x2, 4x4, 8x8); a token is `bits` signs.
The positions of scale k carry, as input, the bits of their parent cell in scale k-1 (zeros for the
first scale of a frame) and predict the bits of their own cell, all cells of a scale at once:

    frame f:   [ scale 0 ] [ scale 1 (2x2) ] [ scale 2 (4x4) ] ...   one attention block per scale:
    input:       start       bits_0 upsampled  bits_1 upsampled        bidirectional inside, causal
    predicts:    bits_0      bits_1            bits_2                  to earlier scales and frames

Uni-RoPE: a token has (t, h, w) = (start + frame, start + y, start + x) where (y, x) is its cell
centre in doubled latent units, (2i + 1) * side / s - 1, so the scales of one frame are
centre-aligned (the 1x1 token sits at the middle of the 8x8 grid). A scale embedding tells the
scales apart.

Understanding. Pre-quantisation features [T, K, h, w] are cut into groups of merge x merge cells
(and merge_frames frames for video); each group is one token:

    group [G, K]  (video, merger_motion: [G, 2K], each patch with its change since the previous
                   frame)
      -> Linear(K -> d) + slot embedding -> pre-norm self-attention over the G patches
      -> mean over G -> Linear(d -> M) (+ embedding of the group's place, merger_position)
         (+ Linear_place(d -> M) of the same mean, one per place, merger_place_projection)

Batch keys (extras of data/vision_sources.py, zero where absent):
    vis_in      [B, S, bits]   float  input bits of generation positions
    vis_target  [B, S, bits]   float  target bits (+1 / -1)
    vis_scale   [B, S]         int    1 + scale index of a generation position, 0 elsewhere
    vis_cell    [B, S]         int    frame * tokens per frame + index in the frame of a generation
                                      position (model.vision.cell_embedding only)
    vis_shape   [B, S]         float  share of the position's cell the digit covers (targets of the
                                      shape head, model.vision.shape_loss_weight > 0 only)
    vis_prompt  [B, S, C]      int    1 + the caption's token ids at generation positions, 0 = none
                                      (pooled caption conditioning, caption_pooling > 0 only)
    vis_caption [B, S, 2]      int    1 + the caption's digit and direction at generation positions,
                                      0 = none (caption heads, caption_loss_weight > 0 only)
    vis_prev    [B, S, n bits] float  clip positions: the previous frame's bits in the cell's
                                      neighbourhood of n = (2r + 1)^2 cells at the same scale, zero
                                      in the first frame (temporal_context = r > 0 only)
    image_patches [B, S, merge^2, K], video_patches [B, S, merge_frames * merge^2, K]   float
    patch_index [B, S]         int    row-major (frame group, row, column) index of a merged group

Legend: B batch, S sequence, M width, K feature channels, G patches per group, d merger width.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..config import ModelConfig, VisionModelConfig
from ..config.modalities import CAPTION_CLASSES
from .embeddings import MODALITY_IDS, register_modality
from .heads import register_head
from .norm import RMSNorm

IMAGE_ID, VIDEO_ID = MODALITY_IDS["image"], MODALITY_IDS["video"]
POOLED_CAPTION_STD = 0.3  # initial std of the pooled caption table (caption_pooling)
FEATURE_KEY = {"image": "image_patches", "video": "video_patches"}
# place of a merged group in its picture: (frame group, row, column)
PATCH_INDEX_KEY = "patch_index"


# ------------------------------------------------------------------------------------------ layout


def cell_centres(side: int, latent: int) -> np.ndarray:
    """Centre of each row (or column) of an side x side map, in doubled latent units."""
    return (2 * np.arange(side) + 1) * (latent // side) - 1


def parent_index(scales, k: int) -> np.ndarray:
    """For each cell of scale k (row-major), the row-major index of its parent cell in scale k-1."""
    s, p = scales[k], scales[k - 1]
    i = np.arange(s) * p // s
    return (i[:, None] * p + i[None, :]).reshape(-1)


def frame_layout(scales) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale index, row, column) of every token of one frame, scale by scale, row-major."""
    k = np.concatenate([np.full(s * s, i) for i, s in enumerate(scales)])
    r = np.concatenate([np.repeat(np.arange(s), s) for s in scales])
    c = np.concatenate([np.tile(np.arange(s), s) for s in scales])
    return k, r, c


def history_bits(tokens_FNb: np.ndarray, scales) -> np.ndarray:
    """Input bits of every position: the parent cell's bits in the previous scale (0 at scale 0).
    tokens [frames, tokens per frame, bits] in scale order -> same shape."""
    out = np.zeros_like(tokens_FNb)
    offsets = np.cumsum([0] + [s * s for s in scales])
    for k in range(1, len(scales)):
        parent = tokens_FNb[:, offsets[k - 1] : offsets[k]]
        out[:, offsets[k] : offsets[k + 1]] = parent[:, parent_index(scales, k)]
    return out


def neighbour_index(scales, radius: int) -> np.ndarray:
    """[tokens per frame, (2 r + 1)^2] for every token of a frame (scale order, row-major) the
    in-frame indices of the cells of its own scale at row and column offsets -r..r, wrapping round
    the edges (row-major offsets, the centre in the middle)."""
    d = np.arange(-radius, radius + 1)
    out, lo = [], 0
    for s in scales:
        r, c = np.divmod(np.arange(s * s), s)
        rows = (r[:, None, None] + d[None, :, None]) % s
        cols = (c[:, None, None] + d[None, None, :]) % s
        out.append((lo + rows * s + cols).reshape(s * s, -1))
        lo += s * s
    return np.concatenate(out)


def previous_frame_context(tokens_BFNb: np.ndarray, scales, radius: int) -> np.ndarray:
    """Temporal context input (model.vision.temporal_context): for every token of frame f > 0 the
    bits of frame f-1 in its cell's neighbourhood at the same scale, flattened; zeros in frame 0.
    tokens [..., frames, tokens per frame, bits] -> [..., frames, tokens per frame, (2r+1)^2 bits].
    Frame f's entry reads frame f-1 only, so a clip's frames can be produced one after another."""
    idx = neighbour_index(scales, radius)
    prev = np.zeros_like(tokens_BFNb[..., :1, :, :])
    shifted = np.concatenate([prev, tokens_BFNb[..., :-1, :, :]], axis=-3)
    out = shifted[..., idx, :]  # [..., F, N, n, bits]
    return out.reshape(*out.shape[:-2], -1)


def generation_positions(scales, latent: int, frames: int, start: int) -> np.ndarray:
    """[3, frames * tokens per frame] Uni-RoPE (t, h, w) of the generation tokens of a clip."""
    k, r, c = frame_layout(scales)
    sides = np.asarray(scales)[k]
    y = np.array([cell_centres(s, latent)[i] for s, i in zip(sides, r)])
    x = np.array([cell_centres(s, latent)[j] for s, j in zip(sides, c)])
    t = np.repeat(np.arange(frames), len(k))
    return np.stack([start + t, start + np.tile(y, frames), start + np.tile(x, frames)]).astype(
        np.int64
    )


def caption_row(caption_ids: list[int], width: int) -> np.ndarray:
    """The caption's token ids + 1, zero-padded to `width` (0 = no token): a vis_prompt row."""
    if len(caption_ids) > width:
        raise ValueError(
            f"a caption of {len(caption_ids)} tokens is longer than "
            f"model.vision.caption_pooling={width}"
        )
    row = np.zeros(width, np.int64)
    row[: len(caption_ids)] = np.asarray(caption_ids, np.int64) + 1
    return row


def span_extent(frames: int, latent: int) -> int:
    """Positions a visual span occupies on the widest axis; the text after it starts this far on."""
    return max(frames, 2 * latent - 1)


# ------------------------------------------------------------------------------------------ inputs


class PatchMerger(nn.Layer):
    """groups [N, G, K] -> [N, M]: self-attention over the G patches of a group, mean-pool, project.
    With `frames` > 1 (video, merger_motion) each patch also gets its difference from the same cell
    one frame earlier (zero in the group's first frame): G = frames x cells, frame-major."""

    def __init__(
        self,
        channels: int,
        group: int,
        cfg: VisionModelConfig,
        hidden_size: int,
        init_std: float,
        frames: int = 1,
        places: int = 0,
    ):
        super().__init__()
        d = cfg.merger_width
        self.heads = cfg.merger_heads
        self.frames = frames
        init = nn.initializer.Normal(std=init_std)
        self.inp = nn.Linear(channels * (2 if frames > 1 else 1), d)
        self.slot = self.create_parameter([group, d], default_initializer=init)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.out = nn.Linear(d, hidden_size, weight_attr=init)
        self.places = places
        self.place_proj = (
            nn.Linear(places * d, hidden_size, weight_attr=init, bias_attr=False)
            if places
            else None
        )

    def forward(self, groups_NGK, places_N=None):
        n, g, k = groups_NGK.shape
        if self.frames > 1:
            f = groups_NGK.reshape([n, self.frames, g // self.frames, k])
            motion = paddle.concat([paddle.zeros_like(f[:, :1]), f[:, 1:] - f[:, :-1]], axis=1)
            groups_NGK = paddle.concat([groups_NGK, motion.reshape([n, g, k])], axis=-1)
        x = self.inp(groups_NGK) + self.slot
        q, k, v = (
            self.qkv(self.norm1(x)).reshape([n, g, 3, self.heads, -1]).transpose([2, 0, 3, 1, 4])
        )
        att = F.softmax(paddle.matmul(q, k, transpose_y=True) * q.shape[-1] ** -0.5, axis=-1)
        x = x + self.proj(paddle.matmul(att, v).transpose([0, 2, 1, 3]).reshape([n, g, -1]))
        x = x + self.mlp(self.norm2(x))
        pooled = x.mean(axis=1)
        if self.place_proj is None:
            return self.out(pooled)
        # W[place] @ pooled for every token at once:
        # (one-hot place outer pooled) @ [W_0; ...; W_P-1]
        spread = F.one_hot(places_N, self.places).unsqueeze(-1) * pooled.unsqueeze(1)
        return self.out(pooled) + self.place_proj(spread.reshape([n, -1]))


class VisualEmbedding(nn.Layer):
    """Inputs of one visual modality: bit embeddings at generation positions, merged patches at
    understanding positions. Returns None when the batch carries neither."""

    modality = "image"

    def __init__(self, cfg: ModelConfig, group: int, places: int, frames: int = 1):
        super().__init__()
        v = cfg.vision
        self.type_id = MODALITY_IDS[self.modality]
        self.flip_prob = v.bit_flip_prob
        init = nn.initializer.Normal(std=cfg.init_std)
        self.bits = nn.Linear(v.bits, cfg.hidden_size, weight_attr=init)
        self.scale = nn.Embedding(len(v.scales) + 1, cfg.hidden_size, weight_attr=init)
        self.cell = (
            nn.Embedding(v.generation_cells(self.modality), cfg.hidden_size, weight_attr=init)
            if v.cell_embedding
            else None
        )
        # Row 0: no token (masked out of the mean). Started at POOLED_CAPTION_STD, so that the mean
        # over a caption is about as large as the bit inputs: at init_std the digit's share of the
        # input is so small that the caption heads alone take 40 steps to start reading it (with
        # the other losses beside them, more than 300), at 0.3 about 5.
        self.words = (
            nn.Embedding(
                cfg.vocab_size + 1,
                cfg.hidden_size,
                weight_attr=nn.initializer.Normal(std=POOLED_CAPTION_STD),
            )
            if v.caption_pooling
            else None
        )
        # Clips only: images have no previous frame (vis_prev is zero at their positions).
        self.prev = (
            nn.Linear(v.temporal_context_width, cfg.hidden_size, weight_attr=init, bias_attr=False)
            if v.temporal_context and self.modality == "video"
            else None
        )
        self.merger = PatchMerger(
            v.bits,
            group,
            v,
            cfg.hidden_size,
            cfg.init_std,
            frames,
            places if v.merger_place_projection else 0,
        )
        self.place = (
            nn.Embedding(places, cfg.hidden_size, weight_attr=init) if v.merger_position else None
        )
        self.merger_init = v.merger_init
        self.frozen = self.modality in v.freeze_merger
        if self.frozen:
            for p in self.merger.parameters() + (
                self.place.parameters() if self.place is not None else []
            ):
                p.stop_gradient = True

    def pooled_caption(self, prompt_BSC):
        """[B, S, M] mean of the word table over each position's caption tokens (zero when it has
        none)."""
        mask = (prompt_BSC > 0).astype("float32").unsqueeze(-1)
        total = (self.words(prompt_BSC) * mask).sum(axis=2)
        return total / paddle.clip(mask.sum(axis=2), min=1.0)

    def _understanding_rows(self, batch):
        """Flat indices of the positions that hold this modality's merged tokens (None = all of
        them: a batch without token_types, e.g. the merger's pre-training)."""
        if "token_types" not in batch:
            return None
        sel = batch["token_types"] == self.type_id
        if "vis_scale" in batch:
            sel = paddle.logical_and(sel, batch["vis_scale"] == 0)
        return paddle.nonzero(sel.reshape([-1])).squeeze(-1)

    def _merge_rows(self, groups_NGK, places_N, rows):
        """The merger on the selected rows only (zeros elsewhere, where another embedding is
        used)."""
        if rows is None:
            return self.merger(groups_NGK, places_N)
        out = paddle.zeros([groups_NGK.shape[0], self.merger.out.weight.shape[1]], groups_NGK.dtype)
        if rows.shape[0] == 0:
            return out
        part = self.merger(paddle.gather(groups_NGK, rows), paddle.gather(places_N, rows))
        return paddle.scatter(out, rows, part)

    def forward(self, batch):
        key = FEATURE_KEY[self.modality]
        x = None
        if "vis_in" in batch:
            bits = batch["vis_in"]
            if self.training and self.flip_prob > 0:  # corrupt the history; targets stay clean
                flips = paddle.bernoulli(paddle.full_like(bits, self.flip_prob))
                bits = bits * (1 - 2 * flips)
            x = self.bits(bits) + self.scale(batch["vis_scale"])
            if self.cell is not None:  # the other visual modality's cells may lie past the table
                own = (batch["token_types"] == self.type_id).astype(batch["vis_cell"].dtype)
                x = x + self.cell(batch["vis_cell"] * own)
            if self.words is not None:
                x = x + self.pooled_caption(batch["vis_prompt"])
            if self.prev is not None and "vis_prev" in batch:  # absent: no clip in the batch
                prev = batch["vis_prev"]
                if self.training and self.flip_prob > 0:  # a generated previous frame has errors
                    flips = paddle.bernoulli(paddle.full_like(prev, self.flip_prob))
                    prev = prev * (1 - 2 * flips)
                x = x + self.prev(prev)
        if key in batch:
            groups = batch[key]
            b, s = groups.shape[:2]
            merged = self._merge_rows(
                groups.reshape([b * s, *groups.shape[2:]]),
                batch[PATCH_INDEX_KEY].reshape([b * s]),
                self._understanding_rows(batch),
            )
            merged = merged.reshape([b, s, -1])
            if self.place is not None:  # indices checked against the table by merged_segment
                merged = merged + self.place(batch[PATCH_INDEX_KEY])
            x = (
                merged
                if x is None
                else paddle.where((batch["vis_scale"] > 0).unsqueeze(-1), x, merged)
            )
        return x


@register_modality("image")
class ImageEmbedding(VisualEmbedding):
    modality = "image"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.vision.merge**2, cfg.vision.merged_places("image"))


@register_modality("video")
class VideoEmbedding(VisualEmbedding):
    modality = "video"

    def __init__(self, cfg: ModelConfig):
        v = cfg.vision
        super().__init__(
            cfg,
            v.merge_frames * v.merge**2,
            v.merged_places("video"),
            v.merge_frames if v.merger_motion else 1,
        )


# ------------------------------------------------------------------------------------------ head


@register_head("visual", ("image", "video"))
class VisualBitHead(nn.Layer):
    """Per-bit logits of the token at every position; per-bit logistic loss at generation positions,
    weighted per token by scale (VisionModelConfig.scale_weights), reported for image and video.
    With shape_loss_weight > 0 a linear shape head beside it reads each generation position's ink
    share (squared error, *_shape losses)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v = cfg.vision
        self.loss_weight = v.loss_weight
        init = nn.initializer.Normal(std=cfg.init_std)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps, cfg.fused_ops)
        if v.head_hidden:
            self.net = nn.Sequential(
                nn.Linear(cfg.hidden_size, v.head_hidden, weight_attr=init),
                nn.GELU(),
                nn.Linear(v.head_hidden, v.bits, weight_attr=init),
            )
        else:
            self.net = nn.Linear(cfg.hidden_size, v.bits, weight_attr=init)
        self.shape_weight = v.shape_loss_weight
        self.shape = (
            nn.Linear(cfg.hidden_size, 1, weight_attr=init) if self.shape_weight > 0 else None
        )
        self.caption_weight = v.caption_loss_weight
        self.caption = (
            nn.Linear(cfg.hidden_size, sum(n for _, n in CAPTION_CLASSES), weight_attr=init)
            if self.caption_weight > 0
            else None
        )
        # Index 1 + k: per-token weight of scale k; index 0 (no target) weighs nothing.
        self.scale_weight = (0.0,) + tuple(v.scale_weights())
        self.kinds = [
            (name, MODALITY_IDS[name]) for name in ("image", "video") if name in cfg.modalities
        ]

    def forward(self, h_BSM, batch):
        h = self.norm(h_BSM)
        out = {"logits": self.net(h)}
        if self.shape is not None:
            out["shape"] = self.shape(h).squeeze(-1)
        if self.caption is not None:
            out["caption"] = self.caption(h)
        return out

    def loss(self, pred, batch):
        if "vis_target" not in batch:
            return {}
        logits = pred["logits"].astype("float32")
        target = (batch["vis_target"] + 1) * 0.5
        per_token = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)
        weight = paddle.gather(
            paddle.to_tensor(self.scale_weight, dtype="float32"), batch["vis_scale"].reshape([-1])
        ).reshape(per_token.shape)
        out = {}
        for name, type_id in self.kinds:
            w = weight * (batch["token_types"] == type_id).astype("float32")
            count = (
                ((batch["vis_scale"] > 0) & (batch["token_types"] == type_id))
                .astype("float32")
                .sum()
            )
            if float(count) == 0:
                continue
            out[f"{name}_bits"] = ((per_token * w).sum() / paddle.clip(w.sum(), min=1e-6), count)
            if self.shape is not None and "vis_shape" in batch:
                sel = ((batch["vis_scale"] > 0) & (batch["token_types"] == type_id)).astype(
                    "float32"
                )
                err = (pred["shape"].astype("float32") - batch["vis_shape"]) ** 2
                out[f"{name}_shape"] = ((err * sel).sum() / count, count, self.shape_weight)
            if self.caption is not None and "vis_caption" in batch:
                out.update(self._caption_losses(pred["caption"], batch, name, type_id))
        return out

    def _caption_losses(self, logits_BSC, batch, name: str, type_id: int) -> dict:
        """Cross-entropy of each caption attribute at the generation positions of one kind that
        have a target."""
        out, lo = {}, 0
        kind = (batch["token_types"] == type_id) & (batch["vis_scale"] > 0)
        for j, (attr, n) in enumerate(CAPTION_CLASSES):
            target = batch["vis_caption"][..., j]
            sel = (kind & (target > 0)).astype("float32")
            count = sel.sum()
            if float(count) > 0:
                ce = F.cross_entropy(
                    logits_BSC[..., lo : lo + n].astype("float32"),
                    paddle.clip(target - 1, min=0).unsqueeze(-1),
                    reduction="none",
                ).squeeze(-1)
                out[f"{name}_caption_{attr}"] = (
                    (ce * sel).sum() / count,
                    count,
                    self.caption_weight,
                )
            lo += n
        return out
