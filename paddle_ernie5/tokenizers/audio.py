"""Audio tokenizer: a mel codec with residual vector quantisation (RVQ), level 0 content-bearing.

    wave [B, T] 16 kHz -> log-mel [B, M, 80] at 100 Hz (tokenizers/mel.py)
      -> encoder: conv, log2(r) stride-2 convs, residual blocks -> z [B, F, D], F = M / r
      -> RVQ: level l quantises what levels < l left over        -> codes [B, F, L], q_l [B, F, D]
      -> decoder: residual blocks, stride-2 transposed convs     -> log-mel [B, M, 80]
      -> Griffin-Lim (tokenizers/mel.py)                         -> wave [B, F * samples_per_frame]
    level-0 code embeddings -> small conv head -> character CTC (training only: makes level 0
    carry the words, the toy analogue of ERNIE 5.0's semantically aligned first level)

Why mel and not waveform: a waveform decoder needs adversarial and multi-resolution spectral
losses and hours of training before it stops buzzing; a mel decoder trains in minutes on a CPU
with an L1 loss, and Griffin-Lim turns its output into speech the judge still recognises (the
recipe reports the judge's accuracy on real speech after the same mel round trip, the ceiling for
this codec).

Codebooks learn by exponential moving averages of their assigned residuals (k-means in running
form; `codebook_learning: gradient` uses a codebook loss instead); the encoder gets
straight-through gradients and a commitment loss per level; codes unused for a while are restarted
at residuals of the current batch. Quantiser dropout trains the decoder on random prefixes of
levels, so every prefix decodes to speech and each further level lowers the error.

API for the backbone (all arrays numpy unless stated):
    codec = AudioCodec.load(run_dir)         # or AudioCodec(AudioCodecConfig(...))
    codes = codec.encode(wave_BT)            # int64 [B, F, L]; F = ceil(T / samples_per_frame)
    wave = codec.decode(codes)               # float32 [B, F * samples_per_frame]
    mel = codec.decode_mel(codes, levels=n)  # log-mel from the first n levels only
    emb = codec.embed_levels(codes_tensor)   # paddle [B, F, L, D]; sum over L = decoder input
    cb = codec.codebooks()                   # paddle [L, K, D] copy, to initialise embeddings
    codec.save(run_dir)                      # codec.safetensors + codec.json
    codec.sample_rate, .samples_per_frame, .frame_rate, .num_levels, .codebook_size, .code_dim
Trained by train/audio_codec.py (`ernie5 train recipes/audio_codec.yaml`).

Shape legend: B batch, T samples, M mel frames (100 Hz), N mel bins, F codec frames, L levels,
K codebook size, D code dimension, C channels, V characters (CTC blank = 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..config import AudioCodecConfig, AudioModelConfig
from ..errors import UserError
from ..io import read_layer, save_layer
from . import mel as M
from .mel import SAMPLE_RATE

WEIGHTS, META = "codec.safetensors", "codec.json"
CHARS = " abcdefghijklmnopqrstuvwxyz'"  # CTC classes 1..; 0 is the blank
MEL_SHIFT, MEL_SCALE = -1.5, 2.0  # log-mel -> roughly zero-mean, unit-range network inputs


def text_to_labels(text: str) -> list[int]:
    return [CHARS.index(c) + 1 for c in text.lower() if c in CHARS]


def ctc_greedy(ids_F: np.ndarray) -> str:
    """Collapse repeats, drop blanks."""
    out, prev = [], 0
    for i in ids_F:
        if i != prev and i != 0:
            out.append(CHARS[i - 1])
        prev = i
    return "".join(out)


class ResBlock(nn.Layer):
    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = nn.Conv1D(channels, channels, 3, padding=dilation, dilation=dilation)
        self.proj = nn.Conv1D(channels, channels, 1)

    def forward(self, x_BCF):
        return x_BCF + self.proj(F.gelu(self.conv(F.gelu(x_BCF))))


class ResidualVQ(nn.Layer):
    """L codebooks of K codes; level l quantises the residual left by levels < l (nearest code)."""

    def __init__(self, cfg: AudioCodecConfig):
        super().__init__()
        self.cfg = cfg
        L, K, D = cfg.levels, cfg.codebook_size, cfg.code_dim
        self.codebook = self.create_parameter(
            [L, K, D], default_initializer=nn.initializer.Normal(0, 1)
        )
        self.codebook.stop_gradient = cfg.codebook_learning == "ema"
        self.register_buffer("usage", paddle.ones([L, K]))  # EMA of assignments per step
        # EMA of assigned residuals.
        self.register_buffer("embed_sum", self.codebook.detach().clone())

    @staticmethod
    def nearest(r_ND, cb_KD):
        d_NK = (r_ND * r_ND).sum(-1, keepdim=True) - 2 * r_ND @ cb_KD.T + (cb_KD * cb_KD).sum(-1)
        return d_NK.argmin(-1)

    def forward(self, z_ND, mask_N):
        """Quantise every level. Returns codes [N, L], per-level codes' vectors [L, N, D] and the
        commitment (+ codebook) loss averaged over the frames where mask_N is 1."""
        r = z_ND
        codes, quants, loss = [], [], paddle.zeros([])
        denom = mask_N.sum().clip(min=1.0)
        for l in range(self.cfg.levels):
            cb = self.codebook[l]
            idx = self.nearest(r.detach(), cb.detach())
            q = paddle.gather(cb, idx)
            err = ((r - q.detach()) ** 2).mean(-1)
            loss = loss + self.cfg.commit_weight * (err * mask_N).sum() / denom
            if self.cfg.codebook_learning == "gradient":
                loss = loss + (((r.detach() - q) ** 2).mean(-1) * mask_N).sum() / denom
            if self.training:
                self._update(l, r.detach(), idx, mask_N)
            codes.append(idx)
            quants.append(q)
            r = r - q.detach()
        return paddle.stack(codes, -1), paddle.stack(quants, 0), loss

    @paddle.no_grad()
    def _update(self, level: int, r_ND, idx_N, mask_N):
        """EMA codebook step (ema mode) and restart of codes whose usage fell below the
        threshold."""
        decay, K = self.cfg.ema_decay, self.cfg.codebook_size
        onehot_NK = F.one_hot(idx_N, K) * mask_N.unsqueeze(-1)
        usage = decay * self.usage[level] + (1 - decay) * onehot_NK.sum(0)
        self.usage[level] = usage
        if self.cfg.codebook_learning == "ema":
            embed_sum = decay * self.embed_sum[level] + (1 - decay) * (onehot_NK.T @ r_ND)
            self.embed_sum[level] = embed_sum
            n = usage.sum()
            # Laplace smoothing keeps rare codes finite.
            smoothed = (usage + 1e-5) / (n + K * 1e-5) * n
            self.codebook[level] = embed_sum / smoothed.unsqueeze(-1)
        dead = paddle.nonzero(usage < self.cfg.dead_code_threshold).flatten()
        valid = paddle.nonzero(mask_N > 0).flatten()
        if dead.shape[0] and valid.shape[0]:
            pick = valid[paddle.randint(0, valid.shape[0], [dead.shape[0]])]
            fresh = paddle.gather(r_ND, pick)
            self._scatter(level, dead, fresh)

    def _scatter(self, level: int, rows, values_RD):
        """Codes `rows` of `level` restart at `values_RD` with a usage of one assignment per
        step."""
        self.codebook[level] = paddle.scatter(self.codebook[level].clone(), rows, values_RD)
        self.embed_sum[level] = paddle.scatter(self.embed_sum[level].clone(), rows, values_RD)
        self.usage[level] = paddle.scatter(
            self.usage[level].clone(), rows, paddle.ones([rows.shape[0]])
        )

    @paddle.no_grad()
    def init_kmeans(self, z_ND, iters: int = 4, seed: int = 0):
        """Data-dependent start: per level, a few Lloyd iterations on that level's residuals."""
        rng = np.random.default_rng(seed)
        r = z_ND
        for l in range(self.cfg.levels):
            cb = paddle.gather(
                r, paddle.to_tensor(rng.integers(0, r.shape[0], self.cfg.codebook_size))
            )
            for _ in range(iters):
                onehot = F.one_hot(self.nearest(r, cb), self.cfg.codebook_size)
                counts = onehot.sum(0).unsqueeze(-1)
                cb = paddle.where(counts > 0, (onehot.T @ r) / counts.clip(min=1.0), cb)
            self.codebook[l] = cb
            self.embed_sum[l] = cb
            r = r - paddle.gather(cb, self.nearest(r, cb))


_DEFAULT_CONFIG = AudioCodecConfig()  # frozen, so one shared default is safe


class AudioCodec(nn.Layer):
    def __init__(self, cfg: AudioCodecConfig = _DEFAULT_CONFIG):
        super().__init__()
        self.cfg = cfg
        self.sample_rate = SAMPLE_RATE
        self.frame_rate = cfg.frame_rate
        self.mels_per_frame = int(round(SAMPLE_RATE / M.HOP / cfg.frame_rate))  # 2, 4 or 8
        self.samples_per_frame = self.mels_per_frame * M.HOP
        self.num_levels, self.codebook_size, self.code_dim = (
            cfg.levels,
            cfg.codebook_size,
            cfg.code_dim,
        )
        C, D, downs = cfg.channels, cfg.code_dim, int(math.log2(self.mels_per_frame))
        self.enc_in = nn.Conv1D(M.N_MELS, C, 3, padding=1)
        self.enc_down = nn.LayerList(
            [nn.Conv1D(C, C, 4, stride=2, padding=1) for _ in range(downs)]
        )
        self.enc_res = nn.LayerList([ResBlock(C, 3**i) for i in range(cfg.res_blocks)])
        self.enc_out = nn.Conv1D(C, D, 1)
        self.rvq = ResidualVQ(cfg)
        self.dec_in = nn.Conv1D(D, C, 3, padding=1)
        self.dec_res = nn.LayerList([ResBlock(C, 3**i) for i in range(cfg.res_blocks)])
        self.dec_up = nn.LayerList(
            [nn.Conv1DTranspose(C, C, 4, stride=2, padding=1) for _ in range(downs)]
        )
        self.dec_out = nn.Conv1D(C, M.N_MELS, 3, padding=1)
        self.ctc_head = nn.Sequential(
            nn.Conv1D(D, C, 3, padding=1), nn.GELU(), nn.Conv1D(C, len(CHARS) + 1, 1)
        )

    # --- the network ----------------------------------------------------------------------------

    def encode_latent(self, log_mel_BMN):
        x = self.enc_in((log_mel_BMN - MEL_SHIFT).transpose([0, 2, 1]) / MEL_SCALE)
        for down in self.enc_down:
            x = down(F.gelu(x))
        for block in self.enc_res:
            x = block(x)
        return self.enc_out(F.gelu(x)).transpose([0, 2, 1])  # [B, F, D]

    def decode_latent(self, z_BFD):
        """Quantised latent (a sum of level embeddings) -> log-mel
        [B, F * mels_per_frame, N_MELS]."""
        x = self.dec_in(z_BFD.transpose([0, 2, 1]))
        for block in self.dec_res:
            x = block(x)
        for up in self.dec_up:
            x = up(F.gelu(x))
        return (self.dec_out(F.gelu(x)) * MEL_SCALE + MEL_SHIFT).transpose([0, 2, 1])

    def quantise(self, z_BFD, mask_BF):
        b, f, d = z_BFD.shape
        codes_NL, quants_LND, loss = self.rvq(z_BFD.reshape([-1, d]), mask_BF.reshape([-1]))
        return codes_NL.reshape([b, f, -1]), quants_LND.reshape([-1, b, f, d]), loss

    # --- API ------------------------------------------------------------------------------------

    def frames_for(self, num_samples: int) -> int:
        return -(-num_samples // self.samples_per_frame)

    def _log_mel(self, wave_BT) -> np.ndarray:
        wave_BT = np.atleast_2d(np.asarray(wave_BT, np.float32))
        pad = self.frames_for(wave_BT.shape[1]) * self.samples_per_frame - wave_BT.shape[1]
        return M.log_mel(np.pad(wave_BT, ((0, 0), (0, pad))))

    @paddle.no_grad()
    def encode(self, wave_BT) -> np.ndarray:
        """16 kHz waves [B, T] (zero-padded to whole frames) -> int64 codes [B, F, L]."""
        z = self.encode_latent(paddle.to_tensor(self._log_mel(wave_BT)))
        codes, _, _ = self.quantise(z, paddle.ones(z.shape[:2]))
        return codes.numpy().astype(np.int64)

    def embed_levels(self, codes_BFL):
        """paddle [B, F, L, D]: each level's code vector; their sum is what the decoder reads."""
        codes_BFL = paddle.to_tensor(codes_BFL, dtype="int64")
        return paddle.stack(
            [
                paddle.gather(self.rvq.codebook[l], codes_BFL[..., l].flatten()).reshape(
                    [*codes_BFL.shape[:2], -1]
                )
                for l in range(codes_BFL.shape[-1])
            ],
            2,
        )

    def codebooks(self):
        return self.rvq.codebook.detach().clone()

    @paddle.no_grad()
    def decode_mel(self, codes_BFL, levels: int | None = None) -> np.ndarray:
        """Codes (a prefix of `levels` levels is used) -> log-mel
        [B, F * mels_per_frame, N_MELS]."""
        levels = levels or self.num_levels
        z = self.embed_levels(np.asarray(codes_BFL)[..., :levels]).sum(2)
        return self.decode_latent(z).clip(min=math.log(M.LOG_FLOOR)).numpy()

    def decode(self, codes_BFL, levels: int | None = None) -> np.ndarray:
        """Codes [B, F, L] -> 16 kHz waves [B, F * samples_per_frame] via Griffin-Lim."""
        return M.mel_to_wave(self.decode_mel(codes_BFL, levels), iters=self.cfg.griffin_lim_iters)

    def save(self, run_dir: str) -> None:
        meta = dict(
            config=dataclasses.asdict(self.cfg), sample_rate=SAMPLE_RATE, n_mels=M.N_MELS, hop=M.HOP
        )
        save_layer(run_dir, self, meta, WEIGHTS, META)

    @classmethod
    def load(cls, path: str) -> AudioCodec:
        run_dir = os.path.dirname(path) if path.endswith(".safetensors") else path
        meta, state = read_layer(
            run_dir,
            "audio codec",
            "train one with `ernie5 train recipes/audio_codec.yaml`",
            WEIGHTS,
            META,
        )
        if (meta["sample_rate"], meta["n_mels"], meta["hop"]) != (SAMPLE_RATE, M.N_MELS, M.HOP):
            raise ValueError(
                f"audio codec in {run_dir!r} was trained on other mel features: {meta}"
            )
        codec = cls(AudioCodecConfig(**meta["config"]))
        codec.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        codec.eval()
        return codec


class CodecMissing(UserError, FileNotFoundError):
    """model.audio.codec_dir holds no trained codec."""


def open_codec(codec_dir: str):
    """The frozen codec in `codec_dir`, or CodecMissing naming the command that trains one."""
    try:
        return AudioCodec.load(codec_dir)
    except FileNotFoundError as e:
        raise CodecMissing(f"model.audio.codec_dir={codec_dir!r}: {e}") from None


def load_codec(acfg: AudioModelConfig):
    """The codec of model.audio, checked against its levels and codebook size."""
    codec = open_codec(acfg.codec_dir)
    if codec.num_levels < acfg.levels or codec.codebook_size != acfg.codebook_size:
        raise UserError(
            f"model.audio (levels={acfg.levels}, codebook_size={acfg.codebook_size}) does not "
            f"fit the codec in {acfg.codec_dir!r} ({codec.num_levels} levels of "
            f"{codec.codebook_size} codes)"
        )
    return codec


def codec_fingerprint(codec_dir: str) -> str:
    """Hash of the codec's weights: cached codes are keyed by it."""
    path = os.path.join(codec_dir, WEIGHTS)
    if not os.path.isfile(path):
        open_codec(codec_dir)  # raises CodecMissing with the full explanation
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]
