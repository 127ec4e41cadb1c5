"""Sections of the separately trained components (recipes with component visual_tokenizer,
vision_judge, vision_merger, audio_codec or speech_judge): tokenizers, codecs, judges, mergers."""

from __future__ import annotations

from dataclasses import dataclass

from ._check import _check


@dataclass(frozen=True, kw_only=True)
class VisualTokenizerConfig:
    """Multi-scale bit-wise visual tokenizer (tokenizers/visual.py), component visual_tokenizer.

    A frame of image_size^2 pixels becomes a latent of (image_size / downsample)^2 cells; each
    scale in `scales` is a token map of that side whose tokens are `bits` signs (vocabulary
    2**bits)."""

    image_size: int = 16  # frames are image_size x image_size RGB
    frames: int = 8  # frames per video clip in training and evaluation
    width: int = 32  # channels of the first conv stage; doubled per downsampling, capped at 4x
    downsample: int = 2  # pixels per latent cell side (a power of 2)
    bits: int = 8
    # token-map sides, increasing; the last is the latent side
    scales: tuple[int, ...] = (1, 2, 4, 8)
    # Progressive bits (ERNIE5.md): training is cut into equal phases that use these many bits, e.g.
    # (4, 8); () = `bits` throughout. Unused bits are zero in the quantised latent.
    bit_schedule: tuple[int, ...] = ()
    temporal_kernel: int = 2  # causal temporal mixing over this frame and k-1 earlier ones
    commit_weight: float = 0.25  # pulls encoder features toward their quantisation
    video_every: int = 2  # add a video batch every n steps; 0 = images only
    video_batch_size: int = 4  # clips per video batch
    image_copies: int = 2  # colourings per handwritten sample in the training images
    # a vision_judge run dir: also report its accuracy on reconstructions ("" = skip)
    judge: str = ""

    def validate(self, at: str) -> None:
        for name in (
            "image_size",
            "frames",
            "width",
            "bits",
            "temporal_kernel",
            "video_batch_size",
            "image_copies",
        ):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(
            at,
            "downsample",
            self.downsample,
            self.downsample >= 1
            and self.downsample & (self.downsample - 1) == 0
            and self.image_size % self.downsample == 0,
            f"a power of 2 dividing image_size={self.image_size}",
        )
        _check(at, "bits", self.bits, 1 <= self.bits <= 30, "1..30")
        side = self.image_size // max(1, self.downsample)
        _check(
            at,
            "scales",
            self.scales,
            len(self.scales) >= 1
            and all(a < b for a, b in zip(self.scales, self.scales[1:]))
            and self.scales[0] >= 1
            and self.scales[-1] == side,
            f"increasing sides >= 1 ending at image_size / downsample = {side}",
        )
        _check(
            at,
            "bit_schedule",
            self.bit_schedule,
            not self.bit_schedule
            or (
                all(a <= b for a, b in zip(self.bit_schedule, self.bit_schedule[1:]))
                and self.bit_schedule[0] >= 1
                and self.bit_schedule[-1] == self.bits
            ),
            f"() or non-decreasing bit counts >= 1 ending at bits={self.bits}",
        )
        _check(at, "commit_weight", self.commit_weight, self.commit_weight >= 0, ">= 0")
        _check(at, "video_every", self.video_every, self.video_every >= 0, ">= 0 (0 = images only)")


@dataclass(frozen=True, kw_only=True)
class VisionJudgeConfig:
    """Independent classifier of digit, colours and motion (eval/vision_judge.py),
    component vision_judge."""

    image_size: int = 16
    frames: int = 8
    width: int = 32  # channels of the first conv; doubled at each of the two poolings
    video_every: int = 2  # add a video batch every n steps; 0 = images only (no direction head)
    video_batch_size: int = 16
    image_copies: int = 2

    def validate(self, at: str) -> None:
        for name in ("image_size", "frames", "width", "video_batch_size", "image_copies"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "image_size", self.image_size, self.image_size >= 8, ">= 8")
        _check(at, "frames", self.frames, self.frames >= 2, ">= 2 (motion needs two frames)")
        _check(at, "video_every", self.video_every, self.video_every >= 0, ">= 0 (0 = images only)")


@dataclass(frozen=True, kw_only=True)
class VisionMergerConfig:
    """Pre-training of the patch mergers (train/vision_merger.py), component vision_merger: which
    caption attributes the mean of a picture's tokens learns to predict, per kind (a kind with
    none is not pre-trained). Colours are left out by default: they are learned at once, while
    their heads are trained the digit and motion heads stay at chance, and the backbone reads
    colours from the merged tokens without help. Images are left out by default: pre-training on
    the digit gave no better image QA after joint training (docs/benchmarks.md, "Merger
    pre-training")."""

    image_attributes: tuple[str, ...] = ()
    video_attributes: tuple[str, ...] = ("direction", "speed")

    def validate(self, at: str) -> None:
        image, video = ("digit", "fg", "bg"), ("digit", "fg", "bg", "direction", "speed")
        _check(
            at,
            "image_attributes",
            self.image_attributes,
            all(a in image for a in self.image_attributes),
            f"a subset of {image}",
        )
        _check(
            at,
            "video_attributes",
            self.video_attributes,
            all(a in video for a in self.video_attributes),
            f"a subset of {video}",
        )
        both = self.image_attributes + self.video_attributes
        _check(
            at, "image_attributes + video_attributes", both, len(both) > 0, "at least one attribute"
        )


@dataclass(frozen=True, kw_only=True)
class AudioCodecConfig:
    """Mel RVQ codec (tokenizers/audio.py), component audio_codec, trained on the built-in speech.

    16 kHz audio -> 100 Hz log-mel (tokenizers/mel.py) -> conv encoder -> frames at `frame_rate` ->
    `levels` residual codebooks of `codebook_size` codes; level 0 also feeds a character CTC head
    so that it carries the words. Mel is turned back into a waveform by Griffin-Lim."""

    frame_rate: float = 25.0  # codec frames per second: 12.5, 25 or 50 (100 Hz mel / 8, 4 or 2)
    levels: int = 4
    codebook_size: int = 256
    code_dim: int = 64
    channels: int = 128  # conv width of encoder and decoder
    res_blocks: int = 2  # residual conv blocks at the codec frame rate, in encoder and in decoder
    codebook_learning: str = "ema"  # ema (k-means-like running averages) | gradient (codebook loss)
    ema_decay: float = 0.99
    commit_weight: float = 0.25
    # A code whose running usage (EMA of assignments per step) falls below this is restarted at a
    # random residual of the current batch.
    dead_code_threshold: float = 0.05
    # share of steps that train with a random 1..levels prefix of levels
    quantizer_dropout: float = 0.5
    content_weight: float = 0.5  # character CTC loss on level-0 codes
    max_seconds: float = 1.6  # utterances are zero-padded (masked) to this length in training
    griffin_lim_iters: int = 32
    # a speech_judge run dir: also report its accuracy on reconstructions ("" = skip)
    judge: str = ""

    def validate(self, at: str) -> None:
        _check(
            at,
            "frame_rate",
            self.frame_rate,
            self.frame_rate in (12.5, 25.0, 50.0),
            "12.5, 25 or 50",
        )
        for name in ("levels", "codebook_size", "code_dim", "channels", "griffin_lim_iters"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(at, "res_blocks", self.res_blocks, self.res_blocks >= 0, ">= 0")
        _check(
            at,
            "codebook_learning",
            self.codebook_learning,
            self.codebook_learning in ("ema", "gradient"),
            "ema or gradient",
        )
        _check(at, "ema_decay", self.ema_decay, 0 < self.ema_decay < 1, "0 < decay < 1")
        for name in ("commit_weight", "dead_code_threshold", "content_weight"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 0, ">= 0")
        _check(
            at,
            "quantizer_dropout",
            self.quantizer_dropout,
            0 <= self.quantizer_dropout <= 1,
            "0..1",
        )
        frame_s = 1 / self.frame_rate
        frames = self.max_seconds / frame_s
        _check(
            at,
            "max_seconds",
            self.max_seconds,
            frames >= 1 and abs(frames - round(frames)) < 1e-6,
            f"a positive multiple of one codec frame ({frame_s:g} s)",
        )


@dataclass(frozen=True, kw_only=True)
class SpeechJudgeConfig:
    """Independent spoken-word classifier (eval/speech_judge.py), component speech_judge."""

    channels: int = 64  # conv width over log-mel frames (25 Hz after the first conv)
    # input window; shorter speech is placed at a random offset in training
    max_seconds: float = 1.2
    dropout: float = 0.1

    def validate(self, at: str) -> None:
        _check(at, "channels", self.channels, self.channels >= 1, ">= 1")
        _check(at, "max_seconds", self.max_seconds, 0.2 <= self.max_seconds <= 10, "0.2..10")
        _check(at, "dropout", self.dropout, 0 <= self.dropout < 1, "0 <= p < 1")
