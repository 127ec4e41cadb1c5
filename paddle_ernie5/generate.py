"""`ernie5 generate`: one command, one mode per kind of output, chosen from the arguments.

    PNG(s):      ernie5 generate --checkpoint RUN --prompt "a red 3 on a blue background"
    GIF(s):      ernie5 generate --checkpoint RUN --video --prompt "a red 3 moving left slowly ..."
    answer:      ernie5 generate --checkpoint RUN --image 3.png --question "What digit is this?"
    WAV:         ernie5 generate --checkpoint RUN --speech "seven" --out seven.wav
    transcript:  ernie5 generate --checkpoint RUN --transcribe seven.wav

A mode is (name, adds its arguments, wants(args), run(args, cfg, model) -> lines to print); the
first mode that wants the arguments runs. Adding a modality means appending a mode to MODES.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Mode:
    name: str
    add_arguments: Callable
    wants: Callable
    run: Callable


def _vision_arguments(p) -> None:
    g = p.add_argument_group("images and video")
    g.add_argument(
        "--video", action="store_true", help="text -> video (GIF) instead of text -> image (PNG)"
    )
    g.add_argument("--image", default=None, help="an image file to ask --question about")
    g.add_argument("--question", default="What digit is this?", help="question about --image")
    g.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: model.vision.cfg_scale)",
    )
    g.add_argument("--upscale", type=int, default=8, help="pixels per generated pixel in the files")


def _text_tokenizer(cfg):
    from .data.text import get_text_tokenizer

    return get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.train.seed, cfg.data.val_fraction
    )


def _frames_to_uint8(x: np.ndarray, upscale: int) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H * u, W * u, 3] uint8 (nearest)."""
    img = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return img.repeat(upscale, axis=0).repeat(upscale, axis=1)


def _run_visual(args, cfg, model) -> list[str]:
    from PIL import Image

    from .data.vision_sources import load_visual_tokenizer
    from .eval.vision_eval import generate_images

    kind = "video" if args.video else "image"
    if kind not in cfg.model.modalities:
        raise _user_error(
            f"this model has no {kind} modality (model.modalities={list(cfg.model.modalities)})"
        )
    tok = load_visual_tokenizer(cfg.model.vision)
    prompts = [p for p in args.prompt for _ in range(args.num_samples)]
    frames = generate_images(
        model,
        cfg,
        _text_tokenizer(cfg),
        tok,
        prompts,
        temperature=args.temperature,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        kind=kind,
    )
    os.makedirs(args.out, exist_ok=True)
    lines = []
    for i, (prompt, clip) in enumerate(zip(prompts, frames)):
        stem = os.path.join(args.out, f"{kind}_{i:03d}")
        pics = [Image.fromarray(_frames_to_uint8(f, args.upscale)) for f in clip]
        if kind == "image":
            path = stem + ".png"
            pics[0].save(path)
        else:
            path = stem + ".gif"
            pics[0].save(path, save_all=True, append_images=pics[1:], duration=250, loop=0)
        lines.append(f"{path}\t{prompt}")
    return lines


def _run_answer(args, cfg, model) -> list[str]:
    from PIL import Image

    from .data.vision_sources import load_visual_tokenizer
    from .eval.vision_eval import answer_question

    if "image" not in cfg.model.modalities:
        raise _user_error("this model has no image modality")
    tok = load_visual_tokenizer(cfg.model.vision)
    size = tok.cfg.image_size
    img = Image.open(args.image).convert("RGB").resize((size, size), Image.BILINEAR)
    pixels = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    answer = answer_question(model, cfg, _text_tokenizer(cfg), tok, pixels, args.question)
    return [f"{args.question} {answer}"]


def _audio_arguments(p) -> None:
    g = p.add_argument_group("speech")
    g.add_argument(
        "--speech",
        default=None,
        help="text -> speech: write it as a WAV (--out file.wav or folder)",
    )
    g.add_argument("--transcribe", default=None, help="a 16-bit PCM WAV file to transcribe")
    g.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="speech sampling: keep the k most likely codes (0 = all)",
    )


def _audio_model(cfg):
    from .tokenizers.audio import load_codec

    if "audio" not in cfg.model.modalities:
        raise _user_error(
            f"this model has no audio modality (model.modalities={list(cfg.model.modalities)})"
        )
    return load_codec(cfg.model.audio)


def _run_speech(args, cfg, model) -> list[str]:
    from .eval.audio import synthesise, write_wav

    codec = _audio_model(cfg)
    n = args.num_samples
    waves = synthesise(
        model,
        _text_tokenizer(cfg),
        cfg,
        [args.speech],
        codec,
        samples=n,
        seed=args.seed,
        temperature=args.temperature,
        top_k=args.top_k,
    )
    single = args.out.endswith(".wav") and n == 1
    lines = []
    for i, wave in enumerate(waves):
        path = args.out if single else os.path.join(args.out, f"speech_{i:03d}.wav")
        write_wav(path, wave, codec.sample_rate)
        lines.append(f"{path}\t{len(wave) / codec.sample_rate:.2f} s\t{args.speech}")
    return lines


def _run_transcribe(args, cfg, model) -> list[str]:
    from .data.audio_sources import encode_speech
    from .data.speech import PEAK
    from .eval.audio import read_wav, transcribe

    codec = _audio_model(cfg)
    if not os.path.isfile(args.transcribe):
        raise _user_error(f"--transcribe {args.transcribe!r}: no such file")
    wave = read_wav(args.transcribe, codec.sample_rate)
    wave = PEAK * wave / max(float(np.abs(wave).max()), 1e-8)  # training speech is peak-normalised
    codes = encode_speech(codec, [wave])[0]
    return [transcribe(model, _text_tokenizer(cfg), cfg, [codes])[0]]


def _user_error(msg: str):
    from .errors import UserError

    return UserError(msg)


MODES: list[Mode] = [
    Mode("speech", _audio_arguments, lambda a: getattr(a, "speech", None) is not None, _run_speech),
    Mode(
        "transcribe",
        lambda p: None,
        lambda a: getattr(a, "transcribe", None) is not None,
        _run_transcribe,
    ),
    Mode("answer", _vision_arguments, lambda a: getattr(a, "image", None) is not None, _run_answer),
    Mode("visual", lambda p: None, lambda a: bool(a.prompt), _run_visual),
]


def add_arguments(p) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="run, checkpoint or exported-model directory"
    )
    p.add_argument("--prompt", action="append", default=[], help="a caption; repeat for several")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="generated", help="output folder for files")
    for mode in MODES:
        mode.add_arguments(p)


def run(args, log=print) -> int:
    from .eval.runner import load_model

    mode = next((m for m in MODES if m.wants(args)), None)
    if mode is None:
        raise _user_error(
            "nothing to generate: give --prompt (with --video for a clip), --image and "
            "--question, --speech TEXT or --transcribe FILE.wav"
        )
    cfg, model = load_model(args.checkpoint, log=lambda *_: None)
    for line in mode.run(args, cfg, model):
        log(line)
    return 0
