"""Sampling images and clips by next-frame-and-scale prediction, with the key/value cache.

    prompt <bos> caption <boi> --prefill (causal)--> cache
    for each frame f, each scale k:
        inputs = parent bits of scale k-1 (zeros at k = 0) --forward the whole scale--> bit logits
        (guidance: logits = u + cfg_scale * (c - u), u from a second cache holding <bos> <boi>)
        bits = sign(logits) (temperature 0) or Bernoulli(sigmoid(logits / temperature))
    (model.vision.temporal_context: the inputs of frame f > 0 also hold the generated frame f-1's
    bits around each cell, model/vision.previous_frame_context)

A scale's positions see the whole cache and each other (causal=False, nothing masked), which is
the scale-wise block-causal mask of training; for video, frames more than temporal_window back are
hidden through the FlashMask indices. Each forward runs one scale for every row at once, so a
1+4+16+64 image costs 4 forwards after the prefill.

Legend: B rows, P prompt length, n tokens of one scale, T frames, N tokens per frame, K bits.
"""

from __future__ import annotations

import numpy as np
import paddle

from .generation import KVCache
from .vision import (
    IMAGE_ID,
    VIDEO_ID,
    caption_row,
    generation_positions,
    neighbour_index,
    parent_index,
)


def _prefill(model, prompt_BP: np.ndarray, cache: KVCache) -> None:
    b, p = prompt_BP.shape
    pos = paddle.arange(p, dtype="int64").reshape([1, 1, p]).expand([b, 3, p])
    model(
        {
            "input_ids": paddle.to_tensor(prompt_BP, dtype="int64"),
            "token_types": paddle.zeros([b, p], dtype="int64"),
            "positions": pos,
            "startend_row_indices": None,
        },
        with_mtp=False,
        cache=cache,
    )


def _hidden_columns(cache_len: int, n: int, b: int, hidden: tuple[int, int] | None):
    """FlashMask indices [B, 1, Sk, 2] hiding cache columns [lo, hi) from the n new rows."""
    if hidden is None or hidden[1] <= hidden[0]:
        return None
    sk = cache_len + n
    lts = np.full(sk, n, np.int32)
    lts[hidden[0] : hidden[1]] = 0
    idx = np.stack([lts, np.zeros(sk, np.int32)], -1)[None, None]
    return paddle.to_tensor(np.repeat(idx, b, axis=0))


@paddle.no_grad()
def sample_visual(
    model,
    prompt_BP: np.ndarray,
    kind: str = "image",
    *,
    uncond_BP: np.ndarray | None = None,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Bit tokens [B, T, N, K] in {-1, +1} (scale order) continuing equal-length prompts that end in
    <boi> (image) or <bov> (video). `uncond_BP`: the caption-free prompt for guidance."""
    model.eval()
    v = model.cfg.vision
    scales = v.scales if kind == "image" else v.scales[: v.video_scales]
    frames = 1 if kind == "image" else v.video_frames
    type_id = IMAGE_ID if kind == "image" else VIDEO_ID
    rng = np.random.default_rng(seed)
    b = prompt_BP.shape[0]
    guided = uncond_BP is not None and cfg_scale != 1.0
    streams = [(np.asarray(prompt_BP, np.int64), KVCache())]
    if guided:
        streams.append((np.repeat(np.asarray(uncond_BP, np.int64)[:1], b, axis=0), KVCache()))
    for prompt, cache in streams:
        _prefill(model, prompt, cache)
    per_frame = sum(s * s for s in scales)
    offsets = np.cumsum([0] + [s * s for s in scales])
    positions = [generation_positions(scales, v.scales[-1], frames, p.shape[1]) for p, _ in streams]
    # pooled caption conditioning: the prompt between <bos> and <boi|bov>
    captions = [
        np.stack([caption_row(list(row[1:-1]), v.caption_pooling) for row in p])
        if v.caption_pooling
        else None
        for p, _ in streams
    ]
    tokens = np.zeros([b, frames, per_frame, v.bits], np.float32)
    for f in range(frames):
        hidden = None
        if v.temporal_window and f > v.temporal_window:
            # hide the frames before f - window (cache columns after the prompt)
            hidden = (0, (f - v.temporal_window) * per_frame)
        context = None
        if v.temporal_context and kind == "video":  # frame f-1 is complete: previous_frame_context
            prev = tokens[:, f - 1] if f > 0 else np.zeros_like(tokens[:, 0])
            context = prev[:, neighbour_index(scales, v.temporal_context)].reshape(b, per_frame, -1)
        for k, side in enumerate(scales):
            n = side * side
            if k == 0:
                bits_in = np.zeros([b, n, v.bits], np.float32)
            else:
                bits_in = tokens[:, f, offsets[k - 1] : offsets[k]][:, parent_index(scales, k)]
            logits = []
            for (prompt, cache), pos, caption in zip(streams, positions, captions):
                lo = f * per_frame + offsets[k]
                mask = (
                    None
                    if hidden is None
                    else _hidden_columns(
                        cache.length(),
                        n,
                        b,
                        (prompt.shape[1] + hidden[0], prompt.shape[1] + hidden[1]),
                    )
                )
                batch = {
                    "input_ids": paddle.zeros([b, n], dtype="int64"),
                    "token_types": paddle.full([b, n], type_id, dtype="int64"),
                    "positions": paddle.to_tensor(np.repeat(pos[None, :, lo : lo + n], b, axis=0)),
                    "startend_row_indices": mask,
                    "mask_causal": False,
                    "vis_in": paddle.to_tensor(bits_in),
                    "vis_scale": paddle.full([b, n], k + 1, dtype="int64"),
                }
                if v.cell_embedding:
                    cells = np.arange(lo, lo + n, dtype=np.int64)
                    batch["vis_cell"] = paddle.to_tensor(np.repeat(cells[None], b, axis=0))
                if caption is not None:
                    batch["vis_prompt"] = paddle.to_tensor(np.repeat(caption[:, None], n, axis=1))
                if context is not None:
                    batch["vis_prev"] = paddle.to_tensor(context[:, offsets[k] : offsets[k + 1]])
                out = model(batch, with_mtp=False, cache=cache)
                logits.append(out.extra["visual"]["logits"].astype("float32").numpy())
            z = logits[0] if not guided else logits[1] + cfg_scale * (logits[0] - logits[1])
            if temperature == 0:
                bits = np.where(z >= 0, 1.0, -1.0)
            else:
                p = 1.0 / (1.0 + np.exp(-z / temperature))
                bits = np.where(rng.random(p.shape) < p, 1.0, -1.0)
            tokens[:, f, offsets[k] : offsets[k + 1]] = bits
    return tokens


def tokens_to_codes(tokens_BTNK: np.ndarray, scales) -> list[np.ndarray]:
    """Bit tokens in scale order -> the tokenizer's codes: per scale [B, T, s, s, K]."""
    b, t, _, k = tokens_BTNK.shape
    offsets = np.cumsum([0] + [s * s for s in scales])
    return [
        tokens_BTNK[:, :, offsets[i] : offsets[i + 1]].reshape(b, t, s, s, k)
        for i, s in enumerate(scales)
    ]


@paddle.no_grad()
def decode_tokens(tok, tokens_BTNK: np.ndarray, scales) -> np.ndarray:
    """Frames [B, T, 3, H, W] in [0, 1] decoded by the tokenizer from bit tokens of `scales` (a
    prefix of the tokenizer's scales)."""
    codes = tokens_to_codes(tokens_BTNK, scales)
    return np.clip(tok.decode([paddle.to_tensor(c) for c in codes]).numpy(), 0.0, 1.0)
