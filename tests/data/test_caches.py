"""Every cache (io/cache.py) is verified before use: an empty, truncated, byte-flipped or stale
(other format) file is reported in one line on stderr and rebuilt, and what is then returned equals
a fresh build. Caches: the text tokenizer, the digits, the encoded vision set, the speech set and
the coded speech."""

import os
import shutil

import numpy as np
import paddle
import pytest
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5.io import cache

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed: run `make espeak`"
)


def _truncate(path, version):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path, version):
    """One bit of the byte in the middle of the file (inside the largest array)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))


def _empty(path, version):
    open(path, "wb").close()


def _other_version(path, version):
    """The same arrays with a valid checksum, stamped by another format of the code."""
    _, arrays = cache.problem(path, version)
    cache.save(path, arrays, version + 1)


CORRUPTIONS = {
    "truncated": (_truncate, "is unreadable"),
    "flipped byte": (_flip, ""),  # a damaged zip entry or a checksum mismatch
    "empty": (_empty, "is empty"),
    "other version": (_other_version, "was written in format"),
}


def check_rebuilt(capsys, build, cache_dir, prefix, version, equal):
    """Build once (a fresh build), then for each corruption of the cache file: the next build
    reports it in one stderr line, returns what the fresh build returned and leaves a whole cache
    that loads silently."""
    capsys.readouterr()
    fresh = build()
    (name,) = [n for n in os.listdir(cache_dir) if n.startswith(prefix) and n.endswith(".npz")]
    path = os.path.join(cache_dir, name)
    assert cache.problem(path, version)[0] is None
    for kind, (corrupt, said) in CORRUPTIONS.items():
        corrupt(path, version)
        assert cache.problem(path, version)[0] is not None, kind
        capsys.readouterr()
        again = build()
        lines = [l for l in capsys.readouterr().err.splitlines() if "rebuilding" in l]
        assert len(lines) == 1 and path in lines[0] and said in lines[0], (kind, lines)
        equal(again, fresh)
        assert cache.problem(path, version)[0] is None, kind
        equal(build(), fresh)
        assert "rebuilding" not in capsys.readouterr().err, kind
    assert not [n for n in os.listdir(cache_dir) if n.startswith(".tmp")]


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    """Flip each byte of a small cache file in turn: `load` gives the saved arrays exactly or
    None (reported), never other arrays; a flip inside any array's data is always caught."""
    arrays = {
        "a": np.arange(24, dtype=np.int16).reshape(4, 6),
        "b": np.array(["one", "two"]),
        "c": np.linspace(0, 1, 5, dtype=np.float32),
    }
    path = str(tmp_path / "c.npz")
    cache.save(path, arrays, 3)
    good = open(path, "rb").read()
    caught, messages = 0, []
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0xFF
        open(path, "wb").write(bad)
        got = cache.load(path, 3, "test set", warn=messages.append)
        if got is None:
            caught += 1
            continue
        assert set(got) == set(arrays), i
        for k in arrays:
            np.testing.assert_array_equal(got[k], arrays[k], err_msg=f"byte {i}")
            assert got[k].dtype == arrays[k].dtype
    payload = sum(a.nbytes for a in arrays.values())
    assert caught >= payload and len(messages) == caught
    assert all(m.count("\n") == 0 and m.endswith("rebuilding it") for m in messages)


def test_a_cache_with_no_stamp_is_stale(tmp_path):
    from paddle_ernie5.io import save_npz

    path = str(tmp_path / "old.npz")
    save_npz(path, {"a": np.zeros(3)})  # what the code wrote before caches carried stamps
    messages = []
    assert cache.load(path, 1, "old set", warn=messages.append) is None
    assert "has no format stamp" in messages[0]


def test_text_tokenizer_cache(tmp_path, capsys):
    from paddle_ernie5.data.text import TOKENIZER_CACHE_FORMAT, get_text_tokenizer

    def same(a, b):
        assert a.model_proto == b.model_proto
        text = "def f(x): return x + 1  # 37 + 45 = 82"
        assert a.encode(text) == b.encode(text)

    check_rebuilt(
        capsys,
        lambda: get_text_tokenizer(str(tmp_path), 512),
        str(tmp_path),
        "text_bpe_v512_",
        TOKENIZER_CACHE_FORMAT,
        same,
    )


def test_digits_cache(tmp_path, capsys):
    from paddle_ernie5.data import digits as D

    def same(a, b):
        np.testing.assert_array_equal(a.pixels, b.pixels)
        np.testing.assert_array_equal(a.source, b.source)
        assert all((a.labels[k] == b.labels[k]).all() for k in b.labels)

    check_rebuilt(
        capsys,
        lambda: D.digit_images("heldout", size=8, copies=1, cache_dir=str(tmp_path)),
        str(tmp_path),
        "digits_",
        D.CACHE_VERSION,
        same,
    )


def test_encoded_vision_cache(tmp_path, data_cache, capsys):
    from paddle_ernie5.data import vision_sources as VS

    cache_dir = str(tmp_path / "cache")
    cfg = vision_config(cache_dir, str(tmp_path / "run"), tiny_tokenizer(data_cache))

    def same(a, b):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.feats, b.feats)
        assert set(a.labels) == set(b.labels)
        assert all((a.labels[k] == b.labels[k]).all() for k in b.labels)

    check_rebuilt(
        capsys,
        lambda: VS.encoded_digits(cfg, "image", "heldout"),
        cache_dir,
        f"vision_v{VS.CACHE_VERSION}_",
        VS.CACHE_VERSION,
        same,
    )


@needs_espeak
def test_speech_set_cache(tmp_path, capsys):
    from paddle_ernie5.data import speech as S

    spec = S.SpeechSpec(
        texts=("five", "red"),
        train_voices=("en-gb",),
        eval_voices=("en-us",),
        train_renditions=1,
        eval_renditions=1,
    )

    def same(a, b):
        for x, y in zip(a, b):
            assert x.texts == y.texts and x.voices == y.voices
            assert len(x.waves) == len(y.waves) > 0
            for u, v in zip(x.waves, y.waves):
                np.testing.assert_array_equal(u, v)

    check_rebuilt(
        capsys,
        lambda: S.load_speech(str(tmp_path), spec),
        str(tmp_path),
        "speech_",
        S._FORMAT,
        same,
    )


@needs_espeak
def test_coded_speech_cache(tmp_path, data_cache, capsys):
    from paddle_ernie5.config import AudioCodecConfig
    from paddle_ernie5.data import audio_sources as T
    from paddle_ernie5.data import speech as S
    from paddle_ernie5.tokenizers.audio import AudioCodec

    paddle.seed(2)
    codec_dir = str(tmp_path / "codec")
    AudioCodec(
        AudioCodecConfig(levels=2, codebook_size=16, code_dim=8, channels=8, res_blocks=0)
    ).save(codec_dir)
    cache_dir = str(tmp_path / "cache")
    S.load_speech(cache_dir, S.DEBUG_SPEC)  # the speech set the codes are made from

    def same(a, b):
        for x, y in zip(a, b):
            assert x.texts == y.texts and x.voices == y.voices
            np.testing.assert_array_equal(x.word_ids, y.word_ids)
            assert len(x.codes) == len(y.codes) > 0
            for u, v in zip(x.codes, y.codes):
                np.testing.assert_array_equal(u, v)

    check_rebuilt(
        capsys,
        lambda: T.load_coded_speech(cache_dir, codec_dir, S.DEBUG_SPEC, log=lambda *_: None),
        cache_dir,
        "speech_codes_",
        T._FORMAT,
        same,
    )
