"""Training the speech judge (component speech_judge) on the single-word utterances of the
training voices, on the loop of train/loop.py. Each step draws a batch of precomputed features
(clean and noisy copies of every word), places each word at a random offset in the window and masks
a few frames and mel bins. Saves judge.safetensors and judge.json in train.run_dir and reports
held-out-voice accuracy (eval/speech_judge.py), also after a Griffin-Lim mel round trip.

    ernie5 train recipes/speech_judge.yaml
"""

from __future__ import annotations

import warnings

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..config import LoopConfig, SpeechJudgeConfig, to_plain
from ..data.speech import WORDS
from ..eval.speech_judge import SpeechJudge
from ..optim.optimizer import apply_update
from ..tokenizers import mel as M
from .loop import Component, Loop


def _train_features(judge: SpeechJudge, waves: list[np.ndarray], rng: np.random.Generator):
    """Features of every utterance twice, clean and with white noise at 15-40 dB SNR, computed once.

    Speech starts each window and is followed by silence (or noise), so rolling the frames later in
    `_augment` places the word anywhere in the window exactly, to the nearest 10 ms hop."""
    clean = judge.window(waves)
    noisy = clean.copy()
    for i, w in enumerate(waves):
        power = np.mean(np.asarray(w, np.float64) ** 2) / 10 ** (rng.uniform(15, 40) / 10)
        noisy[i] += rng.normal(0, np.sqrt(power), judge.num_samples).astype(np.float32)
    feats = judge.features(np.concatenate([clean, noisy]))
    frames = np.array([min(len(w), judge.num_samples) // M.HOP + 1 for w in waves] * 2)
    return feats, frames


def _augment(feats: np.ndarray, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random placement in the window, then one time mask (< 8 frames) and one mel mask
    (< 10 bins)."""
    out = np.empty_like(feats)
    lo = feats.min()
    for i, (f, n) in enumerate(zip(feats, frames)):
        out[i] = np.roll(f, int(rng.integers(0, max(1, f.shape[0] - n + 1))), axis=0)
        t0, m0 = rng.integers(0, f.shape[0]), rng.integers(0, f.shape[1])
        out[i, t0 : t0 + rng.integers(0, 8)] = lo
        out[i, :, m0 : m0 + rng.integers(0, 10)] = lo
    return out


class JudgeRun(Component):
    """A judge trained on the words of `train_set`, evaluated on those of `eval_set`; the running
    average of its loss is reported as train_loss."""

    name = "speech judge"

    def __init__(
        self, cfg: SpeechJudgeConfig, tc: LoopConfig, train_set, eval_set, rng: np.random.Generator
    ):
        self.tc, self.rng = tc, rng
        self.config = to_plain(cfg)
        self.eval_set = eval_set.words_only()
        words = train_set.words_only()
        self.model = judge = SpeechJudge(cfg.channels, cfg.max_seconds, cfg.dropout)
        clip = nn.ClipGradByGlobalNorm(tc.clip_norm) if tc.clip_norm else None
        self.optimizer = paddle.optimizer.AdamW(
            learning_rate=tc.lr,
            parameters=judge.parameters(),
            weight_decay=tc.weight_decay,
            beta1=tc.beta1,
            beta2=tc.beta2,
            epsilon=tc.eps,
            grad_clip=clip,
        )
        self.feats, self.frames = _train_features(judge, words.waves, rng)
        self.labels = np.concatenate([words.word_ids, words.word_ids])
        self.loss_ema = None

    def step(self, step: int) -> dict[str, float]:
        idx = self.rng.integers(0, len(self.labels), self.tc.batch_size)
        x = paddle.to_tensor(_augment(self.feats[idx], self.frames[idx], self.rng))
        with warnings.catch_warnings():  # BatchNorm warns on every training forward; nothing to do
            warnings.filterwarnings("ignore", message="When training, we now always track")
            loss = F.cross_entropy(self.model(x), paddle.to_tensor(self.labels[idx]))
        loss.backward()
        apply_update(self.model, self.optimizer, step, self.tc)
        value = float(loss)
        self.loss_ema = value if self.loss_ema is None else 0.95 * self.loss_ema + 0.05 * value
        return {"train/loss": value}

    def evaluate(self) -> dict:
        held = self.eval_set
        return dict(
            train_loss=self.loss_ema,
            heldout_acc=self.model.score(held.waves, held.word_ids),
            chance=1.0 / len(WORDS),
            heldout_utterances=len(held),
            heldout_voices=len(set(held.voices)),
        )

    def finish(self, run_dir: str) -> dict:
        """Save; the accuracy on held-out words after a mel round trip through Griffin-Lim is the
        ceiling for anything the mel codec can produce."""
        self.model.save(run_dir)
        padded, _ = self.eval_set.padded(self.model.num_samples)
        again = M.mel_to_wave(M.log_mel(padded))
        return {"heldout_acc_griffin_lim": self.model.score(again, self.eval_set.word_ids)}

    def state_dict(self) -> dict:
        return {"loss_ema": self.loss_ema}

    def load_state_dict(self, state: dict) -> None:
        self.loss_ema = state["loss_ema"]


def fit_judge(
    cfg: SpeechJudgeConfig, tc: LoopConfig, train_set, eval_set
) -> tuple[SpeechJudge, dict]:
    """Train in memory (seeded by tc.seed, nothing written) on the single-word utterances of
    `train_set`; metrics on those of `eval_set`."""
    loop = Loop(tc)
    run = JudgeRun(cfg, tc, train_set, eval_set, loop.rng)
    return run.model, loop.fit(run)


def train_from_config(cfg) -> dict:
    """`ernie5 train recipes/speech_judge.yaml`: train, save to train.run_dir, report held-out
    accuracy (also after a Griffin-Lim round trip)."""
    from ..data.speech import load_speech

    train_set, eval_set = load_speech(cfg.data.cache_dir)
    loop = Loop(cfg.train, cfg)
    return loop.fit(JudgeRun(cfg.speech_judge, cfg.train, train_set, eval_set, loop.rng))
