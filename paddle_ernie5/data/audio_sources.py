"""Speech sources of the pretraining mixture: `asr` (speech -> transcript) and `tts`
(transcript -> speech).

The built-in speech (data/speech.py) is encoded once with the frozen codec (model.audio.codec_dir)
and cached in data.cache_dir under the codec's weight hash and the speech set's key, so training
reads codes and never runs the codec (the cache carries its format and checksum, io/cache.py: a
damaged or stale one is re-encoded with one line on stderr). The `train` split holds only the
training voices; `val` (and every held-out number) only the held-out voices.

Documents (one position per codec frame; t = h = w = index from the document start):

    asr:  <bos> <boa> f_1 ... f_F <eoa> w_1 ... w_n <eos>
          text loss on w_1 .. <eos> (from <eoa> on)
    tts:  <bos> w_1 ... w_n <boa> f_1 ... f_F <eoa>
          audio loss: at <boa> the codes of f_1, at f_j those of f_{j+1}, at f_F level 0 = <eoa>

Batch extras (model/audio.py): audio_codes, audio_targets, audio_target_mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..io import cache
from .mixture import MixtureContext, register_source
from .multimodal import Segment, text_segment
from .packing import IGNORE
from .speech import SpeechSpec, load_speech

AUDIO_TYPE = 3  # model/embeddings.MODALITY_IDS["audio"] (config.MODALITIES order)
_FORMAT = 2  # the cache file format (io/cache.py); bump when the cached layout changes
SPEECH_SPEC = SpeechSpec()  # the built-in speech set the sources and the evaluation read


@dataclass
class CodedSpeech:
    codes: list[np.ndarray]  # [F_i, levels of the codec] int64 per utterance
    texts: list[str]
    word_ids: np.ndarray  # [N] index into speech.WORDS, -1 for phrases
    voices: list[str]

    def __len__(self) -> int:
        return len(self.codes)


def encode_speech(codec, waves: list[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
    """Codes [ceil(T_i / samples_per_frame), L] of each wave. Batches of similar length are padded
    with silence (the codec trained on zero-padded windows); each utterance keeps its own frames."""
    order = np.argsort([len(w) for w in waves], kind="stable")
    out: list[np.ndarray | None] = [None] * len(waves)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        n = max(len(waves[i]) for i in idx)
        pad = np.zeros((len(idx), n), np.float32)
        for j, i in enumerate(idx):
            pad[j, : len(waves[i])] = waves[i]
        codes = codec.encode(pad)
        for j, i in enumerate(idx):
            out[i] = codes[j, : codec.frames_for(len(waves[i]))]
    return out


def load_coded_speech(
    cache_dir: str, codec_dir: str, spec: SpeechSpec | None = None, log=print
) -> tuple[CodedSpeech, CodedSpeech]:
    """(training voices, held-out voices) as codec codes, encoded on first use and cached.
    `spec`: the speech set (default SPEECH_SPEC)."""
    spec = spec or SPEECH_SPEC
    from ..tokenizers.audio import codec_fingerprint, open_codec

    path = os.path.join(
        cache_dir, f"speech_codes_{codec_fingerprint(codec_dir)}_{spec.key()}_v{_FORMAT}.npz"
    )
    z = cache.load(path, _FORMAT, "coded speech")
    if z is None:
        codec = open_codec(codec_dir)
        train, held = load_speech(cache_dir, spec)
        log(
            f"encoding {len(train) + len(held)} utterances with the codec in {codec_dir} "
            "(once; cached)"
        )
        z = {}
        for name, sset in (("train", train), ("eval", held)):
            codes = encode_speech(codec, sset.waves)
            z.update(
                {
                    f"{name}_codes": np.concatenate(codes),
                    f"{name}_offsets": np.concatenate([[0], np.cumsum([len(c) for c in codes])]),
                    f"{name}_text": np.array(sset.texts),
                    f"{name}_word": sset.word_ids,
                    f"{name}_voice": np.array(sset.voices),
                }
            )
        cache.save(path, z, _FORMAT)
    sets = []
    for name in ("train", "eval"):
        off, codes = z[f"{name}_offsets"], z[f"{name}_codes"]
        sets.append(
            CodedSpeech(
                [codes[off[i] : off[i + 1]] for i in range(len(off) - 1)],
                [str(t) for t in z[f"{name}_text"]],
                z[f"{name}_word"],
                [str(v) for v in z[f"{name}_voice"]],
            )
        )
    return sets[0], sets[1]


def coded_speech(ctx: MixtureContext) -> CodedSpeech:
    """The split of the context (train: training voices; otherwise held-out voices), shared by
    the sources."""
    if "coded_speech" not in ctx.cache:
        ctx.cache["coded_speech"] = load_coded_speech(
            ctx.cfg.data.cache_dir, ctx.cfg.model.audio.codec_dir
        )
    train, held = ctx.cache["coded_speech"]
    return train if ctx.split == "train" else held


def _audio_extras(n: int, levels: int) -> dict[str, np.ndarray]:
    return {
        "audio_codes": np.zeros((n, levels), np.int64),
        "audio_targets": np.zeros((n, levels), np.int64),
        "audio_target_mask": np.zeros((n, levels), np.float32),
    }


def _quiet(ids, start: int) -> Segment:
    """Text positions without any target."""
    seg = text_segment(ids, start)
    seg.labels = np.full(len(ids), IGNORE, np.int64)
    return seg


def audio_segment(codes_FL: np.ndarray, start: int) -> Segment:
    """Causal audio frames (blocks = -1), t = h = w = index; no targets (the sources add them)."""
    f, levels = codes_FL.shape
    pos = np.arange(start, start + f, dtype=np.int64)
    extras = _audio_extras(f, levels)
    extras["audio_codes"] = codes_FL.astype(np.int64)
    return Segment(
        np.full(f, AUDIO_TYPE, np.int64),
        np.stack([pos, pos, pos]),
        np.zeros(f, np.int64),
        np.full(f, IGNORE, np.int64),
        None,
        extras,
    )


class _SpeechSource:
    def __init__(self, ctx: MixtureContext):
        a = ctx.cfg.model.audio
        self.data = coded_speech(ctx)
        self.levels, self.end = a.levels, a.codebook_size
        self.boa, self.eoa = ctx.special_id("<boa>"), ctx.special_id("<eoa>")
        self.bos, self.eos = ctx.tokenizer.bos_id, ctx.tokenizer.eos_id
        self.words = [ctx.text(t) for t in self.data.texts]

    def __len__(self) -> int:
        return len(self.data)

    def codes(self, index: int) -> np.ndarray:
        return self.data.codes[index][:, : self.levels]


def asr_question(tokenizer, prompt: str) -> list[int]:
    """Text ids between <eoa> and the transcript (none when `prompt` is empty)."""
    return list(tokenizer.encode(prompt)) if prompt else []


def asr_answer_text(text: str, prompt: str) -> str:
    """The transcript as it follows the prompt: after a question it starts with a space, like a
    QA answer."""
    return " " + text if prompt else text


class ASRSource(_SpeechSource):
    """<bos> <boa> frames <eoa> [asr_prompt] transcript <eos>; the transcript and <eos> are the
    targets."""

    def __init__(self, ctx: MixtureContext):
        super().__init__(ctx)
        prompt = ctx.cfg.model.audio.asr_prompt
        self.question = asr_question(ctx.tokenizer, prompt)
        self.answers = [ctx.text(asr_answer_text(t, prompt)) for t in self.data.texts]

    def longest(self) -> int:
        """<bos> <boa> frames <eoa> question transcript <eos> of the longest utterance."""
        return max(
            (
                4 + len(c) + len(self.question) + len(a)
                for c, a in zip(self.data.codes, self.answers)
            ),
            default=0,
        )

    def document(self, index: int, rng: np.random.Generator) -> list[Segment]:
        codes = self.codes(index)
        head = _quiet([self.bos, self.boa], 0)
        head.extras = _audio_extras(2, self.levels)
        audio = audio_segment(codes, 2)
        answer = self.answers[index] + [self.eos]
        tail = text_segment([self.eoa] + self.question + answer, 2 + len(codes))
        tail.labels[: len(self.question)] = IGNORE  # <eoa> and the question predict the question
        tail.extras = _audio_extras(len(tail), self.levels)
        return [head, audio, tail]


class TTSSource(_SpeechSource):
    def longest(self) -> int:
        """<bos> words <boa> frames <eoa> of the longest utterance."""
        return max((3 + len(w) + len(c) for w, c in zip(self.words, self.data.codes)), default=0)

    def document(self, index: int, rng: np.random.Generator) -> list[Segment]:
        codes = self.codes(index)
        prompt = [self.bos] + self.words[index] + [self.boa]
        head = _quiet(prompt, 0)
        head.extras = _audio_extras(len(prompt), self.levels)
        head.extras["audio_targets"][-1] = codes[0]  # <boa> predicts the first frame
        head.extras["audio_target_mask"][-1] = 1.0
        audio = audio_segment(codes, len(prompt))
        audio.extras["audio_targets"][:-1] = codes[1:]
        audio.extras["audio_target_mask"][:-1] = 1.0
        audio.extras["audio_targets"][-1, 0] = self.end  # the last frame predicts <eoa>
        audio.extras["audio_target_mask"][-1, 0] = 1.0
        tail = _quiet([self.eoa], len(prompt) + len(codes))
        tail.extras = _audio_extras(1, self.levels)
        return [head, audio, tail]


register_source("asr")(ASRSource)
register_source("tts")(TTSSource)
