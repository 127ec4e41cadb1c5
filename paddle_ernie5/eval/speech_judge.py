"""The speech judge: an independent classifier of which word (data/speech.py WORDS) was spoken.

It is trained only on real synthesised speech of the training voices (never on codec output or on
anything a model generated), and its accuracy is reported on held-out voices. It then scores
generated or reconstructed speech, and is meant to be reused as an RL verifier:

    judge = SpeechJudge.load("runs/speech_judge")  # a run dir or its judge.safetensors
    judge.predict(waves)      -> [B] int64 word ids  (waves: [B, T] array or list of 1-D arrays)
    judge.probs(waves)        -> [B, len(WORDS)] float32  (a soft reward: probs[i, target_i])
    judge.score(waves, words) -> accuracy in 0..1  (words: ids or strings from WORDS)

Input: 16 kHz audio, cut or zero-padded to `max_seconds`, as a log-mel (tokenizers/mel.py) shifted
so its loudest bin is 0 (loudness carries no content). Model: 1-D convolutions over time with mel
bins as channels, then max and mean pooling over time, then a linear layer: it does not care where
in the window the word is, which matters for generated speech with unpredictable leading silence.
Training (train/speech_judge.py) augments with random placement in the window, white noise and
time/mel masking.
"""

from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..data.speech import SAMPLE_RATE, WORDS
from ..io import read_layer, save_layer
from ..tokenizers import mel as M

WEIGHTS, META = "judge.safetensors", "judge.json"


class SpeechJudge(nn.Layer):
    def __init__(self, channels: int = 64, max_seconds: float = 1.2, dropout: float = 0.1):
        super().__init__()
        self.hparams = dict(channels=channels, max_seconds=max_seconds, dropout=dropout)
        self.num_samples = int(round(max_seconds * SAMPLE_RATE)) // M.HOP * M.HOP
        c = channels
        self.convs = nn.LayerList(
            [
                nn.Conv1D(M.N_MELS, c, 5, stride=2, padding=2),
                nn.Conv1D(c, c, 5, padding=2),
                nn.Conv1D(c, 2 * c, 5, stride=2, padding=2),
                nn.Conv1D(2 * c, 2 * c, 3, padding=1),
            ]
        )
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
            w = np.asarray(w, np.float32).reshape(-1)[: self.num_samples]
            out[i, : len(w)] = w
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
            feats = self.features(self.window(waves[s : s + batch_size]))
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
        save_layer(
            run_dir,
            self,
            dict(self.hparams, words=list(WORDS), sample_rate=SAMPLE_RATE),
            WEIGHTS,
            META,
        )

    @classmethod
    def load(cls, path: str) -> SpeechJudge:
        run_dir = os.path.dirname(path) if path.endswith(".safetensors") else path
        meta, state = read_layer(
            run_dir,
            "speech judge",
            "train one with `ernie5 train recipes/speech_judge.yaml`",
            WEIGHTS,
            META,
        )
        if tuple(meta["words"]) != WORDS or meta["sample_rate"] != SAMPLE_RATE:
            raise ValueError(
                f"speech judge in {run_dir!r} was trained for other words or sample rate"
            )
        judge = cls(meta["channels"], meta["max_seconds"], meta["dropout"])
        judge.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        judge.eval()
        return judge
