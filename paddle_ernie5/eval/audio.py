"""Speech metrics of a model with audio, each beside its chance level.

ASR word accuracy: the held-out voices' single-word utterances (data/speech.py WORDS) go in as
codec frames (<bos> <boa> frames <eoa>, then model.audio.asr_prompt if set); the greedy transcript
counts when it is exactly the spoken word.
Chance: 1 / len(WORDS) (guessing one of the words).

TTS intelligibility: for every word, `tts_samples` speech samples are drawn depth-wise from
<bos> word <boa>, decoded by the codec (Griffin-Lim) and classified by the speech judge
(eval/speech_judge.py, trained on real speech only); the metric is its accuracy.
Chance: 1 / len(WORDS).
The judge's accuracy on the codec's own reconstructions of real speech (the ceiling for generated
speech) is in the codec's metrics.json.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ..data.speech import WORDS

TTS_TEMPERATURE = 0.8  # sampling of generated speech for evaluation and dashboards
TTS_TOP_K = 32


def speech_prompt(tokenizer, cfg, text: str) -> list[int]:
    """<bos> text <boa>: the TTS prompt."""
    from ..config import SPECIAL_TOKENS

    return (
        [tokenizer.bos_id]
        + list(tokenizer.encode(text))
        + [cfg.model.vocab_size + SPECIAL_TOKENS.index("<boa>")]
    )


def synthesise(
    model,
    tokenizer,
    cfg,
    texts: list[str],
    codec,
    *,
    samples: int = 1,
    seed: int = 0,
    temperature: float = TTS_TEMPERATURE,
    top_k: int = TTS_TOP_K,
) -> list[np.ndarray]:
    """16 kHz waves of `texts` (each `samples` times, text-major): depth-wise codes -> codec
    decode."""
    from ..model.audio import sample_speech

    prompts = [speech_prompt(tokenizer, cfg, t) for t in texts for _ in range(samples)]
    codes = sample_speech(
        model,
        prompts,
        max_frames=cfg.model.audio.max_frames,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    return [codec_decode(codec, c) for c in codes]


def codec_decode(codec, codes_FL: np.ndarray) -> np.ndarray:
    """Wave of F * samples_per_frame samples (empty speech: no samples)."""
    if len(codes_FL) == 0:
        return np.zeros(0, np.float32)
    return codec.decode(codes_FL[None], levels=codes_FL.shape[1])[0]


def transcribe(
    model, tokenizer, cfg, codes_list: list[np.ndarray], max_tokens: int = 12
) -> list[str]:
    """Greedy transcripts of codec frames: <bos> <boa> frames <eoa> [asr_prompt] -> text up to
    <eos>. Utterances of one frame count decode together."""
    from ..config import SPECIAL_TOKENS
    from ..data.audio_sources import asr_question
    from ..model.audio import AUDIO_TYPE
    from ..model.generation import generate

    boa = cfg.model.vocab_size + SPECIAL_TOKENS.index("<boa>")
    eoa = cfg.model.vocab_size + SPECIAL_TOKENS.index("<eoa>")
    levels = cfg.model.audio.levels
    question = asr_question(tokenizer, cfg.model.audio.asr_prompt)
    out = [""] * len(codes_list)
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(codes_list):
        by_len.setdefault(len(c), []).append(i)
    for f, rows in sorted(by_len.items()):
        n, p = len(rows), f + 3 + len(question)
        ids = np.zeros((n, p), np.int64)
        ids[:, 0], ids[:, 1], ids[:, 2 + f] = tokenizer.bos_id, boa, eoa
        ids[:, 3 + f :] = question
        types = np.zeros((n, p), np.int64)
        types[:, 2 : 2 + f] = AUDIO_TYPE
        codes = np.zeros((n, p, levels), np.int64)
        for j, i in enumerate(rows):
            codes[j, 2 : 2 + f] = codes_list[i][:, :levels]
        sample = generate(
            model,
            ids,
            max_tokens,
            temperature=0.0,
            stop_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            prompt_extras={"token_types": types, "audio_codes": codes},
        )
        for j, i in enumerate(rows):
            toks = [
                t for t in sample.tokens[j, : sample.lengths[j]].tolist() if t != tokenizer.eos_id
            ]
            out[i] = tokenizer.decode(toks).strip()
    return out


class AudioEval:
    """Held-out coded speech, the codec and (if trained) the judge, loaded once."""

    def __init__(self, cfg, tokenizer, log=print):
        from ..data.audio_sources import load_coded_speech
        from ..tokenizers.audio import load_codec

        self.cfg, self.tokenizer = cfg, tokenizer
        _, held = load_coded_speech(cfg.data.cache_dir, cfg.model.audio.codec_dir, log=log)
        keep = held.word_ids >= 0
        self.codes = [c for c, k in zip(held.codes, keep) if k]
        self.words = [WORDS[w] for w in held.word_ids[keep]]
        self.codec = load_codec(cfg.model.audio)
        self.judge = None
        path = cfg.model.audio.judge
        if path:
            from .speech_judge import SpeechJudge

            try:
                self.judge = SpeechJudge.load(path)
            except FileNotFoundError as e:
                log(f"warning: {e}; TTS intelligibility is not reported")

    def asr(self, model) -> dict:
        said = transcribe(model, self.tokenizer, self.cfg, self.codes)
        return {
            "audio/asr_word_acc": float(np.mean([s == w for s, w in zip(said, self.words)])),
            "audio/asr_chance": 1.0 / len(WORDS),
            "audio/asr_utterances": len(said),
        }

    def tts(self, model, samples: int = 2, seed: int = 0) -> dict:
        if self.judge is None:
            return {}
        waves = synthesise(
            model, self.tokenizer, self.cfg, list(WORDS), self.codec, samples=samples, seed=seed
        )
        targets = [w for w in WORDS for _ in range(samples)]
        lengths = [len(w) / self.codec.sample_rate for w in waves]
        return {
            "audio/tts_judge_acc": self.judge.score(waves, targets),
            "audio/tts_chance": 1.0 / len(WORDS),
            "audio/tts_samples": len(waves),
            "audio/tts_mean_seconds": float(np.mean(lengths)),
        }

    def metrics(self, model) -> dict:
        return {**self.asr(model), **self.tts(model)}


def audio_metrics(cfg, model, tokenizer, log=print) -> dict:
    """ASR word accuracy and TTS intelligibility of `model` (empty when it has no audio)."""
    if "audio" not in cfg.model.modalities:
        return {}
    return AudioEval(cfg, tokenizer, log).metrics(model)


def report_rows(m: dict) -> str:
    """Markdown rows for the evaluation table (metric | value | baseline)."""
    rows = ""
    if "audio/asr_word_acc" in m:
        rows += (
            f"| ASR word accuracy (held-out voices, {m['audio/asr_utterances']} words) | "
            f"{m['audio/asr_word_acc']:.3f} | chance {m['audio/asr_chance']:.3f} |\n"
        )
    if "audio/tts_judge_acc" in m:
        rows += (
            f"| TTS intelligibility (judge accuracy, {m['audio/tts_samples']} samples) | "
            f"{m['audio/tts_judge_acc']:.3f} | chance {m['audio/tts_chance']:.3f} |\n"
        )
    return rows


def log_speech_samples(model, cfg, tokenizer, logger, step: int, texts=("seven", "blue")) -> None:
    """Generated speech for the dashboards (VisualDL audio tag samples/speech)."""
    from ..tokenizers.audio import load_codec

    try:
        codec = load_codec(cfg.model.audio)
    except FileNotFoundError as e:
        print(f"warning: {e}; no speech samples logged", file=sys.stderr)
        return
    for text, wave in zip(texts, synthesise(model, tokenizer, cfg, list(texts), codec, seed=step)):
        if len(wave):
            logger.audio(step, f"samples/speech/{text}", wave, codec.sample_rate)


def write_wav(path: str, wave: np.ndarray, sample_rate: int = 16000) -> None:
    """16-bit mono WAV."""
    import wave as wavlib

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pcm = (np.clip(np.asarray(wave, np.float32), -1, 1) * 32767).astype(np.int16)
    with wavlib.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def read_wav(path: str, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 at `sample_rate` from a 16-bit PCM WAV (channels averaged, resampled)."""
    import wave as wavlib

    from scipy.signal import resample_poly

    with wavlib.open(path) as f:
        if f.getsampwidth() != 2:
            raise ValueError(
                f"{path}: only 16-bit PCM WAV is read (got {8 * f.getsampwidth()}-bit)"
            )
        rate, channels = f.getframerate(), f.getnchannels()
        x = np.frombuffer(f.readframes(f.getnframes()), np.int16).astype(np.float32) / 32768.0
    x = x.reshape(-1, channels).mean(1)
    if rate != sample_rate:
        g = np.gcd(rate, sample_rate)
        x = resample_poly(x, sample_rate // g, rate // g).astype(np.float32)
    return x
