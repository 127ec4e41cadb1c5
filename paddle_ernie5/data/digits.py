"""Built-in vision data: coloured handwritten digits and moving-digit videos, with captions and Q&A.

Source: scikit-learn's `load_digits()` (1797 grey 8x8 digits, shipped with the package; nothing is
downloaded). Each digit is upscaled (bilinear) to `size` x `size`, and its ink is painted in one
palette colour over a background of another: pixel = ink * fg + (1 - ink) * bg.

    images  [N, 3, H, W]     float32 in [0, 1]   (an image is a one-frame video)
    videos  [N, T, 3, H, W]  float32 in [0, 1]   T = 8 frames by default
    labels  digit 0-9, fg / bg colour index into COLOURS, and for videos direction index into
            DIRECTIONS and speed in SPEEDS (pixels per frame)

Colours are the text corpus' colour words (data/text.py), so captions and answers use words the
text tokenizer already knows. Only pairs far apart in RGB are used (`COLOUR_PAIRS`, 48 of the 56
ordered pairs): red on orange or yellow on white, for example, are left out because the digit is
hard to see.

Videos: a smaller copy of the digit (`video_digit_size`, 5/8 of the frame by default) moves in a
straight line at 1 or 2 pixels per frame. Motion wraps around the frame edges (a torus), so the
digit is always in view, the direction never changes inside a clip and any start position is
possible; a bouncing digit would make "direction" ambiguous.

Split: a source sample (sklearn index) is held out when blake2b(index) falls below
`heldout_fraction`, so every image and video made from one handwritten sample sits on the same
side, whatever the seed. Colours, directions and speeds are drawn from a numpy Generator seeded per
(seed, source index, copy), so the data set does not depend on build order.

Built once per parameter set and cached in `cache_dir` as uint8 npz with its format and checksum
(io/cache.py); an empty, damaged or stale cache file is reported in one line on stderr and rebuilt.

Entry points:
    digit_images(split, size=16, cache_dir=..., copies=2) -> DigitSet  (split: "train" | "heldout")
    digit_videos(split, size=16, frames=8, cache_dir=...)  -> DigitSet
    image_caption(digit, fg, bg), video_caption(...), image_questions(...), video_questions(...)
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ..io import cache
from .text import COLOURS, DIRECTIONS

# RGB in [0, 1], in the order of COLOURS.
PALETTE = np.array(
    [
        (0.90, 0.10, 0.10),  # red
        (0.10, 0.70, 0.15),  # green
        (0.15, 0.25, 0.95),  # blue
        (0.95, 0.90, 0.10),  # yellow
        (0.10, 0.90, 0.90),  # cyan
        (0.85, 0.15, 0.85),  # magenta
        (0.97, 0.97, 0.97),  # white
        (0.98, 0.55, 0.05),  # orange
    ],
    dtype=np.float32,
)
MIN_PAIR_DISTANCE = 0.7  # Euclidean RGB distance below which fg on bg is too hard to read
# Far apart in RGB but both very light: hard to read for a person.
_LOW_CONTRAST = {frozenset(("yellow", "white"))}
COLOUR_PAIRS = tuple(
    (f, b)
    for f in range(len(COLOURS))
    for b in range(len(COLOURS))
    if f != b
    and float(np.linalg.norm(PALETTE[f] - PALETTE[b])) >= MIN_PAIR_DISTANCE
    and frozenset((COLOURS[f], COLOURS[b])) not in _LOW_CONTRAST
)
SPEEDS = (1, 2)  # pixels per frame
PACES = ("slowly", "quickly")  # the words for SPEEDS in captions and answers
# (dy, dx) per pixel of speed, in the order of DIRECTIONS (left, right, up, down).
_STEPS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
CACHE_VERSION = 2  # the cache file format (io/cache.py); bump when the build changes
NUM_SOURCES = 1797  # len(load_digits().images)


@dataclass(frozen=True)
class DigitSet:
    """Pixels plus per-sample labels. `pixels` is [N, 3, H, W] (images) or [N, T, 3, H, W] (videos).

    labels: name -> int64 [N]; always digit, fg, bg; videos add direction and speed.
    source: int64 [N] index of the handwritten sample in sklearn's load_digits()."""

    pixels: np.ndarray
    labels: dict
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.source)

    @property
    def is_video(self) -> bool:
        return self.pixels.ndim == 5

    def caption(self, i: int) -> str:
        l = {k: int(v[i]) for k, v in self.labels.items()}
        if self.is_video:
            return video_caption(l["digit"], l["fg"], l["bg"], l["direction"], l["speed"])
        return image_caption(l["digit"], l["fg"], l["bg"])

    def questions(self, i: int) -> list[tuple[str, str]]:
        l = {k: int(v[i]) for k, v in self.labels.items()}
        if self.is_video:
            return video_questions(l["digit"], l["fg"], l["bg"], l["direction"], l["speed"])
        return image_questions(l["digit"], l["fg"], l["bg"])

    def subset(self, idx) -> DigitSet:
        return DigitSet(
            self.pixels[idx], {k: v[idx] for k, v in self.labels.items()}, self.source[idx]
        )


# --------------------------------------------------------------------------------------------------
# Text


def _an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def image_caption(digit: int, fg: int, bg: int) -> str:
    """'a red 3 on a blue background'"""
    f, b = COLOURS[fg], COLOURS[bg]
    return f"{_an(f)} {f} {digit} on {_an(b)} {b} background"


def video_caption(digit: int, fg: int, bg: int, direction: int, speed: int) -> str:
    """'a red 3 moving left slowly on a blue background' (speed 1 = slowly, 2 = quickly)"""
    f, b = COLOURS[fg], COLOURS[bg]
    return (
        f"{_an(f)} {f} {digit} moving {DIRECTIONS[direction]} {pace_word(speed)} "
        f"on {_an(b)} {b} background"
    )


def pace_word(speed: int) -> str:
    """'slowly' for SPEEDS[0] (1 pixel per frame), 'quickly' for SPEEDS[1]."""
    if int(speed) not in SPEEDS:
        raise ValueError(
            f"clip speed {speed} has no word: the digit clips move at {SPEEDS} pixels per frame "
            f"({', '.join(PACES)}); a label outside them means the clip set was not built here"
        )
    return PACES[SPEEDS.index(int(speed))]


def image_questions(digit: int, fg: int, bg: int) -> list[tuple[str, str]]:
    return [
        ("What digit is this?", str(digit)),
        ("What colour is the digit?", COLOURS[fg]),
        ("What colour is the background?", COLOURS[bg]),
    ]


def video_questions(
    digit: int, fg: int, bg: int, direction: int, speed: int
) -> list[tuple[str, str]]:
    return image_questions(digit, fg, bg) + [
        ("Which way does the digit move?", DIRECTIONS[direction]),
        ("How fast does the digit move?", pace_word(speed)),
    ]


# --------------------------------------------------------------------------------------------------
# Public loaders


def is_heldout(source: np.ndarray | int, heldout_fraction: float = 0.15) -> np.ndarray:
    """Stable split by handwritten sample: blake2b(str(index)) read as a fraction of 2**64."""
    src = np.atleast_1d(np.asarray(source))
    out = np.array(
        [
            int.from_bytes(hashlib.blake2b(str(int(s)).encode(), digest_size=8).digest(), "little")
            / 2.0**64
            < heldout_fraction
            for s in src
        ]
    )
    return out if np.ndim(source) else bool(out[0])


def digit_images(
    split: str = "train",
    size: int = 16,
    cache_dir: str = ".cache/paddle_ernie5",
    copies: int = 2,
    seed: int = 0,
    heldout_fraction: float = 0.15,
) -> DigitSet:
    """Coloured digits; `copies` colourings of each handwritten sample."""
    params = dict(kind="images", size=size, copies=copies, seed=seed)
    return _split(
        _cached(cache_dir, params, lambda: _build_images(size, copies, seed)),
        split,
        heldout_fraction,
    )


def digit_videos(
    split: str = "train",
    size: int = 16,
    frames: int = 8,
    cache_dir: str = ".cache/paddle_ernie5",
    copies: int = 1,
    seed: int = 0,
    heldout_fraction: float = 0.15,
    video_digit_size: int = 0,
) -> DigitSet:
    """Moving digits; `video_digit_size` 0 = round(5/8 * size)."""
    digit_size = video_digit_size or round(size * 5 / 8)
    params = dict(
        kind="videos", size=size, frames=frames, copies=copies, seed=seed, digit=digit_size
    )
    return _split(
        _cached(cache_dir, params, lambda: _build_videos(size, frames, digit_size, copies, seed)),
        split,
        heldout_fraction,
    )


def _split(arrays: dict, split: str, heldout_fraction: float) -> DigitSet:
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split={split!r} is invalid: allowed train, heldout, all")
    keep = np.ones(len(arrays["source"]), bool)
    if split != "all":
        held = is_heldout(arrays["source"], heldout_fraction)
        keep = held if split == "heldout" else ~held
    labels = {
        k: arrays[k][keep].astype(np.int64)
        for k in ("digit", "fg", "bg", "direction", "speed")
        if k in arrays
    }
    return DigitSet(
        arrays["pixels"][keep].astype(np.float32) / 255.0,
        labels,
        arrays["source"][keep].astype(np.int64),
    )


# --------------------------------------------------------------------------------------------------
# Building and caching


def _cached(cache_dir: str, params: dict, build) -> dict:
    tag = "_".join(f"{k}{v}" for k, v in params.items())
    path = os.path.join(cache_dir, f"digits_v{CACHE_VERSION}_{tag}.npz")
    return cache.cached(path, CACHE_VERSION, "digits", build)


def _sources() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)  # ink in [0, 1]


def _resize(ink: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N, 8, 8] ink maps to [N, size, size] (pixel-centre aligned)."""
    n = ink.shape[-1]
    pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).astype(np.float32)
    rows = ink[:, lo, :] * (1 - w)[None, :, None] + ink[:, hi, :] * w[None, :, None]
    return rows[:, :, lo] * (1 - w)[None, None, :] + rows[:, :, hi] * w[None, None, :]


def _paint(ink: np.ndarray, fg: int, bg: int) -> np.ndarray:
    """ink [..., H, W] -> uint8 [..., 3, H, W]."""
    a = ink[..., None, :, :]
    rgb = a * PALETTE[fg][:, None, None] + (1 - a) * PALETTE[bg][:, None, None]
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def _rng(seed: int, source: int, copy: int, kind: int) -> np.random.Generator:
    return np.random.default_rng([seed, source, copy, kind])


def _build_images(size: int, copies: int, seed: int) -> dict:
    ink, target = _sources()
    ink = _resize(ink, size)
    out = {k: [] for k in ("pixels", "digit", "fg", "bg", "source")}
    for i in range(len(target)):
        for c in range(copies):
            fg, bg = COLOUR_PAIRS[_rng(seed, i, c, 0).integers(len(COLOUR_PAIRS))]
            for k, v in zip(out, (_paint(ink[i], fg, bg), target[i], fg, bg, i)):
                out[k].append(v)
    return {k: np.stack(v) if k == "pixels" else np.asarray(v, np.int16) for k, v in out.items()}


def _build_videos(size: int, frames: int, digit_size: int, copies: int, seed: int) -> dict:
    ink, target = _sources()
    ink = _resize(ink, digit_size)
    out = {k: [] for k in ("pixels", "digit", "fg", "bg", "direction", "speed", "source")}
    for i in range(len(target)):
        for c in range(copies):
            rng = _rng(seed, i, c, 1)
            fg, bg = COLOUR_PAIRS[rng.integers(len(COLOUR_PAIRS))]
            direction = int(rng.integers(len(DIRECTIONS)))
            speed = SPEEDS[rng.integers(len(SPEEDS))]
            y0, x0 = (int(v) for v in rng.integers(0, size, size=2))
            canvas = np.zeros((size, size), np.float32)
            canvas[:digit_size, :digit_size] = ink[i]
            dy, dx = _STEPS[DIRECTIONS[direction]]
            clip = np.stack(
                [
                    np.roll(canvas, (y0 + dy * speed * t, x0 + dx * speed * t), axis=(0, 1))
                    for t in range(frames)
                ]
            )
            for k, v in zip(out, (_paint(clip, fg, bg), target[i], fg, bg, direction, speed, i)):
                out[k].append(v)
    return {k: np.stack(v) if k == "pixels" else np.asarray(v, np.int16) for k, v in out.items()}
