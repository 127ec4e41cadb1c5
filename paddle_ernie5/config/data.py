"""The `data` section: sequence length, caches, validation split and the pretraining mixture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ._check import _check

# The modality each mixture source needs in model.modalities (its weight must be 0 otherwise).
MIXTURE_MODALITY = {
    "text": "text",
    "image_gen": "image",
    "image_qa": "image",
    "video_gen": "video",
    "video_qa": "video",
    "asr": "audio",
    "tts": "audio",
    "passkey": "text",
}


@dataclass(frozen=True, kw_only=True)
class MixtureConfig:
    """Sampling weights of the pretraining sources (data/mixture.py). All non-text weights 0 (the
    default) means the plain packed text loader; otherwise each document of a row is drawn from
    the sources in proportion to these weights. The field names are the keys of
    data/mixture.SOURCES."""

    text: float = 1.0  # pretraining text (data/text.py)
    image_gen: float = 0.0  # caption -> image (next-scale bits)
    image_qa: float = 0.0  # image + question -> answer
    video_gen: float = 0.0  # caption -> video (next-frame-and-scale bits)
    video_qa: float = 0.0  # video + question -> answer
    asr: float = 0.0  # speech -> transcript
    tts: float = 0.0  # transcript -> speech (depth-wise codec codes)
    passkey: float = 0.0  # long-context passkey retrieval in built-in text (data/long_context.py)

    def weights(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def validate(self, at: str) -> None:
        for name, w in self.weights().items():
            _check(at, name, w, w >= 0, ">= 0")
        _check(at, "text", self.text, sum(self.weights().values()) > 0, "at least one weight > 0")

    @property
    def enabled(self) -> bool:
        return any(w > 0 for k, w in self.weights().items() if k != "text")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    seq_len: int = 256
    bpe_dropout: float = 0.0  # BPE-dropout probability during training (0 = off)
    val_fraction: float = 0.05
    # Seed of the built-in text's train/validation split and of the text tokenizer trained on it.
    # Kept apart from train.seed: runs of any seed, and the SFT/RL/eval runs that start from them,
    # read the same split and the same tokenizer (a tokenizer that follows train.seed would silently
    # re-map every token of a checkpoint trained under another seed).
    split_seed: int = 1234
    cache_dir: str = ".cache/paddle_ernie5"  # tokenizer models and built datasets
    eval_batches: int = 0  # 0 = the whole validation split
    mixture: MixtureConfig = field(default_factory=MixtureConfig)

    def validate(self, at: str) -> None:
        self.mixture.validate(f"{at}.mixture")
        _check(at, "seq_len", self.seq_len, self.seq_len >= 8, ">= 8")
        _check(at, "bpe_dropout", self.bpe_dropout, 0 <= self.bpe_dropout < 1, "0 <= p < 1")
        _check(at, "val_fraction", self.val_fraction, 0 < self.val_fraction < 0.5, "0 < f < 0.5")
        _check(at, "eval_batches", self.eval_batches, self.eval_batches >= 0, ">= 0")
