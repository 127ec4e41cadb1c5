"""Bad input through the real `ernie5` command: every case of the hardening issue, each in its own
subprocess on temporary copies, then one table.

    python tools/fuzz_inputs.py                 # every case (about 15 minutes on 2 cores)
    python tools/fuzz_inputs.py --only cache    # the cases whose name contains "cache"

Columns: case | expected | got, where got is one of

    clear error, exit 2, nothing lost   exit code 2, stderr ends in one `ernie5: ...` line and is
                                        the only error line (no traceback), and every file the case
                                        protects is unchanged
    handled (what happened)             exit code 0 and the case's own check passed
    traceback                           a Python traceback on stderr
    silent                              exit code 0 but the case's check failed (nothing said, or
                                        the wrong thing done)
    exit N: ...                         anything else, with the last line of stderr

Cases: recipes (empty, comments only, not UTF-8, a directory); run and cache directories (a file,
below a file, read-only); each cache damaged (text tokenizer, digits, encoded vision set, speech
set, coded speech: rebuilt, and equal to a fresh build); `ernie5 generate` inputs (missing, empty or
undecodable --image / --transcribe, a 100K-character --question, a prompt longer than the context,
--truncate-prompt); an image document longer than data.seq_len; a full disk during a save; and the
checkpoint cases (a crafted pickle in meta.json, a stray step_* directory, a second run on the same
run directory, a refused resume, a damaged meta.json, a changed train.max_steps on resume, kill -9
during training then resume, compared bit-exactly with an uninterrupted run).

Setup (not a case) builds a fresh cache directory and a few small runs with `ernie5 train`, and a
randomly initialised tiny visual tokenizer and audio codec. The read-only run directory and the full
disk use a private mount namespace (`unshare -rm`: a read-only bind mount, a 4 MiB tmpfs); where
that is not allowed those rows say "not run".
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "recipes", "debug.yaml")
CLEAR = "clear error, exit 2, nothing lost"
QUIET = ["train.visualdl=false", "train.progress=false"]
VISION = [  # as tests/vision_support.py: settings that fit the tiny visual tokenizer
    "data.seq_len=112",
    "model.max_seq_len=112",
    "model.vision.bits=4",
    "model.vision.scales=[1,2,4]",
    "model.vision.video_scales=2",
    "model.vision.merger_width=16",
    "model.vision.head_hidden=32",
    "model.vision.judge=",
]
AUDIO = [
    "model.audio.levels=2",
    "model.audio.codebook_size=16",
    "model.audio.embed_dim=8",
    "model.audio.judge=",
]


def ernie5_command() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "ernie5")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "paddle_ernie5.cli"]


@dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def said(self) -> str:
        """Everything it printed (the trainers log progress to stdout, warnings to stderr)."""
        return self.out + self.err

    @property
    def lines(self) -> list[str]:
        return [l for l in self.err.splitlines() if l.strip()]


VERBOSE = False  # --verbose: the last stderr line of every command


def run(cmd: list, timeout: float = 1800) -> Result:
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )
    r = Result(done.returncode, done.stdout, done.stderr, time.perf_counter() - t0)
    if VERBOSE:
        print(f"    exit {r.rc}: {(r.lines or [''])[-1][:300]}", file=sys.stderr, flush=True)
    return r


def ernie5(*args, timeout: float = 1800) -> Result:
    return run([*ernie5_command(), *args], timeout)


def in_namespace(script: str) -> Result:
    """`script` (sh) in a private user and mount namespace: mounts there are seen by it alone."""
    return run(["unshare", "-rm", "sh", "-c", script])


def namespace_ok() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tempfile.mkdtemp()
    try:
        r = in_namespace(f"mount -t tmpfs -o size=1m tmpfs {probe}")
        return r.rc == 0
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def python(code: str, *args) -> None:
    subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, cwd=ROOT)


def snapshot(*paths) -> dict:
    """{file: sha256} of every file under `paths` (files or directories)."""
    out = {}
    for root in map(str, paths):
        files = (
            [root]
            if os.path.isfile(root)
            else [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
        )
        for path in files:
            with open(path, "rb") as f:
                out[path] = hashlib.sha256(f.read()).hexdigest()
    return out


def verdict(r: Result, intact: bool = True, handled: str | None = None) -> str:
    """What a run did, in the table's words. `handled`: the case's description of a correct
    outcome when it exited 0 (None when its check failed)."""
    if "Traceback (most recent call last)" in r.err:
        return "traceback"
    lines = r.lines
    if r.rc == 2:
        errors = [l for l in lines if l.startswith("ernie5:") and "warning" not in l]
        if lines and lines[-1].startswith("ernie5:") and len(errors) == 1:
            return CLEAR if intact else "clear error, exit 2, but files changed"
        return f"exit 2, unclear: {(lines or [''])[-1][:100]}"
    if r.rc == 0:
        return f"handled ({handled})" if handled else "silent"
    return f"exit {r.rc}: {(lines or [''])[-1][:100]}"


# ------------------------------------------------------------------------------------ setup


class Setup:
    """What the cases copy from, built on first need: a fresh cache directory, small runs, a tiny
    visual tokenizer and audio codec."""

    def __init__(self, work: str, log):
        self.work, self.log = work, log
        self.cache = os.path.join(work, "fresh_cache")
        self.done: set[str] = set()

    def need(self, what: str) -> None:
        if what not in self.done:
            self.done.add(what)
            t0 = time.perf_counter()
            getattr(self, f"_{what}")()
            self.log(f"  (setup {what}: {time.perf_counter() - t0:.0f} s)")

    def train(self, *args) -> None:
        r = ernie5("train", *args, f"data.cache_dir={self.cache}", *QUIET)
        if r.rc != 0:
            raise SystemExit(f"setup failed: ernie5 train {' '.join(args)}\n{r.err[-3000:]}")

    @staticmethod
    def text_args(run_dir: str, *more: str) -> list[str]:
        """A 4-step debug run with checkpoints at steps 2 and 4."""
        return [
            DEBUG,
            f"train.run_dir={run_dir}",
            "train.max_steps=4",
            "train.save_every=2",
            "train.keep_last=3",
            "train.eval_every=4",
            *QUIET,
            *more,
        ]

    def _text_run(self):
        self.text_run = os.path.join(self.work, "text_run")
        self.train(*self.text_args(self.text_run))

    def _tokenizer(self):
        self.tok_dir = os.path.join(self.work, "visual_tokenizer")
        python(
            "import sys, paddle\n"
            "from paddle_ernie5.config import VisualTokenizerConfig\n"
            "from paddle_ernie5.tokenizers.visual import VisualTokenizer\n"
            "paddle.seed(0)\n"
            "tok = VisualTokenizer(VisualTokenizerConfig(image_size=8, width=8, downsample=2,"
            " bits=4, scales=(1, 2, 4), frames=4))\n"
            "tok.eval()\n"
            "tok.save(sys.argv[1])\n",
            self.tok_dir,
        )

    def vision_args(self, run_dir: str, *more: str) -> list[str]:
        """A 1-step text + image debug run."""
        return [
            DEBUG,
            "model.modalities=[text,image,video]",
            f"model.vision.tokenizer_dir={self.tok_dir}",
            *VISION,
            "data.mixture.image_gen=1",
            "data.mixture.image_qa=1",
            f"train.run_dir={run_dir}",
            "train.max_steps=1",
            "train.warmup_steps=0",
            *QUIET,
            *more,
        ]

    def _vision_run(self):
        self.need("tokenizer")
        self.vision_run = os.path.join(self.work, "vision_run")
        self.train(*self.vision_args(self.vision_run))

    def _codec(self):
        self.codec_dir = os.path.join(self.work, "codec")
        python(
            "import sys, paddle\n"
            "from paddle_ernie5.config import AudioCodecConfig\n"
            "from paddle_ernie5.tokenizers.audio import AudioCodec\n"
            "paddle.seed(1)\n"
            "AudioCodec(AudioCodecConfig(levels=2, codebook_size=16, code_dim=8, channels=8,"
            " res_blocks=0)).save(sys.argv[1])\n",
            self.codec_dir,
        )

    def audio_args(self, run_dir: str, *more: str) -> list[str]:
        """A 1-step text + speech debug run."""
        return [
            DEBUG,
            "model.modalities=[text,audio]",
            f"model.audio.codec_dir={self.codec_dir}",
            *AUDIO,
            "data.mixture.asr=1",
            f"train.run_dir={run_dir}",
            "train.max_steps=1",
            "train.warmup_steps=0",
            *QUIET,
            *more,
        ]

    def _audio_run(self):
        self.need("codec")
        self.audio_run = os.path.join(self.work, "audio_run")
        self.train(*self.audio_args(self.audio_run))

    @staticmethod
    def judge_args(run_dir: str, *more: str) -> list[str]:
        """A 1-step speech judge (it reads the speech set itself)."""
        return [
            os.path.join(ROOT, "recipes", "speech_judge.yaml"),
            f"train.run_dir={run_dir}",
            "train.max_steps=1",
            "train.warmup_steps=0",
            "train.batch_size=8",
            "speech_judge.channels=8",
            *QUIET,
            *more,
        ]

    @staticmethod
    def vjudge_args(run_dir: str, *more: str) -> list[str]:
        """A 1-step vision judge (it reads the digits themselves)."""
        return [
            os.path.join(ROOT, "recipes", "vision_judge.yaml"),
            f"train.run_dir={run_dir}",
            "train.max_steps=1",
            "train.warmup_steps=0",
            "train.batch_size=8",
            "vision_judge.width=4",
            "vision_judge.video_batch_size=2",
            *QUIET,
            *more,
        ]

    def _vjudge_run(self):
        self.train(*self.vjudge_args(os.path.join(self.work, "vjudge_run")))

    def _judge_run(self):
        self.train(*self.judge_args(os.path.join(self.work, "judge_run")))

    def copy(self, src: str, dest: str) -> str:
        shutil.copytree(src, dest)
        return dest


# ------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    expected: str
    fn: Callable  # (setup, tmp) -> got


CASES: list[Case] = []


def case(name: str, expected: str = CLEAR):
    def wrap(fn):
        CASES.append(Case(name, expected, fn))
        return fn

    return wrap


def recipe_case(name: str, content: bytes) -> None:
    @case(f"recipe: {name}")
    def _(s, tmp):
        recipe = os.path.join(tmp, "recipe.yaml")
        with open(recipe, "wb") as f:
            f.write(content)
        run_dir = os.path.join(tmp, "run")
        r = ernie5("train", recipe, f"train.run_dir={run_dir}", f"data.cache_dir={tmp}/cache")
        return verdict(r, intact=not os.path.exists(run_dir))


recipe_case("empty file", b"")
recipe_case("only comments", b"# nothing set here\n\n")
recipe_case("not UTF-8", "name: caf\u00e9\nmodel: {hidden_size: 64}\n".encode("latin-1"))


@case("recipe: a directory")
def _(s, tmp):
    return verdict(ernie5("train", tmp, f"train.run_dir={tmp}/run"))


def _notes(tmp: str) -> str:
    path = os.path.join(tmp, "notes.txt")
    with open(path, "w") as f:
        f.write("my notes\n")
    return path


def path_case(name: str, setting: str, target: Callable[[str], str]) -> None:
    @case(name)
    def _(s, tmp):
        s.need("text_run")
        value = target(tmp)
        before = snapshot(os.path.join(tmp, "notes.txt"))
        args = s.text_args(os.path.join(tmp, "run"), f"data.cache_dir={s.cache}")
        r = ernie5("train", *args, f"{setting}={value}")
        return verdict(r, intact=snapshot(os.path.join(tmp, "notes.txt")) == before)


path_case("run_dir is a file", "train.run_dir", _notes)
path_case("run_dir below a file", "train.run_dir", lambda tmp: os.path.join(_notes(tmp), "run"))
path_case("cache_dir is a file", "data.cache_dir", _notes)


@case("run_dir read-only (an existing run)")
def _(s, tmp):
    if not namespace_ok():
        return "not run (no private mount namespace here)"
    s.need("text_run")
    run_dir = s.copy(s.text_run, os.path.join(tmp, "run"))
    before = snapshot(run_dir)
    args = [*ernie5_command(), "train", *s.text_args(run_dir, f"data.cache_dir={s.cache}")]
    r = in_namespace(
        f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir} && "
        f"exec {' '.join(args)}"
    )
    return verdict(r, intact=snapshot(run_dir) == before)


# ------------------------------------------------------------------------------------ caches


def cache_entries(path: str) -> dict:
    """The entries of a cache file; {} when it does not load."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - a damaged file is an answer here, not an error
        return {}


def corrupt(path: str, how: str) -> None:
    size = os.path.getsize(path)
    if how == "empty":
        open(path, "wb").close()
    elif how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif how == "flipped byte":
        with open(path, "r+b") as f:
            f.seek(size // 2)
            b = f.read(1)[0]
            f.seek(size // 2)
            f.write(bytes([b ^ 0x10]))
    elif how == "other version":  # whole and checksummed, but stamped by another format
        from paddle_ernie5.io import cache

        arrays = cache_entries(path)
        version = int(arrays.pop(cache.FORMAT_KEY))
        arrays.pop(cache.CHECKSUM_KEY)
        cache.save(path, arrays, version + 1)
    else:
        raise ValueError(how)


def cache_case(label: str, how: str, pick: Callable[[str], bool], kind: str) -> None:
    """Corrupt one file of a copy of the fresh cache and train on it: handled = exit 0, one stderr
    line naming the file and 'rebuilding it', and the rebuilt file holds what the fresh one holds
    (entries and content checksum)."""

    @case(f"cache: {label}, {how}", "handled")
    def _(s, tmp):
        s.need(f"{kind}_run")
        cache_dir = s.copy(s.cache, os.path.join(tmp, "cache"))
        names = [n for n in os.listdir(cache_dir) if n.endswith(".npz") and pick(n)]
        if len(names) != 1:
            return f"not run (cache files {names})"
        path = os.path.join(cache_dir, names[0])
        fresh = cache_entries(os.path.join(s.cache, names[0]))
        corrupt(path, how)
        args = getattr(s, f"{kind}_args")(os.path.join(tmp, "run"), f"data.cache_dir={cache_dir}")
        r = ernie5("train", *args, "train.max_steps=1", "train.warmup_steps=0")
        said = [l for l in r.lines if "rebuilding it" in l]
        again = cache_entries(path)
        same = set(again) == set(fresh) and all(np.array_equal(again[k], fresh[k]) for k in fresh)
        ok = len(said) == 1 and names[0] in said[0] and same
        return verdict(
            r, handled="rebuilt, one stderr line, equal to a fresh build" if ok else None
        )


def _is_speech_set(name: str) -> bool:
    return name.startswith("speech_") and not name.startswith("speech_codes_")


cache_case("text tokenizer", "empty", lambda n: n.startswith("text_bpe_"), "text")
cache_case("text tokenizer", "flipped byte", lambda n: n.startswith("text_bpe_"), "text")
cache_case(
    "digits",
    "truncated",
    lambda n: n.startswith("digits_") and "_kindimages_size16_" in n,
    "vjudge",
)
cache_case(
    "encoded vision set",
    "flipped byte",
    lambda n: n.startswith("vision_v") and n.endswith("_image_train.npz"),
    "vision",
)
cache_case("speech set", "empty", _is_speech_set, "judge")
cache_case("coded speech", "other version", lambda n: n.startswith("speech_codes_"), "audio")


# ------------------------------------------------------------------------------------ generate


def write_png(path: str) -> str:
    from PIL import Image

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[3:13, 6:10] = (230, 30, 30)
    Image.fromarray(rgb).save(path)
    return path


def write_wav(path: str, seconds: float) -> str:
    t = np.arange(int(16000 * seconds)) / 16000
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes((8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16).tobytes())
    return path


def file_case(name: str, flag: str, make: Callable[[str], str], kind: str) -> None:
    @case(name)
    def _(s, tmp):
        s.need(f"{kind}_run")
        path = make(tmp)
        before = snapshot(tmp)
        run_dir = getattr(s, f"{kind}_run")
        r = ernie5("generate", "--checkpoint", run_dir, flag, path, "--out", f"{tmp}/out")
        return verdict(r, intact=snapshot(tmp) == before)


def _text_file(tmp: str) -> str:
    path = os.path.join(tmp, "notes.txt")
    with open(path, "w") as f:
        f.write("not a picture, not a sound\n")
    return path


def _empty_file(name: str) -> Callable[[str], str]:
    def make(tmp):
        path = os.path.join(tmp, name)
        open(path, "wb").close()
        return path

    return make


file_case("generate --image: missing file", "--image", lambda t: f"{t}/missing.png", "vision")
file_case("generate --image: empty file", "--image", _empty_file("empty.png"), "vision")
file_case("generate --image: not an image", "--image", _text_file, "vision")
file_case("generate --transcribe: missing", "--transcribe", lambda t: f"{t}/no.wav", "audio")
file_case("generate --transcribe: empty file", "--transcribe", _empty_file("e.wav"), "audio")
file_case("generate --transcribe: not a WAV", "--transcribe", _text_file, "audio")


@case("generate --question of 100K characters")
def _(s, tmp):
    s.need("vision_run")
    png = write_png(f"{tmp}/three.png")
    question = "Which digit is it? " * 5264  # 100,016 characters
    r = ernie5("generate", "--checkpoint", s.vision_run, "--image", png, "--question", question)
    got = verdict(r)
    return got if r.seconds < 60 else f"{got} after {r.seconds:.0f} s"


@case("generate --prompt longer than the context")
def _(s, tmp):
    s.need("vision_run")
    caption = "a red 3 on a blue background, " * 100  # ~1,000 tokens; the context is 112
    r = ernie5("generate", "--checkpoint", s.vision_run, "--prompt", caption, "--out", tmp)
    return verdict(r, intact=os.listdir(tmp) == [])


@case("generate --question over the context, --truncate-prompt", "handled")
def _(s, tmp):
    s.need("vision_run")
    png = write_png(f"{tmp}/three.png")
    question = "Is it " + " or ".join(str(i) for i in range(300)) + "?"
    r = ernie5(
        "generate",
        "--checkpoint",
        s.vision_run,
        "--image",
        png,
        "--question",
        question,
        "--truncate-prompt",
    )
    warned = [l for l in r.lines if "--question cut from" in l]
    ok = len(warned) == 1 and r.out.startswith("Is it 0 or 1")
    return verdict(r, handled="cut to the context with one warning; answered" if ok else None)


@case("generate --transcribe longer than the context")
def _(s, tmp):
    s.need("audio_run")
    wav = write_wav(f"{tmp}/long.wav", 10.0)  # 250 codec frames; the context is 64
    return verdict(ernie5("generate", "--checkpoint", s.audio_run, "--transcribe", wav))


# ------------------------------------------------------------------------------------ config


@case("image document longer than data.seq_len")
def _(s, tmp):
    s.need("tokenizer")
    run_dir = os.path.join(tmp, "run")
    args = s.vision_args(run_dir, f"data.cache_dir={tmp}/cache")
    r = ernie5("train", *args, "data.seq_len=20")  # an image is 21 tokens at scales 1, 2, 4
    return verdict(r, intact=not os.path.exists(run_dir) and not os.path.exists(f"{tmp}/cache"))


# ------------------------------------------------------------------------------------ disk full


@case("disk full during a checkpoint save")
def _(s, tmp):
    """A fresh run on a 4 MiB file system: its step-2 checkpoint (2.9 MB) fits, step 4 does not.
    Then the run directory, copied to a roomy disk, resumes with the same command."""
    if not namespace_ok():
        return "not run (no private mount namespace here)"
    s.need("text_run")
    mnt, kept = os.path.join(tmp, "small_disk"), os.path.join(tmp, "kept")
    os.makedirs(mnt)
    run_dir = os.path.join(mnt, "run")
    args = [*ernie5_command(), "train", *s.text_args(run_dir, f"data.cache_dir={s.cache}")]
    r = in_namespace(
        f"mount -t tmpfs -o size=4m tmpfs {mnt} || exit 99; {' '.join(args)}; rc=$?; "
        f"cp -a {run_dir} {kept}; exit $rc"
    )
    ckpts = os.path.join(kept, "checkpoints")
    names = sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) if r.rc == 2 else []
    if names != ["step_00000002"]:
        return verdict(r, intact=False) + f" (checkpoints: {names})"
    from paddle_ernie5.io import checkpoint

    try:
        checkpoint.load(os.path.join(ckpts, names[0]))
        intact = True
    except Exception:  # noqa: BLE001 - any failure to load means the checkpoint was damaged
        intact = False
    got = verdict(r, intact=intact)
    if got == CLEAR and "No space left on device" not in r.lines[-1]:
        return f"clear error, but not about the full disk: {r.lines[-1][:100]}"
    resumed = ernie5("train", *s.text_args(kept, f"data.cache_dir={s.cache}"))
    if resumed.rc != 0 or "resumed from" not in resumed.said:
        return f"{got}; the resume then failed: {verdict(resumed)}"
    return got


# ------------------------------------------------------------------------------------ checkpoints


def _rewrite_meta(ckpt: str, change: Callable[[dict], None]) -> None:
    """Edit a checkpoint's meta.json and re-sign it in its manifest (when it has one), so only
    the content is wrong, not its checksum."""
    path = os.path.join(ckpt, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    change(meta)
    data = json.dumps(meta).encode()
    with open(path, "wb") as f:
        f.write(data)
    manifest = os.path.join(ckpt, "manifest.json")
    if os.path.exists(manifest):
        with open(manifest) as f:
            m = json.load(f)
        m["files"]["meta.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        with open(manifest, "w") as f:
            json.dump(m, f)


class _Touch:
    """What a crafted pickle does when loaded: create a file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@case("crafted pickle in a checkpoint's meta.json")
def _(s, tmp):
    s.need("text_run")
    run_dir = s.copy(s.text_run, os.path.join(tmp, "run"))
    marker = os.path.join(tmp, "pwned")
    payload = base64.b64encode(pickle.dumps(_Touch(marker))).decode()
    for step in ("step_00000002", "step_00000004"):
        _rewrite_meta(
            os.path.join(run_dir, "checkpoints", step),
            lambda m: m.update(paddle_rng=payload, numpy_rng=payload),
        )
    before = snapshot(run_dir)
    r = ernie5("train", *s.text_args(run_dir, f"data.cache_dir={s.cache}", "train.max_steps=6"))
    got = verdict(r, intact=snapshot(run_dir) == before)
    return got + (" -- AND THE PICKLE RAN" if os.path.exists(marker) else "")


@case("stray step_* directory", "handled")
def _(s, tmp):
    s.need("text_run")
    run_dir = s.copy(s.text_run, os.path.join(tmp, "run"))
    stray = os.path.join(run_dir, "checkpoints", "step_00000009")
    os.makedirs(stray)
    with open(os.path.join(stray, "notes.txt"), "w") as f:
        f.write("not a checkpoint\n")
    r = ernie5("train", *s.text_args(run_dir, f"data.cache_dir={s.cache}"))
    ok = (
        os.path.exists(os.path.join(stray, "notes.txt"))
        and "step_00000009" in r.said
        and "resumed from" in r.said
    )
    return verdict(r, handled="skipped with a warning, left in place; resumed" if ok else None)


@case("second run on the same run_dir")
def _(s, tmp):
    s.need("text_run")
    run_dir = os.path.join(tmp, "run")
    args = s.text_args(run_dir, f"data.cache_dir={s.cache}", "train.max_steps=16")
    first = subprocess.Popen(
        [*ernie5_command(), "train", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            if time.time() > deadline or first.poll() is not None:
                return "not run (the first run did not start)"
            time.sleep(0.2)
        r = ernie5("train", *args)
        got = verdict(r)
    finally:
        _, first_err = first.communicate(timeout=900)
    if first.returncode != 0:
        return f"{got}; the first run then failed: {(first_err.strip().splitlines() or [''])[-1]}"
    return got


@case("refused resume (another model shape)")
def _(s, tmp):
    s.need("text_run")
    run_dir = s.copy(s.text_run, os.path.join(tmp, "run"))
    before = snapshot(run_dir)
    args = s.text_args(run_dir, f"data.cache_dir={s.cache}", "model.moe.expert_hidden=16")
    r = ernie5("train", *args)
    return verdict(r, intact=snapshot(run_dir) == before)


@case("damaged meta.json", "handled")
def _(s, tmp):
    s.need("text_run")
    run_dir = s.copy(s.text_run, os.path.join(tmp, "run"))
    meta = os.path.join(run_dir, "checkpoints", "step_00000004", "meta.json")
    with open(meta, "r+b") as f:
        f.truncate(os.path.getsize(meta) // 2)
    r = ernie5("train", *s.text_args(run_dir, f"data.cache_dir={s.cache}"))
    ok = (
        "step_00000004 is damaged" in r.said
        and "resumed from" in r.said
        and "step_00000002" in r.said
    )
    return verdict(r, handled="fell back to step 2 with a warning; resumed" if ok else None)


@case("changed train.max_steps on resume")
def _(s, tmp):
    s.need("text_run")
    run_dir = s.copy(s.text_run, os.path.join(tmp, "run"))
    before = snapshot(run_dir)
    r = ernie5("train", *s.text_args(run_dir, f"data.cache_dir={s.cache}", "train.max_steps=6"))
    return verdict(r, intact=snapshot(run_dir) == before)


@case("kill -9 during training, then resume", "handled")
def _(s, tmp):
    """Straight: 8 steps. Killed: the same run killed (SIGKILL) after its step-4 checkpoint, then
    the same command again. Handled: it resumes and its step-8 checkpoint's weights and optimizer
    state are bit-identical to the straight run's."""
    s.need("text_run")
    common = ["train.max_steps=8", "train.threads=1", f"data.cache_dir={s.cache}"]
    straight, killed = os.path.join(tmp, "straight"), os.path.join(tmp, "killed")
    first = subprocess.Popen(
        [*ernie5_command(), "train", *s.text_args(killed, *common)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = os.path.join(killed, "checkpoints", "step_00000004", "meta.json")
    deadline = time.time() + 600
    while not os.path.exists(marker) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if first.poll() is not None:
        return "not run (the run ended before it could be killed)"
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    resumed = ernie5("train", *s.text_args(killed, *common))
    done = ernie5("train", *s.text_args(straight, *common))
    if done.rc != 0:
        return f"not run (the straight run failed: {verdict(done)})"
    last = os.path.join("checkpoints", "step_00000008")
    same = all(
        os.path.exists(os.path.join(killed, last, f))
        and snapshot(os.path.join(killed, last, f)).popitem()[1]
        == snapshot(os.path.join(straight, last, f)).popitem()[1]
        for f in ("model.safetensors", "optimizer.safetensors")
    )
    ok = same and "resumed from" in resumed.said
    return verdict(
        resumed, handled="resumed; step 8 bit-identical to an unkilled run" if ok else None
    )


# ------------------------------------------------------------------------------------ main


def matches(expected: str, got: str) -> bool:
    return got == expected or (expected == "handled" and got.startswith("handled ("))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run the cases whose name contains this")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--verbose", action="store_true", help="print each command's last stderr line")
    args = p.parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose
    sys.path.insert(0, ROOT)
    work = tempfile.mkdtemp(prefix="ernie5_fuzz_")
    setup = Setup(work, log=lambda m: print(m, file=sys.stderr, flush=True))
    rows = []
    try:
        for i, c in enumerate(x for x in CASES if args.only in x.name):
            tmp = os.path.join(work, f"case_{i:02d}")
            os.makedirs(tmp)
            t0 = time.perf_counter()
            try:
                got = c.fn(setup, tmp)
            except subprocess.TimeoutExpired:
                got = "hung (timed out)"
            print(
                f"{c.name}: {got} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True
            )
            rows.append((c.name, c.expected, got))
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("| case | expected | got |")
    print("|---|---|---|")
    for name, expected, got in rows:
        mark = "" if matches(expected, got) or got.startswith("not run") else " **(FAILS)**"
        print(f"| {name} | {expected} | {got}{mark} |")
    bad = [r for r in rows if not matches(r[1], r[2]) and not r[2].startswith("not run")]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} cases as expected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
