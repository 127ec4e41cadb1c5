"""Built-in speech: spoken digits, colours and short phrases synthesised with espeak-ng.

Every utterance is one text spoken by one voice at one pitch and speed. Voices are split: the codec
and the judge train on `train_voices`, and everything reported as "held-out" is spoken by
`eval_voices` that no model saw. Audio is 16 kHz mono float32, silence trimmed to `MARGIN_S` on each
side and peak-normalised to `PEAK` (espeak's level differs between voices; loudness carries no
content here).

    load_speech(cache_dir, spec) -> (train: SpeechSet, eval: SpeechSet)  (DEBUG_SPEC: a tiny set)
    SpeechSet: .waves (list of float32 arrays), .texts, .word_ids (index into WORDS, -1 for
               phrases), .voices, .pitches, .speeds;
               .padded(n) -> ([N, n] float32, lengths [N])

The set is built once per `SpeechSpec` (pitch and speed are drawn from a generator seeded by the
spec, so equal specs give identical audio on one espeak-ng build) and cached as one npz in
cache_dir with its format and checksum (io/cache.py), written to a temporary file and renamed; an
empty, damaged or stale cache is reported in one line on stderr and rebuilt. Building the default
set (~1.6K utterances) takes ~10 s; espeak-ng is only needed when nothing is cached.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..io import cache
from ..tokenizers.mel import SAMPLE_RATE

MARGIN_S = 0.04  # silence kept before and after the trimmed speech
PEAK = 0.9
_FORMAT = 2  # cache file format (io/cache.py); bump when the building procedure changes

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "white", "orange")
WORDS = DIGITS + COLOURS  # single-word utterances; a word id is an index into this tuple
PHRASES = (
    "red seven",
    "blue two",
    "green five",
    "count to three",
    "the sky is blue",
    "hello there",
    "good morning",
    "thank you",
)

INSTALL_HINT = (
    "install it with `apt-get install -y espeak-ng` (as root; prefix sudo otherwise) or run "
    "`make espeak`"
)


class EspeakMissing(UserError, RuntimeError):
    """espeak-ng is needed to build the speech set and is not on PATH."""


@dataclass(frozen=True, kw_only=True)
class SpeechSpec:
    """What to synthesise. Voices are espeak-ng voice names, optionally `+variant` (m1..m7,
    f1..f5)."""

    texts: tuple[str, ...] = WORDS + PHRASES
    train_voices: tuple[str, ...] = (
        "en-us",
        "en-gb",
        "en-gb-scotland",
        "en-029",
        "en-us+f2",
        "en-gb+f3",
        "en-gb-x-rp+m3",
        "en-us-nyc+m1",
        "en-gb+f5",
    )
    eval_voices: tuple[str, ...] = ("en-gb-x-gbcwmd", "en-us+f4", "en-gb-x-gbclan+m5")
    train_renditions: int = 6  # (pitch, speed) draws per train voice and text
    eval_renditions: int = 2
    pitch_range: tuple[int, int] = (30, 70)  # espeak -p, 0..99
    speed_range: tuple[int, int] = (130, 190)  # espeak -s, words per minute
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(
            dict(dataclasses.asdict(self), format=_FORMAT, sr=SAMPLE_RATE), sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# A few words and voices (~70 utterances, about a second to build): what the tests use.
DEBUG_SPEC = SpeechSpec(
    texts=("one", "two", "three", "red", "blue", "green", "red seven"),
    train_voices=("en-us", "en-gb+f3", "en-gb-scotland"),
    eval_voices=("en-us+f4",),
    train_renditions=3,
    eval_renditions=3,
)


@dataclass
class SpeechSet:
    waves: list[np.ndarray]
    texts: list[str]
    word_ids: np.ndarray  # [N] int64, -1 for phrases
    voices: list[str]
    pitches: np.ndarray
    speeds: np.ndarray

    def __len__(self) -> int:
        return len(self.waves)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(w) for w in self.waves], dtype=np.int64)

    def select(self, idx) -> SpeechSet:
        idx = (
            np.flatnonzero(idx)
            if np.asarray(idx).dtype == bool
            else np.asarray(idx, dtype=np.int64)
        )
        return SpeechSet(
            [self.waves[i] for i in idx],
            [self.texts[i] for i in idx],
            self.word_ids[idx],
            [self.voices[i] for i in idx],
            self.pitches[idx],
            self.speeds[idx],
        )

    def words_only(self) -> SpeechSet:
        return self.select(self.word_ids >= 0)

    def padded(self, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Waves zero-padded (or cut) to `length` samples (default: the longest):
        [N, T], lengths [N]."""
        length = length or int(self.lengths.max())
        out = np.zeros((len(self), length), np.float32)
        for i, w in enumerate(self.waves):
            out[i, : min(len(w), length)] = w[:length]
        return out, np.minimum(self.lengths, length)


def require_espeak() -> str:
    """Path of espeak-ng, or EspeakMissing with the exact install command."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakMissing(
            f"espeak-ng is not installed (needed once to synthesise the built-in speech "
            f"set); {INSTALL_HINT}"
        )
    return path


def synthesise(
    text: str, voice: str, pitch: int, speed: int, espeak: str | None = None
) -> np.ndarray:
    """One utterance as 16 kHz float32: espeak-ng -> resample -> trim silence -> peak-normalise."""
    from scipy.signal import resample_poly

    espeak = espeak or require_espeak()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.wav")
        proc = subprocess.run(
            [espeak, "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", out, text],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not os.path.exists(out):
            raise RuntimeError(
                f"espeak-ng failed for voice {voice!r} and text {text!r}: "
                f"{(proc.stderr or proc.stdout).strip()} (list voices: espeak-ng --voices=en)"
            )
        with wave.open(out) as f:
            if f.getnchannels() != 1 or f.getsampwidth() != 2:
                raise RuntimeError(f"espeak-ng wrote an unexpected WAV format for voice {voice!r}")
            rate = f.getframerate()
            x = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float64) / 32768.0
    g = np.gcd(SAMPLE_RATE, rate)
    x = resample_poly(x, SAMPLE_RATE // g, rate // g)
    loud = np.flatnonzero(np.abs(x) > 0.01 * np.abs(x).max())
    margin = int(MARGIN_S * SAMPLE_RATE)
    x = x[max(0, loud[0] - margin) : loud[-1] + margin + 1]
    return (PEAK * x / np.abs(x).max()).astype(np.float32)


def _plan(spec: SpeechSpec) -> list[tuple[str, str, int, int, str]]:
    """(text, voice, pitch, speed, split) for every utterance, in a fixed order."""
    rng = np.random.default_rng(spec.seed)
    plan = []
    for split, voices, reps in (
        ("train", spec.train_voices, spec.train_renditions),
        ("eval", spec.eval_voices, spec.eval_renditions),
    ):
        for voice in voices:
            for text in spec.texts:
                for _ in range(reps):
                    pitch = int(rng.integers(spec.pitch_range[0], spec.pitch_range[1] + 1))
                    speed = int(rng.integers(spec.speed_range[0], spec.speed_range[1] + 1))
                    plan.append((text, voice, pitch, speed, split))
    return plan


def _build(spec: SpeechSpec) -> dict[str, np.ndarray]:
    if set(spec.train_voices) & set(spec.eval_voices):
        shared = sorted(set(spec.train_voices) & set(spec.eval_voices))
        raise ValueError(f"train and eval voices overlap: {shared}")
    espeak = require_espeak()
    plan = _plan(spec)
    # espeak-ng is single-threaded and short-lived; a few processes at once keep both cores busy.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        waves = list(pool.map(lambda p: synthesise(p[0], p[1], p[2], p[3], espeak), plan))
    lengths = np.array([len(w) for w in waves], np.int64)
    return dict(
        audio=np.round(np.concatenate(waves) * 32767).astype(np.int16),
        offsets=np.concatenate([[0], np.cumsum(lengths)]),
        text=np.array([p[0] for p in plan]),
        voice=np.array([p[1] for p in plan]),
        pitch=np.array([p[2] for p in plan], np.int64),
        speed=np.array([p[3] for p in plan], np.int64),
        split=np.array([p[4] for p in plan]),
    )


def _to_sets(arrays: dict[str, np.ndarray]) -> tuple[SpeechSet, SpeechSet]:
    audio = arrays["audio"].astype(np.float32) / 32767
    off = arrays["offsets"]
    texts = [str(t) for t in arrays["text"]]
    word = {w: i for i, w in enumerate(WORDS)}
    full = SpeechSet(
        [audio[off[i] : off[i + 1]] for i in range(len(texts))],
        texts,
        np.array([word.get(t, -1) for t in texts], np.int64),
        [str(v) for v in arrays["voice"]],
        arrays["pitch"],
        arrays["speed"],
    )
    split = arrays["split"]
    return full.select(split == "train"), full.select(split == "eval")


def load_speech(cache_dir: str, spec: SpeechSpec = SpeechSpec()) -> tuple[SpeechSet, SpeechSet]:
    """(train-voice set, held-out-voice set), built with espeak-ng on first use and cached."""
    path = os.path.join(cache_dir, f"speech_{spec.key()}.npz")
    return _to_sets(cache.cached(path, _FORMAT, "speech set", lambda: _build(spec)))
