"""Uni-RoPE: rotary embeddings over (t, h, w) positions shared by every modality.

Each rotary frequency pair is assigned to one axis (t, h or w; shares from the config). A text or
audio token has t = h = w = its index, which makes Uni-RoPE identical to ordinary 1D RoPE for it.
Vision tokens carry (frame, row, column) with scales centre-aligned by the data pipeline.

Legend: B batch, S sequence, D head_dim, P = D // 2 frequency pairs.

The rotation itself (rotate-half, pairs (i, i + D/2)) lives in ops/fused.py: `apply_rope` is the
pure-Paddle form, `rope_qkv` splits the fused qkv projection and rotates q and k in one op.
"""

from __future__ import annotations

import numpy as np
import paddle

from ..ops.fused import apply_rope, rope_qkv

__all__ = ["apply_rope", "axis_of_pair", "rope_cos_sin", "rope_qkv"]


def axis_of_pair(head_dim: int, sections: tuple[float, float, float]) -> np.ndarray:
    """For each frequency pair, which position axis (0=t, 1=h, 2=w) drives it; interleaved so every
    axis gets both high and low frequencies."""
    pairs = head_dim // 2
    counts = np.floor(np.asarray(sections) * pairs).astype(int)
    counts[0] += pairs - counts.sum()
    order = np.argsort(-np.asarray(sections), kind="stable")
    axes, left = [], counts.copy()
    while len(axes) < pairs:
        for a in order:
            if left[a] > 0 and len(axes) < pairs:
                axes.append(a)
                left[a] -= 1
    return np.asarray(axes, dtype=np.int64)


def rope_cos_sin(positions_B3S, head_dim: int, base: float, sections):
    """cos/sin tables [B, S, 1, D] for positions [B, 3, S] (computed once per forward)."""
    inv_freq_P = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    axes_P = axis_of_pair(head_dim, tuple(sections))
    pos_BSP = paddle.gather(
        positions_B3S.astype("float32").transpose([0, 2, 1]), paddle.to_tensor(axes_P), axis=2
    )
    angles_BSP = pos_BSP * paddle.to_tensor(inv_freq_P.astype(np.float32))
    angles_BSD = paddle.concat([angles_BSP, angles_BSP], axis=-1)
    return paddle.cos(angles_BSD).unsqueeze(2), paddle.sin(angles_BSD).unsqueeze(2)
