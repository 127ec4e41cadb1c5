"""`ernie5 generate`: one command, one mode per kind of output, chosen from the arguments.

    PNG(s):      ernie5 generate --checkpoint RUN --prompt "a red 3 on a blue background"
    GIF(s):      ernie5 generate --checkpoint RUN --video --prompt "a red 3 moving left slowly ..."
    answer:      ernie5 generate --checkpoint RUN --image 3.png --question "What digit is this?"
    WAV:         ernie5 generate --checkpoint RUN --speech "seven" --out seven.wav
    transcript:  ernie5 generate --checkpoint RUN --transcribe seven.wav
    text:        ernie5 generate --checkpoint RUN --text-file doc.txt --kv-budget 0.5

Text continuation takes the `generate` settings (config/generate.py) from the run's recipe
(`generate.kv_budget: 0.5`), each overridden by its flag: --kv-budget, the share of the prompt's
keys each layer keeps after the prefill, --kv-policy nacl|recent|random and NACL's
--nacl-proxy-tokens, --nacl-random-share and --nacl-seed; a bad value is one ConfigError naming
the field.

A mode is (name, adds its arguments, wants(args), run(args, cfg, model) -> lines to print, and
check(args): its inputs, before the model loads); the first mode that wants the arguments runs.
Adding a modality means appending a mode to MODES.

Inputs are checked before any work, each problem one clear error (exit 2): a missing, empty or
undecodable --image or --transcribe file, an --out that is a file where a folder is needed, text
longer than MAX_TEXT_CHARS, and a prompt that does not fit the model's context (model.max_seq_len)
together with what is generated after it. --truncate-prompt keeps the start that fits instead, with
a warning.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# --prompt, --question and --speech longer than this are refused before they are tokenised (a
# caption or question of a few lines is what the models are trained on).
MAX_TEXT_CHARS = 4000
ANSWER_TOKENS = 8  # longest answer to --question
TRANSCRIPT_TOKENS = 12  # longest transcript of --transcribe


def _no_check(args) -> None:
    return None


@dataclass(frozen=True)
class Mode:
    name: str
    add_arguments: Callable
    wants: Callable
    run: Callable
    check: Callable = _no_check


def _check_text(args, flag: str, text: str) -> str:
    """`text` within MAX_TEXT_CHARS (cut there with --truncate-prompt, else refused)."""
    if len(text) <= MAX_TEXT_CHARS:
        return text
    if not args.truncate_prompt:
        raise _user_error(
            f"{flag} has {len(text):,} characters; the limit is {MAX_TEXT_CHARS:,} (a caption or "
            "question of a few lines); shorten it or pass --truncate-prompt to keep its start"
        )
    _warn(f"{flag} cut from {len(text):,} to its first {MAX_TEXT_CHARS:,} characters")
    return text[:MAX_TEXT_CHARS]


def _warn(msg: str) -> None:
    import sys

    print(f"ernie5: warning: {msg}", file=sys.stderr)


def _fit_prompt(args, cfg, tokenizer, flag: str, text: str, after: int, after_what: str) -> str:
    """`text` whose tokens fit the context (model.max_seq_len) beside `after` other positions (the
    delimiters and what is generated); the start that fits with --truncate-prompt, else refused."""
    context = cfg.model.max_seq_len
    budget = context - after
    ids = tokenizer.encode(text)
    if len(ids) <= budget:
        return text
    if budget <= 0:
        raise _user_error(
            f"this model's context (model.max_seq_len={context}) is too short for {after_what} "
            f"({after} positions) and any {flag}"
        )
    if not args.truncate_prompt:
        raise _user_error(
            f"{flag} is {len(ids):,} tokens; beside {after_what} ({after} positions) the model's "
            f"context (model.max_seq_len={context}) leaves room for {budget}; shorten it or pass "
            f"--truncate-prompt to keep its first {budget} tokens"
        )
    keep = budget
    while keep > 0 and len(tokenizer.encode(tokenizer.decode(ids[:keep]))) > budget:
        keep -= 1
    _warn(
        f"{flag} cut from {len(ids):,} to its first {keep} tokens to fit the context "
        f"(model.max_seq_len={context})"
    )
    return tokenizer.decode(ids[:keep])


def _check_out_dir(path: str) -> None:
    from .io.paths import check_output_dir

    check_output_dir(path, "--out")


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


def _check_visual(args) -> None:
    args.prompt = [_check_text(args, "--prompt", p) for p in args.prompt]
    _check_out_dir(args.out)


def _visual_tokens(v, kind: str) -> int:
    """Positions of one generated image or clip (every scale of every frame)."""
    if kind == "image":
        return sum(s * s for s in v.scales)
    return v.video_frames * sum(s * s for s in v.scales[: v.video_scales])


def _text_tokenizer(cfg):
    from .data.text import get_text_tokenizer

    return get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.split_seed, cfg.data.val_fraction
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
    text_tok = _text_tokenizer(cfg)
    after = 3 + _visual_tokens(cfg.model.vision, kind)  # <bos> <boi> ... <eoi>
    what = f"the {kind} ({after - 3} tokens) and its delimiters"
    captions = [_fit_prompt(args, cfg, text_tok, "--prompt", p, after, what) for p in args.prompt]
    prompts = [p for p in captions for _ in range(args.num_samples)]
    frames = generate_images(
        model,
        cfg,
        text_tok,
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


def _read_image(path: str):
    """The picture at `path` as RGB; one clear error for a missing, empty or undecodable file."""
    from PIL import Image

    from .io.paths import check_input_file

    check_input_file(path, "--image")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a file it cannot decode
        raise _user_error(
            f"--image {path!r} is not an image this program can decode ({type(e).__name__}: "
            f"{str(e)[:120]}); give a PNG, JPEG, GIF or BMP file"
        ) from None


def _check_answer(args) -> None:
    args.question = _check_text(args, "--question", args.question)
    args.image_rgb = _read_image(args.image)


def _run_answer(args, cfg, model) -> list[str]:
    from PIL import Image

    from .data.vision_sources import load_visual_tokenizer
    from .eval.vision_eval import answer_question

    if "image" not in cfg.model.modalities:
        raise _user_error("this model has no image modality")
    tok = load_visual_tokenizer(cfg.model.vision)
    text_tok = _text_tokenizer(cfg)
    places = cfg.model.vision.merged_places("image")
    after = 4 + places + ANSWER_TOKENS  # <bos> <boi> [image] <eoi> question answer <eos>
    what = f"the image ({places} merged tokens), its delimiters and a {ANSWER_TOKENS}-token answer"
    question = _fit_prompt(args, cfg, text_tok, "--question", args.question, after, what)
    size = tok.cfg.image_size
    img = args.image_rgb if hasattr(args, "image_rgb") else _read_image(args.image)
    img = img.resize((size, size), Image.BILINEAR)
    pixels = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
    answer = answer_question(model, cfg, text_tok, tok, pixels, question, max_tokens=ANSWER_TOKENS)
    return [f"{question} {answer}"]


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


def _check_speech(args) -> None:
    args.speech = _check_text(args, "--speech", args.speech)
    single = args.out.endswith(".wav") and args.num_samples == 1
    _check_out_dir(os.path.dirname(os.path.abspath(args.out)) if single else args.out)
    if single and os.path.isdir(args.out):
        raise _user_error(f"--out {args.out!r} is a directory; give a file name or a folder")


def _run_speech(args, cfg, model) -> list[str]:
    from .eval.audio import synthesise, write_wav

    codec = _audio_model(cfg)
    n = args.num_samples
    text_tok = _text_tokenizer(cfg)
    frames = cfg.model.audio.max_frames
    after = 3 + frames  # <bos> text <boa> frames <eoa>
    what = f"the speech (up to model.audio.max_frames={frames} frames) and its delimiters"
    text = _fit_prompt(args, cfg, text_tok, "--speech", args.speech, after, what)
    waves = synthesise(
        model,
        text_tok,
        cfg,
        [text],
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
        lines.append(f"{path}\t{len(wave) / codec.sample_rate:.2f} s\t{text}")
    return lines


def _check_wav(path: str) -> None:
    """A 16-bit PCM WAV with samples; one clear error otherwise."""
    import wave as wavlib

    from .io.paths import check_input_file

    check_input_file(path, "--transcribe")
    fix = "give a 16-bit PCM WAV (e.g. ffmpeg -i in.mp3 -ac 1 -ar 16000 -sample_fmt s16 out.wav)"
    try:
        with wavlib.open(path) as f:
            width, rate, frames = f.getsampwidth(), f.getframerate(), f.getnframes()
            channels = f.getnchannels()
            data = f.readframes(frames)
    except Exception as e:  # noqa: BLE001 - wave raises wave.Error, EOFError, struct.error ...
        raise _user_error(
            f"--transcribe {path!r} is not a WAV file this program can read ({type(e).__name__}: "
            f"{str(e)[:120]}); {fix}"
        ) from None
    if width != 2:
        raise _user_error(f"--transcribe {path!r} holds {8 * width}-bit samples; {fix}")
    if rate <= 0 or channels <= 0:
        raise _user_error(f"--transcribe {path!r} has a broken header ({rate} Hz); {fix}")
    if len(data) < width * channels:
        raise _user_error(f"--transcribe {path!r} holds no audio samples; give a recording")


def _check_transcribe(args) -> None:
    _check_wav(args.transcribe)


def _run_transcribe(args, cfg, model) -> list[str]:
    from .data.audio_sources import asr_question, encode_speech
    from .data.speech import PEAK
    from .eval.audio import read_wav, transcribe

    codec = _audio_model(cfg)
    try:
        wave = read_wav(args.transcribe, codec.sample_rate)
    except ValueError as e:  # a data chunk cut mid-sample
        raise _user_error(f"--transcribe {args.transcribe!r} is damaged ({e})") from None
    wave = PEAK * wave / max(float(np.abs(wave).max()), 1e-8)  # training speech is peak-normalised
    text_tok = _text_tokenizer(cfg)
    context = cfg.model.max_seq_len
    after = 3 + len(asr_question(text_tok, cfg.model.audio.asr_prompt)) + TRANSCRIPT_TOKENS
    budget = context - after  # <bos> <boa> frames <eoa> [question] transcript
    frames = codec.frames_for(len(wave))
    if frames > budget:
        seconds = budget * codec.samples_per_frame / codec.sample_rate
        if budget <= 0 or not args.truncate_prompt:
            raise _user_error(
                f"--transcribe {args.transcribe!r} is {len(wave) / codec.sample_rate:.1f} s "
                f"({frames} codec frames); the model's context (model.max_seq_len={context}) "
                f"holds {max(budget, 0)} frames ({seconds:.1f} s) beside the transcript; cut the "
                "recording or pass --truncate-prompt to transcribe its start"
            )
        _warn(f"--transcribe: only the first {seconds:.1f} s fit the context; the rest is cut")
        wave = wave[: budget * codec.samples_per_frame]
    codes = encode_speech(codec, [wave])[0]
    return [transcribe(model, text_tok, cfg, [codes], max_tokens=TRANSCRIPT_TOKENS)[0]]


# `generate` settings given as flags (None = the GenerateConfig default).
_KV_FLAGS = {
    "kv_budget": "--kv-budget",
    "kv_policy": "--kv-policy",
    "nacl_proxy_tokens": "--nacl-proxy-tokens",
    "nacl_random_share": "--nacl-random-share",
    "nacl_seed": "--nacl-seed",
}


def _text_arguments(p) -> None:
    g = p.add_argument_group("text continuation and its KV cache")
    g.add_argument("--text", default=None, help="text to continue (a document and a question)")
    g.add_argument("--text-file", default=None, help="a UTF-8 file holding the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=32, help="longest continuation")
    g.add_argument(
        "--kv-budget",
        type=float,
        default=None,
        help="share of the prompt's keys each layer and kv head keeps after the prefill, in "
        "(0, 1] (default 1: keep all)",
    )
    g.add_argument("--kv-policy", default=None, help="nacl (default), recent or random")
    g.add_argument("--nacl-proxy-tokens", type=int, default=None, help="NACL: proxy tokens")
    g.add_argument(
        "--nacl-random-share", type=float, default=None, help="NACL: share of random keep"
    )
    g.add_argument("--nacl-seed", type=int, default=None, help="seed of the random keep")


def generate_settings(args, base=None):
    """The `generate` section: `base` (the run's recipe section; None = the defaults) with the
    flags given over it (validated: one ConfigError naming the field)."""
    import dataclasses

    from .config.generate import GenerateConfig

    given = {f: getattr(args, f) for f in _KV_FLAGS if getattr(args, f, None) is not None}
    return dataclasses.replace(base or GenerateConfig(), **given).validate()


def _check_text_mode(args) -> None:
    from .io.paths import check_input_file

    if (args.text is None) == (args.text_file is None):
        raise _user_error("give the text to continue as --text or --text-file, not both")
    if args.text_file is not None:
        check_input_file(args.text_file, "--text-file")
        try:
            with open(args.text_file, encoding="utf-8") as f:
                args.text = f.read()
        except UnicodeDecodeError as e:
            raise _user_error(f"--text-file {args.text_file!r} is not UTF-8 text ({e})") from None
    if args.max_new_tokens < 1:
        raise _user_error(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    generate_settings(args)  # bad flags fail before the model loads


def _run_text(args, cfg, model) -> list[str]:
    from .model.generation import generate

    tok = _text_tokenizer(cfg)
    after = 1 + args.max_new_tokens  # <bos> text continuation
    what = f"<bos> and the continuation (--max-new-tokens={args.max_new_tokens})"
    flag = "--text" if args.text_file is None else "--text-file"
    text = _fit_prompt(args, cfg, tok, flag, args.text, after, what)
    prompt = np.asarray([[tok.bos_id, *tok.encode(text)]], dtype=np.int64)
    sample = generate(
        model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        stop_id=tok.eos_id,
        seed=args.seed,
        eviction=generate_settings(args, getattr(cfg, "generate", None)),
    )
    ids = sample.tokens[0, : sample.lengths[0]].tolist()
    return [tok.decode([i for i in ids if i != tok.eos_id])]


def _user_error(msg: str):
    from .errors import UserError

    return UserError(msg)


MODES: list[Mode] = [
    Mode(
        "speech",
        _audio_arguments,
        lambda a: getattr(a, "speech", None) is not None,
        _run_speech,
        _check_speech,
    ),
    Mode(
        "transcribe",
        lambda p: None,
        lambda a: getattr(a, "transcribe", None) is not None,
        _run_transcribe,
        _check_transcribe,
    ),
    Mode(
        "answer",
        _vision_arguments,
        lambda a: getattr(a, "image", None) is not None,
        _run_answer,
        _check_answer,
    ),
    Mode(
        "text",
        _text_arguments,
        lambda a: a.text is not None or a.text_file is not None,
        _run_text,
        _check_text_mode,
    ),
    Mode("visual", lambda p: None, lambda a: bool(a.prompt), _run_visual, _check_visual),
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
    p.add_argument(
        "--truncate-prompt",
        action="store_true",
        help="keep the start of a --prompt/--question/--speech (or --transcribe recording) that "
        f"is longer than {MAX_TEXT_CHARS} characters or than the model's context leaves room "
        "for, with a warning (default: refuse it)",
    )
    for mode in MODES:
        mode.add_arguments(p)


def run(args, log=print) -> int:
    from .eval.runner import load_model

    mode = next((m for m in MODES if m.wants(args)), None)
    if mode is None:
        raise _user_error(
            "nothing to generate: give --prompt (with --video for a clip), --image and "
            "--question, --speech TEXT, --transcribe FILE.wav or --text/--text-file"
        )
    flags = [flag for f, flag in _KV_FLAGS.items() if getattr(args, f, None) is not None]
    if flags and mode.name != "text":
        raise _user_error(
            f"{', '.join(flags)} set(s) the KV cache of text continuation; use it with --text or "
            "--text-file"
        )
    mode.check(args)  # inputs first: a bad file or text fails before the model loads
    cfg, model = load_model(args.checkpoint, log=lambda *_: None)
    for line in mode.run(args, cfg, model):
        log(line)
    return 0
