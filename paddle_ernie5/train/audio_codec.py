"""Training the mel RVQ codec (component audio_codec) on the built-in speech, on the loop of
train/loop.py, and its held-out evaluation.

Each step: a random batch of utterances (log-mels padded to audio_codec.max_seconds, computed once),
a random prefix of RVQ levels for a `quantizer_dropout` share of them, and the loss of
`codec_losses`: mel L1 + commitment (+ codebook) loss + content_weight * level-0 character CTC.
Codebooks start from k-means on the first batch's latents. Saves codec.safetensors and codec.json in
train.run_dir and reports held-out-voice mel L1 per number of levels, level-0 character error rate
and code perplexity (and a speech judge's accuracy on reconstructions, if audio_codec.judge is set).

    ernie5 train recipes/audio_codec.yaml
"""

from __future__ import annotations

import math
import sys

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..config import AudioCodecConfig, LoopConfig, to_plain
from ..data.speech import WORDS
from ..optim.optimizer import apply_update
from ..tokenizers import mel as M
from ..tokenizers.audio import CHARS, AudioCodec, ctc_greedy, text_to_labels
from ..tokenizers.mel import SAMPLE_RATE
from .loop import Component, Loop


class _Batches:
    """A speech set as log-mels padded to max_seconds (computed once), masks and CTC labels."""

    def __init__(self, codec: AudioCodec, speech, max_seconds: float):
        n = int(round(max_seconds * SAMPLE_RATE))
        waves, lengths = speech.padded(n)
        self.mel = M.log_mel(waves)  # [S, M, N]
        self.mel_valid = -(-lengths // M.HOP)
        self.frames_valid = -(-lengths // codec.samples_per_frame)
        self.num_frames = n // codec.samples_per_frame
        self.speech = speech
        self.labels = [text_to_labels(t) for t in speech.texts]

    def __len__(self):
        return len(self.labels)

    def get(self, idx):
        mel_mask = np.arange(self.mel.shape[1])[None] < self.mel_valid[idx, None]
        frame_mask = np.arange(self.num_frames)[None] < self.frames_valid[idx, None]
        labels = [self.labels[i] for i in idx]
        lab = np.zeros((len(idx), max(1, max(len(l) for l in labels))), np.int32)
        for j, l in enumerate(labels):
            lab[j, : len(l)] = l
        return dict(
            mel=paddle.to_tensor(self.mel[idx]),
            mel_mask=paddle.to_tensor(mel_mask, "float32"),
            frame_mask=paddle.to_tensor(frame_mask, "float32"),
            labels=lab,
            label_lens=np.array([len(l) for l in labels], np.int64),
            frames=self.frames_valid[idx],
        )


def _ctc_loss(logits_BFV, batch):
    """Mean CTC loss per character over the utterances whose frames can hold their transcript."""
    labels, lens, frames = batch["labels"], batch["label_lens"], batch["frames"]
    repeats = np.array([sum(a == b for a, b in zip(l[:n], l[1:n])) for l, n in zip(labels, lens)])
    ok = (lens > 0) & (frames >= lens + repeats)  # CTC needs a blank between repeated characters
    if not ok.any():
        return paddle.zeros([])
    per_utt = F.ctc_loss(
        F.log_softmax(logits_BFV, -1).transpose([1, 0, 2]),
        paddle.to_tensor(labels),
        paddle.to_tensor(frames.astype(np.int64)),
        paddle.to_tensor(lens),
        blank=0,
        reduction="none",
    ).reshape([-1])
    w = paddle.to_tensor((ok / np.maximum(lens, 1)).astype(np.float32))
    return (per_utt * w).sum() / float(ok.sum())


def codec_losses(codec: AudioCodec, batch: dict, levels_B: np.ndarray) -> dict:
    """Training losses for one batch; `levels_B` is how many RVQ levels each utterance decodes from.

    Reconstruction and quantisation cover the whole window, the silence after each utterance
    included: encoded audio is padded to whole frames, and that padding must decode to silence."""
    z = codec.encode_latent(batch["mel"])
    _, quants_LBFD, vq = codec.quantise(z, paddle.ones(z.shape[:2]))
    keep = paddle.to_tensor(np.arange(codec.num_levels)[:, None] < levels_B[None], "float32")
    zq = (quants_LBFD * keep.reshape([codec.num_levels, -1, 1, 1])).sum(0)
    recon = codec.decode_latent(z + (zq - z).detach())  # straight-through to the encoder
    mel_l1 = (recon - batch["mel"]).abs().mean()
    q0 = z + (quants_LBFD[0] - z).detach()
    ctc = _ctc_loss(codec.ctc_head(q0.transpose([0, 2, 1])).transpose([0, 2, 1]), batch)
    total = mel_l1 + vq + codec.cfg.content_weight * ctc
    return dict(loss=total, mel_l1=mel_l1, vq=vq, ctc=ctc)


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


@paddle.no_grad()
def evaluate(codec: AudioCodec, data: _Batches, judge=None, batch_size: int = 64) -> dict:
    """Held-out numbers: mel L1 (nats) per number of levels over each utterance's own frames (speech
    and its 40 ms margins, not the padding), level-0 CTC character error rate, code perplexity per
    level; with a judge, its accuracy on real and on reconstructed (Griffin-Lim) single words."""
    codec.eval()
    L = codec.num_levels
    l1_sum, frames, errors, chars = np.zeros(L), 0.0, 0, 0
    codes_all = []
    for s in range(0, len(data), batch_size):
        b = data.get(np.arange(s, min(s + batch_size, len(data))))
        z = codec.encode_latent(b["mel"])
        codes, quants, _ = codec.quantise(z, b["frame_mask"])
        mask = b["mel_mask"]
        for n in range(1, L + 1):
            recon = codec.decode_latent(quants[:n].sum(0)).clip(min=math.log(M.LOG_FLOOR))
            l1_sum[n - 1] += float(((recon - b["mel"]).abs().mean(-1) * mask).sum())
        frames += float(mask.sum())
        best = codec.ctc_head(quants[0].transpose([0, 2, 1])).argmax(1).numpy()
        for j, i in enumerate(range(s, s + len(best))):
            truth = "".join(CHARS[c - 1] for c in data.labels[i])
            errors += _edit_distance(ctc_greedy(best[j, : b["frames"][j]]), truth)
            chars += len(truth)
        codes_all.append(codes.numpy().reshape(-1, L)[b["frame_mask"].numpy().reshape(-1) > 0])
    codes_all = np.concatenate(codes_all)
    out = {f"mel_l1_levels_{n}": l1_sum[n - 1] / frames for n in range(1, L + 1)}
    out["mel_l1"] = out[f"mel_l1_levels_{L}"]
    out["level0_cer"] = errors / max(1, chars)
    usage = [
        np.bincount(codes_all[:, l], minlength=codec.codebook_size) / len(codes_all)
        for l in range(L)
    ]
    out["code_perplexity_mean"] = float(
        np.mean([np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()) for p in usage])
    )
    if judge is not None:
        words = data.speech.words_only()
        padded, _ = words.padded(
            codec.frames_for(int(words.lengths.max())) * codec.samples_per_frame
        )
        out["judge_acc_real"] = judge.score(words.waves, words.word_ids)
        out["judge_acc_codec"] = judge.score(codec.decode(codec.encode(padded)), words.word_ids)
        out["judge_chance"] = 1.0 / len(WORDS)
    return out


class CodecRun(Component):
    """A codec trained on every utterance of `train_set` (words and phrases), evaluated on
    `eval_set`; the running averages of its losses are reported as train_mel_l1 and train_ctc."""

    name = "audio codec"

    def __init__(
        self,
        cfg: AudioCodecConfig,
        tc: LoopConfig,
        train_set,
        eval_set,
        judge,
        rng: np.random.Generator,
    ):
        self.cfg, self.tc, self.rng, self.judge = cfg, tc, rng, judge
        self.config = to_plain(cfg)
        self.model = codec = AudioCodec(cfg)
        self.train_data = _Batches(codec, train_set, cfg.max_seconds)
        self.held = _Batches(codec, eval_set, cfg.max_seconds)
        first = self.train_data.get(
            rng.choice(len(self.train_data), min(len(self.train_data), 64), replace=False)
        )
        z = codec.encode_latent(first["mel"]).detach().reshape([-1, cfg.code_dim])
        valid = paddle.nonzero(first["frame_mask"].reshape([-1])).flatten()
        codec.rvq.init_kmeans(paddle.gather(z, valid), seed=tc.seed)
        # ema codebooks are not trained by the optimizer
        params = [p for p in codec.parameters() if not p.stop_gradient]
        clip = nn.ClipGradByGlobalNorm(tc.clip_norm) if tc.clip_norm else None
        self.optimizer = paddle.optimizer.AdamW(
            learning_rate=tc.lr,
            parameters=params,
            weight_decay=tc.weight_decay,
            beta1=tc.beta1,
            beta2=tc.beta2,
            epsilon=tc.eps,
            grad_clip=clip,
        )
        self.ema: dict[str, float] = {}

    def step(self, step: int) -> dict[str, float]:
        tc, rng, levels = self.tc, self.rng, self.cfg.levels
        batch = self.train_data.get(rng.integers(0, len(self.train_data), tc.batch_size))
        drop = rng.random(tc.batch_size) < self.cfg.quantizer_dropout
        levels_B = np.where(drop, rng.integers(1, levels + 1, tc.batch_size), levels)
        losses = codec_losses(self.model, batch, levels_B)
        losses["loss"].backward()
        apply_update(self.model, self.optimizer, step, tc)
        scalars = {k: float(v) for k, v in losses.items()}
        for k, v in scalars.items():
            self.ema[k] = v if k not in self.ema else 0.95 * self.ema[k] + 0.05 * v
        return {f"train/{k}": v for k, v in scalars.items()}

    def evaluate(self) -> dict:
        return {
            "train_mel_l1": self.ema.get("mel_l1"),
            "train_ctc": self.ema.get("ctc"),
            **evaluate(self.model, self.held, self.judge),
        }

    def finish(self, run_dir: str) -> dict:
        self.model.save(run_dir)
        return {}

    def state_dict(self) -> dict:
        return {"ema": dict(self.ema)}

    def load_state_dict(self, state: dict) -> None:
        self.ema = dict(state["ema"])


def fit_codec(
    cfg: AudioCodecConfig, tc: LoopConfig, train_set, eval_set, judge=None
) -> tuple[AudioCodec, dict]:
    """Train a codec in memory (seeded by tc.seed, nothing written); metrics on `eval_set`."""
    loop = Loop(tc)
    run = CodecRun(cfg, tc, train_set, eval_set, judge, loop.rng)
    return run.model, loop.fit(run)


def train_from_config(cfg) -> dict:
    """`ernie5 train recipes/audio_codec.yaml`: train on the training voices, save the codec to
    train.run_dir (codec.safetensors, codec.json, metrics.json), report held-out-voice metrics."""
    from ..data.speech import load_speech

    ac = cfg.audio_codec
    judge = None
    if ac.judge:  # loaded before seeding: building it draws random initial weights
        from ..eval.speech_judge import SpeechJudge

        try:
            judge = SpeechJudge.load(ac.judge)
        except FileNotFoundError as e:  # the judge is an extra report; the codec trains without it
            print(
                f"warning: {e}; the judge's accuracy on reconstructions is not reported",
                file=sys.stderr,
            )
    train_set, eval_set = load_speech(cfg.data.cache_dir)
    loop = Loop(cfg.train, cfg)
    return loop.fit(CodecRun(ac, cfg.train, train_set, eval_set, judge, loop.rng))
