"""Audio in the backbone: summed RVQ-level embeddings in, depth-wise code prediction out.

Legend: B batch, S sequence, M width, L levels, K codebook size, D table width, H head MLP width,
N rows being sampled.

An audio token is one codec frame (tokenizers/audio.py, 25 Hz). Understanding reads the frame as
ONE token: the embeddings of its L codes are summed (ERNIE5.md), then projected to the model width.
Generation is depth-wise: from the final hidden state h at position j the head predicts the frame
at j + 1 level by level, each level seeing the codes of the levels before it:

    h ──────────── MLP_0 ─> logits over K codes + <eoa>  (level 0: the words, and "speech ends")
    │ + E_0[c_0]
    x_1 ───────── MLP_1 ─> logits over K codes           (level 1: first acoustic residual)
    │ + E_1[c_1]
    x_2 ───────── MLP_2 ─> ...                           c_l = true code (training) or sampled

Attention over audio is causal and positions are t = h = w = index (the data pipeline sets them).
Batch keys (data/audio_sources.py): `audio_codes` [B,S,L] int64, the frame at audio positions
(token_types == audio), 0 elsewhere; `audio_targets` [B,S,L] int64, the next frame's codes (level
0 = K means <eoa>); `audio_target_mask` [B,S,L] float32, 1 where a level has a target.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..config import ModelConfig
from ..errors import UserError
from .embeddings import MODALITY_IDS, register_modality
from .generation import KVCache
from .heads import register_head
from .norm import RMSNorm

AUDIO_TYPE = MODALITY_IDS["audio"]


@register_modality("audio")
class AudioEmbedding(nn.Layer):
    """Frame codes [B,S,L] -> sum over levels of tables[l][code] [B,S,D] -> Linear -> [B,S,M]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.audio
        self.levels = a.levels
        self.tables = self.create_parameter(
            [a.levels, a.codebook_size, a.embed_dim],
            default_initializer=nn.initializer.Normal(std=1.0),
        )
        # Unit-variance tables summed over L levels, then this projection: audio tokens start at the
        # scale of text embeddings (std init_std).
        self.proj = nn.Linear(
            a.embed_dim,
            cfg.hidden_size,
            bias_attr=False,
            weight_attr=nn.initializer.Normal(std=cfg.init_std / math.sqrt(a.embed_dim * a.levels)),
        )
        self.acfg = a

    @paddle.no_grad()
    def init_from_codebooks(self, codebooks_LKD) -> None:
        """Start the tables at the codec's codebooks (scaled to unit std; level ratios kept), so
        that the summed embedding of a frame is the codec's quantised latent up to a scale."""
        if list(codebooks_LKD.shape) != list(self.tables.shape):
            raise UserError(
                f"codec codebooks {list(codebooks_LKD.shape)} do not fit the audio tables "
                f"{list(self.tables.shape)}: set model.audio.embed_dim to the codec's code_dim"
            )
        cb = paddle.to_tensor(np.asarray(codebooks_LKD, np.float32))
        self.tables.set_value(cb / cb.std(unbiased=False).clip(min=1e-6))

    def embed(self, codes_BSL):
        parts = [F.embedding(codes_BSL[..., l], self.tables[l]) for l in range(self.levels)]
        return self.proj(paddle.add_n(parts))

    def forward(self, batch):
        if "audio_codes" not in batch:
            return None
        return self.embed(batch["audio_codes"][..., : self.levels])


class _LevelOut(nn.Layer):
    def __init__(self, m: int, hidden: int, classes: int, eps: float, std: float, fused: bool):
        super().__init__()
        self.norm = RMSNorm(m, eps, fused)
        init = nn.initializer.Normal(std=std)
        if hidden:
            self.mlp = nn.Sequential(
                nn.Linear(m, hidden, weight_attr=init),
                nn.GELU(),
                nn.Linear(hidden, classes, weight_attr=init),
            )
        else:
            self.mlp = nn.Linear(m, classes, weight_attr=init)

    def forward(self, x):
        return self.mlp(self.norm(x))


@register_head("audio", ("audio",))
class DepthwiseAudioHead(nn.Layer):
    """Predicts the next frame level by level (see the module sketch). Level 0 has K + 1 classes;
    the last one, END = K, is <eoa>."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.audio
        self.levels, self.codebook_size, self.end = a.levels, a.codebook_size, a.codebook_size
        self.level_weights = a.level_weights()
        self.loss_weight = a.loss_weight
        self.outs = nn.LayerList(
            [
                _LevelOut(
                    cfg.hidden_size,
                    a.head_hidden,
                    a.codebook_size + (1 if l == 0 else 0),
                    cfg.rms_eps,
                    cfg.init_std,
                    cfg.fused_ops,
                )
                for l in range(a.levels)
            ]
        )
        self.code_embed = nn.LayerList(
            [
                nn.Embedding(
                    a.codebook_size,
                    cfg.hidden_size,
                    weight_attr=nn.initializer.Normal(std=cfg.init_std),
                )
                for _ in range(a.levels - 1)
            ]
        )

    def _add_code(self, x, level: int, codes):
        # An <eoa> at level 0 has no deeper levels (masked); any valid row stands in for it.
        return x + self.code_embed[level](paddle.clip(codes, 0, self.codebook_size - 1))

    def forward(self, h_BSM, batch):
        """Teacher forcing: level l sees the true codes of levels < l of the next frame."""
        if "audio_targets" not in batch:
            return {}
        targets_BSL = batch["audio_targets"]
        x, logits = h_BSM, []
        for l in range(self.levels):
            logits.append(self.outs[l](x))
            if l + 1 < self.levels:
                x = self._add_code(x, l, targets_BSL[..., l])
        return {"logits": logits}

    def loss(self, pred, batch):
        """One entry per level: (mean cross-entropy over its targets, count, weight)."""
        if "logits" not in pred:
            return {}
        targets_BSL, mask_BSL = batch["audio_targets"], batch["audio_target_mask"]
        out = {}
        for l, logits in enumerate(pred["logits"]):
            k = logits.shape[-1]
            t = paddle.clip(targets_BSL[..., l], 0, k - 1).reshape([-1, 1])
            ce = F.cross_entropy(
                logits.reshape([-1, k]).astype("float32"), t, reduction="none"
            ).reshape([-1])
            m = mask_BSL[..., l].reshape([-1])
            count = m.sum()
            out[f"audio/level{l}"] = (
                (ce * m).sum() / count.clip(min=1.0),
                count,
                self.loss_weight * self.level_weights[l],
            )
        return out

    @paddle.no_grad()
    def sample(self, h_NM, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0):
        """Depth-wise sampling of one frame per row: (codes [N, L] int64, ended [N] bool). A row
        whose level 0 drew <eoa> has ended; its codes are then meaningless."""
        x = h_NM
        codes = np.zeros([h_NM.shape[0], self.levels], np.int64)
        ended = None
        for l in range(self.levels):
            c = _draw(self.outs[l](x).astype("float32").numpy(), rng, temperature, top_k)
            if l == 0:
                ended = c == self.end
            codes[:, l] = np.minimum(c, self.codebook_size - 1)
            if l + 1 < self.levels:
                x = self._add_code(x, l, paddle.to_tensor(codes[:, l]))
        return codes, ended


def _draw(
    logits_NK: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int
) -> np.ndarray:
    """Greedy (temperature 0) or Gumbel-max sampling, optionally restricted to the top k classes."""
    if temperature == 0:
        return logits_NK.argmax(-1)
    logits = logits_NK / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits >= kth, logits, -np.inf)
    gumbel = -np.log(-np.log(rng.random(logits.shape) + 1e-20) + 1e-20)
    return (logits + gumbel).argmax(-1)


def _step_batch(codes_NL: np.ndarray, start: int) -> dict:
    n = codes_NL.shape[0]
    return {
        "input_ids": paddle.zeros([n, 1], "int64"),
        "token_types": paddle.full([n, 1], AUDIO_TYPE, "int64"),
        "positions": paddle.full([n, 3, 1], start, "int64"),
        "startend_row_indices": None,
        "audio_codes": paddle.to_tensor(codes_NL[:, None, :]),
    }


@paddle.no_grad()
def sample_speech(
    model,
    prompts: list[list[int]],
    *,
    max_frames: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[np.ndarray]:
    """Codes [F_i, L] of speech continuing each prompt (text ids ending in <boa>), depth-wise, with
    the KV cache; a row stops at <eoa> (not included) or after `max_frames`. Prompts of one length
    run as one batch in lock-step."""
    model.eval()
    head = model.heads["audio"]
    rng = np.random.default_rng(seed)
    out: list[np.ndarray | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for plen, rows in sorted(by_len.items()):
        ids = paddle.to_tensor(np.asarray([prompts[i] for i in rows], np.int64))
        n = len(rows)
        cache = KVCache()
        pos = paddle.arange(plen, dtype="int64").reshape([1, 1, plen]).expand([n, 3, plen])
        h = model(
            {
                "input_ids": ids,
                "token_types": paddle.zeros([n, plen], "int64"),
                "positions": pos,
                "startend_row_indices": None,
            },
            with_mtp=False,
            cache=cache,
        ).hidden[:, -1]
        frames = np.zeros([n, max_frames, head.levels], np.int64)
        lengths = np.full([n], max_frames, np.int64)
        done = np.zeros([n], bool)
        for t in range(max_frames):
            codes, ended = head.sample(h, rng, temperature, top_k)
            newly = ended & ~done
            lengths[newly] = t
            done |= newly
            frames[:, t] = codes
            if done.all() or t + 1 == max_frames:
                break
            h = model(_step_batch(codes, cache.length()), with_mtp=False, cache=cache).hidden[:, -1]
        for j, i in enumerate(rows):
            out[i] = frames[j, : lengths[j]]
    return out
