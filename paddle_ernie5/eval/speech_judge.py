"""The speech judge: an independent classifier of which word (data/speech.py WORDS) was spoken.

It is trained only on real synthesised speech of the training voices (never on codec output or on
anything a model generated), and its accuracy is reported on held-out voices. It then scores
generated or reconstructed speech, and is meant to be reused as an RL verifier:

    judge = SpeechJudge.load("runs/speech_judge")          # a run dir or its judge.safetensors
    judge.predict(waves)            -> [B] int64 word ids   (waves: [B, T] array or list of 1-D arrays)
    judge.probs(waves)              -> [B, len(WORDS)] float32 (a soft reward: probs[i, target_i])
    judge.score(waves, words)       -> accuracy in 0..1      (words: ids or strings from WORDS)

Input: 16 kHz audio, cut or zero-padded to `max_seconds`, as a log-mel (data/mel.py) shifted so its
loudest bin is 0 (loudness carries no content). Model: 1-D convolutions over time with mel bins as
channels, then max and mean pooling over time, then a linear layer: it does not care where in the
window the word is, which matters for generated speech with unpredictable leading silence.
Training augments with random placement in the window, white noise and time/mel masking.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..config import SpeechJudgeConfig, TrainConfig
from ..io import read_layer, save_layer
from ..tokenizers import mel as M
from ..data.speech import SAMPLE_RATE, WORDS
from ..optim.optimizer import apply_update

WEIGHTS, META = "judge.safetensors", "judge.json"


class SpeechJudge(nn.Layer):
    def __init__(self, channels: int = 64, max_seconds: float = 1.2, dropout: float = 0.1):
        super().__init__()
        self.hparams = dict(channels=channels, max_seconds=max_seconds, dropout=dropout)
        self.num_samples = int(round(max_seconds * SAMPLE_RATE)) // M.HOP * M.HOP
        c = channels
        self.convs = nn.LayerList([
            nn.Conv1D(M.N_MELS, c, 5, stride=2, padding=2), nn.Conv1D(c, c, 5, padding=2),
            nn.Conv1D(c, 2 * c, 5, stride=2, padding=2), nn.Conv1D(2 * c, 2 * c, 3, padding=1)])
        self.norms = nn.LayerList([nn.BatchNorm1D(n) for n in (c, c, 2 * c, 2 * c)])
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(4 * c, len(WORDS))

    def forward(self, feats_BMN: paddle.Tensor) -> paddle.Tensor:
        """Normalised log-mel [B, M, N_MELS] -> word logits [B, len(WORDS)]."""
        x = feats_BMN.transpose([0, 2, 1])
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(x)))
        pooled = paddle.concat([x.max(axis=2), x.mean(axis=2)], axis=1)
        return self.out(self.drop(pooled))

    # --- features -----------------------------------------------------------------------------

    def window(self, waves) -> np.ndarray:
        """[B, num_samples] float32: each wave cut or zero-padded at the end."""
        out = np.zeros((len(waves), self.num_samples), np.float32)
        for i, w in enumerate(waves):
            w = np.asarray(w, np.float32).reshape(-1)[:self.num_samples]
            out[i, :len(w)] = w
        return out

    @staticmethod
    def features(windows_BT: np.ndarray) -> np.ndarray:
        lm = M.log_mel(windows_BT)
        return (lm - lm.max(axis=(1, 2), keepdims=True)) / 4.0

    # --- inference ----------------------------------------------------------------------------

    @paddle.no_grad()
    def probs(self, waves, batch_size: int = 64) -> np.ndarray:
        was_training = self.training
        self.eval()
        out = []
        for s in range(0, len(waves), batch_size):
            feats = self.features(self.window(waves[s:s + batch_size]))
            out.append(F.softmax(self(paddle.to_tensor(feats)), axis=-1).numpy())
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, len(WORDS)), np.float32)

    def predict(self, waves) -> np.ndarray:
        return self.probs(waves).argmax(axis=1).astype(np.int64)

    def score(self, waves, words) -> float:
        ids = np.array([WORDS.index(w) if isinstance(w, str) else int(w) for w in words], np.int64)
        return float((self.predict(waves) == ids).mean()) if len(ids) else float("nan")

    # --- persistence --------------------------------------------------------------------------

    def save(self, run_dir: str) -> None:
        save_layer(run_dir, self, dict(self.hparams, words=list(WORDS), sample_rate=SAMPLE_RATE),
                   WEIGHTS, META)

    @classmethod
    def load(cls, path: str) -> "SpeechJudge":
        run_dir = os.path.dirname(path) if path.endswith(".safetensors") else path
        meta, state = read_layer(run_dir, "speech judge",
                                 "train one with `ernie5 train recipes/speech_judge.yaml`", WEIGHTS, META)
        if tuple(meta["words"]) != WORDS or meta["sample_rate"] != SAMPLE_RATE:
            raise ValueError(f"speech judge in {run_dir!r} was trained for other words or sample rate")
        judge = cls(meta["channels"], meta["max_seconds"], meta["dropout"])
        judge.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        judge.eval()
        return judge


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


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
    """Random placement in the window, then one time mask (< 8 frames) and one mel mask (< 10 bins)."""
    out = np.empty_like(feats)
    lo = feats.min()
    for i, (f, n) in enumerate(zip(feats, frames)):
        out[i] = np.roll(f, int(rng.integers(0, max(1, f.shape[0] - n + 1))), axis=0)
        t0, m0 = rng.integers(0, f.shape[0]), rng.integers(0, f.shape[1])
        out[i, t0:t0 + rng.integers(0, 8)] = lo
        out[i, :, m0:m0 + rng.integers(0, 10)] = lo
    return out


def fit_judge(cfg: SpeechJudgeConfig, tc: TrainConfig, train_set, eval_set) -> tuple[SpeechJudge, dict]:
    """Train on the single-word utterances of `train_set`; metrics on those of `eval_set`."""
    from tqdm import tqdm

    paddle.seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    train_set, eval_set = train_set.words_only(), eval_set.words_only()
    judge = SpeechJudge(cfg.channels, cfg.max_seconds, cfg.dropout)
    opt = paddle.optimizer.AdamW(learning_rate=tc.lr, parameters=judge.parameters(),
                                 weight_decay=tc.weight_decay, beta1=tc.beta1, beta2=tc.beta2,
                                 epsilon=tc.eps,
                                 grad_clip=nn.ClipGradByGlobalNorm(tc.clip_norm) if tc.clip_norm else None)
    start, loss_ema = time.time(), None
    feats, frames = _train_features(judge, train_set.waves, rng)
    labels = np.concatenate([train_set.word_ids, train_set.word_ids])
    bar = tqdm(range(tc.max_steps), desc="speech judge", disable=not tc.progress, dynamic_ncols=True)
    judge.train()
    with warnings.catch_warnings():  # BatchNorm warns on every training forward; nothing to act on
        warnings.filterwarnings("ignore", message="When training, we now always track")
        for step in bar:
            idx = rng.integers(0, len(labels), tc.batch_size)
            x = paddle.to_tensor(_augment(feats[idx], frames[idx], rng))
            loss = F.cross_entropy(judge(x), paddle.to_tensor(labels[idx]))
            loss.backward()
            apply_update(judge, opt, step, tc)
            loss_ema = float(loss) if loss_ema is None else 0.95 * loss_ema + 0.05 * float(loss)
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    judge.eval()
    metrics = dict(train_seconds=time.time() - start, train_loss=loss_ema,
                   heldout_acc=judge.score(eval_set.waves, eval_set.word_ids),
                   chance=1.0 / len(WORDS), heldout_utterances=len(eval_set),
                   heldout_voices=len(set(eval_set.voices)))
    return judge, metrics


def train_from_config(cfg) -> dict:
    """`ernie5 train recipes/speech_judge.yaml`: train, save to train.run_dir, report held-out accuracy.

    Also reports the accuracy on the same held-out speech after a mel round trip through Griffin-Lim
    (data/mel.py): the ceiling for anything the mel codec can produce."""
    from ..config import save_config
    from ..data.speech import load_speech

    train_set, eval_set = load_speech(cfg.data.cache_dir)
    judge, metrics = fit_judge(cfg.speech_judge, cfg.train, train_set, eval_set)
    judge.save(cfg.train.run_dir)
    save_config(cfg, os.path.join(cfg.train.run_dir, "config.yaml"))
    words = eval_set.words_only()
    padded, _ = words.padded(judge.num_samples)
    metrics["heldout_acc_griffin_lim"] = judge.score(M.mel_to_wave(M.log_mel(padded)), words.word_ids)
    with open(os.path.join(cfg.train.run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics
