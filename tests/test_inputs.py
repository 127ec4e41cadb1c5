"""Bad input through `ernie5` gives one clear line and exit 2, before any work, and loses nothing:
empty or non-UTF-8 recipes, run and cache directories that are files or read-only, missing, empty
or undecodable --image and --transcribe files, text over the character limit, prompts longer than
the model's context (refused, or cut with --truncate-prompt), and a full disk during a checkpoint
save (the previous checkpoint stays whole and the run resumes from it)."""

import errno
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import paddle
import pytest
from support import RECIPES, ROOT
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5 import cli
from paddle_ernie5 import config as C
from paddle_ernie5.io import checkpoint

DEBUG = os.path.join(RECIPES, "debug.yaml")


@pytest.fixture
def ernie5(capsys, monkeypatch):
    """`ernie5 <args>` in this process: (exit code, stdout, stderr lines)."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MKL_NUM_THREADS", os.environ.get("MKL_NUM_THREADS", "1"))

    def run(*args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, [l for l in err.splitlines() if l.strip()]

    return run


def one_error(result, *needles):
    code, _, err = result
    assert code == cli.USAGE_ERROR, err
    assert len(err) == 1 and err[0].startswith("ernie5: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


# ---------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "is empty"),
        (b"# only a comment\n\n   \n", "is empty"),
        (
            b"model:\n  hidden_size: 64 \xff\xfe\n",
            "is not UTF-8 text (byte 0xff on line 2, offset 25)",
        ),
        ("name: caf\u00e9\n".encode("latin-1"), "is not UTF-8"),
    ],
)
def test_empty_and_non_utf8_recipes(ernie5, tmp_path, content, needle):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content)
    run_dir = tmp_path / "run"
    one_error(ernie5("train", recipe, f"train.run_dir={run_dir}"), needle, str(recipe))
    assert not run_dir.exists()
    one_error(ernie5("config", recipe), needle)


def test_a_recipe_that_is_a_directory(ernie5, tmp_path):
    one_error(ernie5("train", tmp_path), "is a directory")


# ---------------------------------------------------------------------------------- run dirs


def test_run_and_cache_dirs_that_are_files(ernie5, tmp_path, data_cache):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for setting in ("train.run_dir", "data.cache_dir"):
        for path, needle in ((a_file, "is a file, not a directory"), (a_file / "run", "is a file")):
            other = "data.cache_dir" if setting == "train.run_dir" else "train.run_dir"
            where = data_cache if other == "data.cache_dir" else tmp_path / "run"
            one_error(
                ernie5("train", DEBUG, f"{setting}={path}", f"{other}={where}"),
                setting,
                needle,
            )
    assert a_file.read_text() == "keep me"
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare for a read-only mount")
def test_a_read_only_run_dir_is_refused_before_any_work(tmp_path):
    """A run directory on a read-only file system (a private mount: root may write anywhere else)
    is refused before the config is even sized; its files are untouched."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("kept")
    script = (
        f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir} && "
        f"exec {sys.executable} -m paddle_ernie5.cli train {DEBUG} train.run_dir={run_dir}"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT
    )
    if "mount" in done.stderr and "ernie5" not in done.stderr:
        pytest.skip(f"no private read-only mount here: {done.stderr.strip()}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "train.run_dir" in lines[0] and "is not writable" in lines[0]
    assert (run_dir / "config.yaml").read_text() == "kept"


def test_check_output_dir_names_read_only_entries(tmp_path, monkeypatch):
    from paddle_ernie5.errors import UserError
    from paddle_ernie5.io.paths import check_output_dir

    (tmp_path / "checkpoints").mkdir()
    check_output_dir(str(tmp_path), "train.run_dir")
    check_output_dir(str(tmp_path / "new" / "deeper"), "train.run_dir")
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if str(p).endswith("checkpoints") else real(p, mode)
    )
    with pytest.raises(UserError, match="holds 'checkpoints', which is read-only"):
        check_output_dir(str(tmp_path), "train.run_dir")


# ---------------------------------------------------------------------------------- generate


def _png(path, size=12):
    from PIL import Image

    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[2:9, 4:7] = (230, 30, 30)
    Image.fromarray(rgb).save(path)
    return path


def _wav(path, seconds=0.5, width=2, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * (2 ** (8 * width - 1) - 1)).astype(
        {1: np.int8, 2: np.int16}[width]
    )
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes((x.astype(np.int16) + 128).astype(np.uint8).tobytes() if width == 1 else x)
    return path


def test_bad_image_and_wav_files_fail_before_the_model_loads(ernie5, tmp_path):
    nowhere = tmp_path / "no_run"  # the input is checked first: the missing run is never reached
    png = _png(tmp_path / "ok.png")
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[:40])
    text = tmp_path / "notes.txt"
    text.write_text("not a picture\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path, needle in (
        (tmp_path / "missing.png", "no such file"),
        (empty, "is empty (0 bytes)"),
        (text, "is not an image this program can decode"),
        (cut, "is not an image this program can decode"),
        (tmp_path, "is a directory"),
    ):
        one_error(ernie5("generate", "--checkpoint", nowhere, "--image", path), "--image", needle)
    wav8 = _wav(tmp_path / "8bit.wav", width=1)
    silent = _wav(tmp_path / "none.wav", seconds=0)
    for path, needle in (
        (tmp_path / "missing.wav", "no such file"),
        (empty, "is empty (0 bytes)"),
        (text, "is not a WAV file this program can read"),
        (png, "is not a WAV file this program can read"),
        (wav8, "holds 8-bit samples"),
        (silent, "holds no audio samples"),
    ):
        one_error(ernie5("generate", "--checkpoint", nowhere, "--transcribe", path), needle)
    # the checks pass a good file on to the model (here: the missing run)
    one_error(ernie5("generate", "--checkpoint", nowhere, "--image", png), "does not exist")


def test_text_over_the_character_limit(ernie5, tmp_path):
    from paddle_ernie5.generate import MAX_TEXT_CHARS

    nowhere = tmp_path / "no_run"
    png = _png(tmp_path / "ok.png")
    long = "What digit is this? " * 5000  # 100K characters
    one_error(
        ernie5("generate", "--checkpoint", nowhere, "--image", png, "--question", long),
        "--question has 100,000 characters",
        f"the limit is {MAX_TEXT_CHARS:,}",
        "--truncate-prompt",
    )
    one_error(ernie5("generate", "--checkpoint", nowhere, "--prompt", long), "--prompt has")
    one_error(ernie5("generate", "--checkpoint", nowhere, "--speech", long), "--speech has")
    code, _, err = ernie5(
        "generate", "--checkpoint", nowhere, "--image", png, "--question", long, "--truncate-prompt"
    )
    assert code == 2 and len(err) == 2, err
    assert "--question cut from 100,000" in err[0] and "does not exist" in err[1]


def test_out_that_is_a_file(ernie5, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    one_error(
        ernie5("generate", "--checkpoint", tmp_path, "--prompt", "a red 3", "--out", a_file),
        "--out",
        "is a file",
    )
    one_error(
        ernie5(
            "export",
            "--checkpoint",
            tmp_path,
            "--layers=1",
            "--experts=2",
            "--top-k=1",
            "--out",
            a_file,
        ),
        "--out",
        "is a file",
    )


def _save_model(cfg, folder):
    """A randomly initialised model saved as an exported model directory."""
    from safetensors.numpy import save_file

    from paddle_ernie5.model.model import Ernie5Model

    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    os.makedirs(folder, exist_ok=True)
    save_file(
        {k: np.ascontiguousarray(v.numpy()) for k, v in model.state_dict().items()},
        os.path.join(folder, "model.safetensors"),
    )
    C.save_config(cfg, os.path.join(folder, "config.yaml"))
    return folder


@pytest.fixture(scope="module")
def vision_model(data_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vision_model")
    cfg = vision_config(data_cache, str(folder / "run"), tiny_tokenizer(data_cache))
    return _save_model(cfg, str(folder / "model"))


def test_prompts_longer_than_the_context(ernie5, vision_model, tmp_path):
    png = _png(tmp_path / "ok.png")
    question = "Is it " + " or ".join(str(i) for i in range(300)) + "?"  # ~1,800 tokens
    one_error(
        ernie5("generate", "--checkpoint", vision_model, "--image", png, "--question", question),
        "--question is",
        "tokens",
        "model.max_seq_len=112",
        "--truncate-prompt",
    )
    code, out, err = ernie5(
        "generate",
        "--checkpoint",
        vision_model,
        "--image",
        png,
        "--question",
        question,
        "--truncate-prompt",
    )
    assert code == 0 and len(err) == 1 and "--question cut from" in err[0], err
    assert out.startswith("Is it 0 or 1 or")  # the start is kept
    caption = "a red 3 on a blue background, " * 40
    one_error(
        ernie5("generate", "--checkpoint", vision_model, "--prompt", caption, "--out", tmp_path),
        "--prompt is",
        "the image (21 tokens)",
    )
    code, out, err = ernie5(
        "generate",
        "--checkpoint",
        vision_model,
        "--prompt",
        caption,
        "--out",
        tmp_path / "pics",
        "--truncate-prompt",
    )
    assert code == 0 and "--prompt cut from" in err[0], err
    assert os.path.isfile(tmp_path / "pics" / "image_000.png")


def test_a_recording_longer_than_the_context(ernie5, data_cache, tmp_path):
    from paddle_ernie5.config import AudioCodecConfig
    from paddle_ernie5.tokenizers.audio import AudioCodec

    paddle.seed(1)
    codec_dir = str(tmp_path / "codec")
    AudioCodec(
        AudioCodecConfig(levels=2, codebook_size=16, code_dim=8, channels=8, res_blocks=0)
    ).save(codec_dir)
    cfg = C.load_config(
        DEBUG,
        [
            f"data.cache_dir={data_cache}",
            "model.modalities=[text,audio]",
            f"model.audio.codec_dir={codec_dir}",
            "model.audio.levels=2",
            "model.audio.codebook_size=16",
            "model.audio.embed_dim=8",
        ],
    )
    model = _save_model(cfg, str(tmp_path / "model"))
    long = _wav(tmp_path / "long.wav", seconds=10)  # 250 codec frames; the context is 64
    one_error(
        ernie5("generate", "--checkpoint", model, "--transcribe", long),
        "is 10.0 s (250 codec frames)",
        "model.max_seq_len=64",
        "--truncate-prompt",
    )
    code, out, err = ernie5(
        "generate", "--checkpoint", model, "--transcribe", long, "--truncate-prompt"
    )
    assert code == 0 and len(err) == 1 and "only the first" in err[0], err
    one_error(
        ernie5("generate", "--checkpoint", model, "--speech", "seven " * 30, "--out", tmp_path),
        "--speech is",
        "model.audio.max_frames=50",
    )


# ---------------------------------------------------------------------------------- full disk


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(ernie5, data_cache, tmp_path):
    """The writer of the second checkpoint fails half way with ENOSPC: one clear line, exit 2, the
    first checkpoint whole (it verifies), no half checkpoint among the complete ones; the same
    command then resumes from the first and finishes."""
    run_dir = tmp_path / "run"
    args = [
        "train",
        DEBUG,
        f"data.cache_dir={data_cache}",
        f"train.run_dir={run_dir}",
        "train.visualdl=false",
        "train.max_steps=2",
        "train.save_every=1",
    ]
    real = checkpoint.save_file
    calls = []

    def full_disk(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) <= 2:  # model and optimizer of the first checkpoint
            return real(tensors, path, *a, **k)
        with open(path, "wb") as f:
            f.write(b"\0" * 1000)  # what fitted before the device filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "save_file", full_disk)
        code, _, err = ernie5(*args)
    assert code == 2 and len(calls) == 3, (calls, err)
    assert not any("Traceback" in l for l in err)
    assert err[-1].startswith("ernie5: cannot write ") and "No space left on device" in err[-1]
    assert "run the same command again" in err[-1]
    root = str(run_dir / "checkpoints")
    (first,) = checkpoint.list_checkpoints(root)
    assert first.endswith("step_00000001")
    checkpoint.load(first)  # verifies every file's size and sha256
    code, _, err = ernie5(*args)
    assert code == 0, err
    assert checkpoint.list_checkpoints(root)[-1].endswith("step_00000002")


def test_disk_full_errors_of_any_writer_are_recognised():
    from paddle_ernie5.io import no_space

    assert no_space(OSError(errno.ENOSPC, "x")) == os.strerror(errno.ENOSPC)
    # safetensors' writer (Rust) reports the OS error in its message
    assert no_space(RuntimeError("I/O error: File too large (os error 27)")) == os.strerror(27)
    assert no_space(OSError(errno.ENOENT, "x")) is None
    assert no_space(ValueError("a bug")) is None
    try:
        raise ValueError("outer") from OSError(errno.EDQUOT, "quota")
    except ValueError as e:
        assert no_space(e) == os.strerror(errno.EDQUOT)


def test_an_atomic_write_that_runs_out_of_space_leaves_the_old_file(tmp_path):
    from paddle_ernie5.io import DiskFullError, atomic_write, write_bytes

    target = tmp_path / "metrics.json"
    write_bytes(str(target), b"old")

    def half_then_full(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskFullError, match="cannot write .*metrics.json: No space left"):
        atomic_write(str(target), half_then_full)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temporary file left behind
