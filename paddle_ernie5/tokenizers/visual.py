"""Multi-scale bit-wise visual tokenizer: causal conv encoder/decoder, residual sign quantisation.

An image is a one-frame video. Every frame goes through the same 2D convs; frames meet only in
causal temporal mixers (a frame sees itself and `temporal_kernel - 1` earlier frames), so the
features and codes of frame t never depend on later frames, for the encoder and the decoder alike.

    frames_BTCHW --enc--> f_BTKhw --------------------- (pre-quantisation features: understanding)
                                |
        residual r = f          v          for each scale side s in `scales` (1, 2, 4, ...):
          bits_s  = sign(area_down(r, s))                  [B, T, s, s, K] in {-1, +1}
          z_hat  += phi_s(upsample(gain_s * bits_s))       (gain_s learned per scale and bit)
          r       = f - z_hat
                                |
    frames_hat <--dec-- z_hat (+ straight-through: the value of z_hat, the gradient of f)

Each scale quantises what the earlier scales left over (VAR / Infinity style), so decoding a
prefix of scales gives a coarse image and every further scale refines it. A token is the `K` signs
at one cell; `codes_to_ids` reads bit j (channel j) as 2**j, so the vocabulary is 2**K. With fewer
active bits (progressive schedule, or `bits=` at encode time) the unused channels of z_hat are
zero; `decode` takes codes with any number of bits <= K and any prefix of the scales.

Legend: B batch, T frames, C=3 colour channels, H W pixels, K bits (latent channels), h w latent
cells, N = B*T frames folded into the batch, D conv channels.

API (the backbone builds on these):
    tok = VisualTokenizer(cfg: VisualTokenizerConfig)        or  VisualTokenizer.load(path)
    feats_BTKhw, codes = tok.encode(frames_BTCHW, bits=None)  codes: list per scale [B, T, s, s, k]
    frames_BTCHW = tok.decode(codes)
    ids = codes_to_ids(codes_s);  codes_s = ids_to_codes(ids, bits)   (bit-exact, numpy or paddle)
    tok.save(path)   -> path/model.safetensors + path/config.json
Trained by train/visual_tokenizer.py (`ernie5 train recipes/visual_tokenizer.yaml`).
"""

from __future__ import annotations

import math
import os

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..config import VisualTokenizerConfig, from_dict, to_plain
from ..io import read_layer, save_layer

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Codes <-> ids


def codes_to_ids(codes):
    """[..., K] signs in {-1, +1} -> int64 [...], bit j (code > 0) worth 2**j. numpy or paddle
    in/out."""
    if isinstance(codes, np.ndarray):
        weights = 1 << np.arange(codes.shape[-1], dtype=np.int64)
        return ((codes > 0).astype(np.int64) * weights).sum(-1)
    weights = paddle.to_tensor(1 << np.arange(codes.shape[-1], dtype=np.int64))
    return ((codes > 0).astype("int64") * weights).sum(-1)


def ids_to_codes(ids, bits: int):
    """int [...] -> float32 [..., bits] in {-1, +1}; inverse of codes_to_ids."""
    if isinstance(ids, np.ndarray):
        b = (ids[..., None].astype(np.int64) >> np.arange(bits, dtype=np.int64)) & 1
        return (2 * b - 1).astype(np.float32)
    shifts = paddle.to_tensor(np.arange(bits, dtype=np.int64))
    b = paddle.bitwise_and(
        paddle.bitwise_right_shift(ids.astype("int64").unsqueeze(-1), shifts),
        paddle.to_tensor(1, dtype="int64"),
    )
    return (2 * b - 1).astype("float32")


# --------------------------------------------------------------------------------------------------
# Building blocks


class ResBlock(nn.Layer):
    """x + conv(silu(conv(silu(x)))), per frame; the second conv starts at zero (identity block)."""

    def __init__(self, d: int):
        super().__init__()
        self.conv1 = nn.Conv2D(d, d, 3, padding=1)
        self.conv2 = nn.Conv2D(d, d, 3, padding=1, weight_attr=_zeros(), bias_attr=_zeros())

    def forward(self, x_NDhw):
        return x_NDhw + self.conv2(F.silu(self.conv1(F.silu(x_NDhw))))


class CausalTemporalMix(nn.Layer):
    """x_t + W [x_t, x_{t-1}, ..., x_{t-k+1}] (1x1 conv; frames before the first are zeros)."""

    def __init__(self, d: int, k: int):
        super().__init__()
        self.k = k
        self.proj = nn.Conv2D(d * k, d, 1, weight_attr=_zeros(), bias_attr=_zeros())

    def forward(self, x_NDhw, T: int):
        if self.k == 1:
            return x_NDhw + self.proj(F.silu(x_NDhw))
        N, D, h, w = x_NDhw.shape
        x_BTDhw = F.silu(x_NDhw).reshape([-1, T, D, h, w])
        past = [x_BTDhw]
        for i in range(1, self.k):
            shifted = (
                paddle.concat([paddle.zeros_like(x_BTDhw[:, :i]), x_BTDhw[:, : T - i]], axis=1)
                if i < T
                else paddle.zeros_like(x_BTDhw)
            )
            past.append(shifted)
        stacked = paddle.concat(past, axis=2).reshape([N, D * self.k, h, w])
        return x_NDhw + self.proj(stacked)


def _zeros():
    return paddle.ParamAttr(initializer=nn.initializer.Constant(0.0))


def _widths(cfg: VisualTokenizerConfig) -> list[int]:
    levels = int(math.log2(cfg.downsample))
    return [min(cfg.width * 2**i, cfg.width * 4) for i in range(levels + 1)]


class Encoder(nn.Layer):
    def __init__(self, cfg: VisualTokenizerConfig):
        super().__init__()
        ws = _widths(cfg)
        self.conv_in = nn.Conv2D(3, ws[0], 3, padding=1)
        self.stages = nn.LayerList()
        for a, b in zip(ws, ws[1:]):
            self.stages.append(nn.Sequential(ResBlock(a), nn.Conv2D(a, b, 3, stride=2, padding=1)))
        self.mid1, self.mid2 = ResBlock(ws[-1]), ResBlock(ws[-1])
        self.time = CausalTemporalMix(ws[-1], cfg.temporal_kernel)
        self.conv_out = nn.Conv2D(ws[-1], cfg.bits, 1)

    def forward(self, x_NCHW, T: int):
        h = self.conv_in(x_NCHW * 2 - 1)
        for stage in self.stages:
            h = stage(h)
        h = self.mid2(self.time(self.mid1(h), T))
        return self.conv_out(F.silu(h))


class Decoder(nn.Layer):
    def __init__(self, cfg: VisualTokenizerConfig):
        super().__init__()
        ws = _widths(cfg)[::-1]
        self.conv_in = nn.Conv2D(cfg.bits, ws[0], 3, padding=1)
        self.mid1, self.mid2 = ResBlock(ws[0]), ResBlock(ws[0])
        self.time = CausalTemporalMix(ws[0], cfg.temporal_kernel)
        self.stages = nn.LayerList()
        for a, b in zip(ws, ws[1:]):
            self.stages.append(nn.LayerList([nn.Conv2D(a, b, 3, padding=1), ResBlock(b)]))
        self.conv_out = nn.Conv2D(ws[-1], 3, 3, padding=1)

    def forward(self, z_NKhw, T: int):
        h = self.mid2(self.time(self.mid1(self.conv_in(z_NKhw)), T))
        for conv, block in self.stages:
            h = block(conv(F.interpolate(h, scale_factor=2, mode="nearest")))
        return self.conv_out(F.silu(h)) * 0.5 + 0.5


class MultiScaleBitQuantizer(nn.Layer):
    """Residual sign quantisation over growing token maps (see the module sketch)."""

    def __init__(self, cfg: VisualTokenizerConfig):
        super().__init__()
        self.scales, self.bits = tuple(cfg.scales), cfg.bits
        self.side = cfg.scales[-1]
        # Later scales code smaller residuals: start each scale at half the previous magnitude.
        init = np.array([[0.5**i] * cfg.bits for i in range(len(cfg.scales))], np.float32)
        self.gain = self.create_parameter(
            [len(cfg.scales), cfg.bits], default_initializer=nn.initializer.Assign(init)
        )
        self.phi = nn.LayerList(
            [
                nn.Conv2D(
                    cfg.bits, cfg.bits, 3, padding=1, weight_attr=_zeros(), bias_attr=_zeros()
                )
                for _ in cfg.scales
            ]
        )

    def contribution(self, s: int, bits_NKss):
        """What scale s adds to z_hat, given its signs (channels beyond the given bits are zero)."""
        k = bits_NKss.shape[1]
        if k < self.bits:
            pad = paddle.zeros(
                [bits_NKss.shape[0], self.bits - k, *bits_NKss.shape[2:]], bits_NKss.dtype
            )
            bits_NKss = paddle.concat([bits_NKss, pad], axis=1)
        q = bits_NKss * self.gain[s].reshape([1, -1, 1, 1])
        if self.scales[s] != self.side:
            q = F.interpolate(q, size=[self.side, self.side], mode="bilinear", align_corners=False)
        return q + self.phi[s](q)

    def quantize(self, f_NKhw, bits: int):
        """-> (z_hat_NKhw, [signs_NKss per scale] with `bits` channels). Signs carry no gradient."""
        f = f_NKhw.detach()
        z_hat = paddle.zeros_like(f)
        signs = []
        for s, side in enumerate(self.scales):
            with paddle.no_grad():
                r = f - z_hat
                if side != self.side:
                    r = F.adaptive_avg_pool2d(r, side)
                b = paddle.where(
                    r[:, :bits] >= 0, paddle.ones_like(r[:, :bits]), -paddle.ones_like(r[:, :bits])
                )
            signs.append(b)
            z_hat = z_hat + self.contribution(s, b)
        return z_hat, signs

    def dequantize(self, signs_NKss: list):
        z_hat = None
        for s, b in enumerate(signs_NKss):
            c = self.contribution(s, b)
            z_hat = c if z_hat is None else z_hat + c
        return z_hat


# --------------------------------------------------------------------------------------------------
# The tokenizer


class VisualTokenizer(nn.Layer):
    def __init__(self, cfg: VisualTokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = MultiScaleBitQuantizer(cfg)
        self.decoder = Decoder(cfg)

    @property
    def vocab_size(self) -> int:
        return 2**self.cfg.bits

    @property
    def tokens_per_frame(self) -> int:
        return sum(s * s for s in self.cfg.scales)

    def features(self, frames_BTCHW):
        """Pre-quantisation features [B, T, K, h, w] (what visual understanding reads)."""
        frames_BTCHW = _as_video(frames_BTCHW)
        B, T = frames_BTCHW.shape[:2]
        f = self.encoder(frames_BTCHW.reshape([B * T, *frames_BTCHW.shape[2:]]), T)
        return f.reshape([B, T, *f.shape[1:]])

    def encode(self, frames_BTCHW, bits: int | None = None):
        """frames [B, T, 3, H, W] in [0, 1] (or [B, 3, H, W] = one frame) ->
        (features [B, T, K, h, w], codes: per scale float32 [B, T, s, s, bits] in {-1, +1})."""
        bits = bits or self.cfg.bits
        feats = self.features(frames_BTCHW)
        B, T = feats.shape[:2]
        _, signs = self.quantizer.quantize(feats.reshape([B * T, *feats.shape[2:]]), bits)
        codes = [b.reshape([B, T, *b.shape[1:]]).transpose([0, 1, 3, 4, 2]) for b in signs]
        return feats, codes

    def decode(self, codes: list):
        """codes (any prefix of the scales, any bits <= K) -> frames [B, T, 3, H, W]."""
        B, T = codes[0].shape[:2]
        signs = [paddle.to_tensor(c) if isinstance(c, np.ndarray) else c for c in codes]
        signs = [
            c.astype("float32")
            .transpose([0, 1, 4, 2, 3])
            .reshape([B * T, c.shape[-1], *c.shape[2:4]])
            for c in signs
        ]
        x = self.decoder(self.quantizer.dequantize(signs), T)
        return x.reshape([B, T, *x.shape[1:]])

    def forward(self, frames_BTCHW, bits: int | None = None):
        """Training pass: (reconstruction [B, T, 3, H, W], commitment loss)."""
        bits = bits or self.cfg.bits
        frames_BTCHW = _as_video(frames_BTCHW)
        B, T = frames_BTCHW.shape[:2]
        f = self.encoder(frames_BTCHW.reshape([B * T, *frames_BTCHW.shape[2:]]), T)
        z_hat, _ = self.quantizer.quantize(f, bits)
        # Codebook side: z_hat (gains, phi) moves toward f; commitment: f moves toward z_hat.
        vq = F.mse_loss(z_hat, f.detach()) + self.cfg.commit_weight * F.mse_loss(f, z_hat.detach())
        # Straight-through: the decoder sees z_hat; the encoder gets the decoder's gradient as is.
        x = self.decoder(z_hat + (f - f.detach()), T)
        return x.reshape(frames_BTCHW.shape), vq

    # -- persistence -------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        """path/model.safetensors + path/config.json, each written to a temporary name and
        renamed."""
        save_layer(path, self, {"format_version": FORMAT_VERSION, "config": to_plain(self.cfg)})

    @classmethod
    def load(cls, path: str) -> VisualTokenizer:
        """From a directory written by `save`, or a visual_tokenizer run dir (its tokenizer/
        folder)."""
        if os.path.isdir(os.path.join(path, "tokenizer")):
            path = os.path.join(path, "tokenizer")
        meta, state = read_layer(
            path, "visual tokenizer", "train one with `ernie5 train recipes/visual_tokenizer.yaml`"
        )
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: tokenizer format {meta.get('format_version')} != {FORMAT_VERSION}"
            )
        cfg = from_dict(VisualTokenizerConfig, meta["config"], "visual_tokenizer")
        cfg.validate("visual_tokenizer")
        tok = cls(cfg)
        missing = set(tok.state_dict()) ^ set(state)
        if missing:
            raise ValueError(f"{path}: parameters do not match the config: {sorted(missing)[:5]}")
        tok.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        tok.eval()
        return tok


def _as_video(frames):
    if isinstance(frames, np.ndarray):
        frames = paddle.to_tensor(frames, dtype="float32")
    return frames.unsqueeze(1) if frames.ndim == 4 else frames


def psnr(x, y) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1] (reconstruction clipped to [0, 1])."""
    mse = float(np.mean((np.clip(np.asarray(x), 0, 1) - np.asarray(y)) ** 2))
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


@paddle.no_grad()
def reconstruct(
    tok: VisualTokenizer,
    frames: np.ndarray,
    batch: int = 64,
    bits: int | None = None,
    num_scales: int | None = None,
) -> np.ndarray:
    """encode -> (first num_scales scales) -> decode, in batches; numpy in, numpy out, same
    shape."""
    out = []
    for i in range(0, len(frames), batch):
        _, codes = tok.encode(frames[i : i + batch], bits)
        x = tok.decode(codes[:num_scales] if num_scales else codes).numpy()
        out.append(x.reshape(frames[i : i + batch].shape))
    return np.concatenate(out)
