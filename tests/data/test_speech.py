import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from support import ROOT

from paddle_ernie5.data import speech as S

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed: run `make espeak`"
)


@pytest.fixture(scope="module")
def sets(data_cache):
    return S.load_speech(data_cache, S.DEBUG_SPEC)


@needs_espeak
def test_utterances_are_16khz_float_speech_with_transcripts(sets):
    train, held = sets
    spec = S.DEBUG_SPEC
    assert len(train) == len(spec.texts) * len(spec.train_voices) * spec.train_renditions
    assert len(held) == len(spec.texts) * len(spec.eval_voices) * spec.eval_renditions
    for w in train.waves + held.waves:
        assert w.dtype == np.float32 and w.ndim == 1
        assert 0.2 * S.SAMPLE_RATE < len(w) < 2.0 * S.SAMPLE_RATE
        assert abs(np.abs(w).max() - S.PEAK) < 1e-3
    assert set(train.texts) == set(spec.texts)
    for text, wid in zip(train.texts, train.word_ids):
        assert (S.WORDS[wid] == text) if wid >= 0 else text not in S.WORDS
    assert spec.pitch_range[0] <= train.pitches.min() and train.pitches.max() <= spec.pitch_range[1]
    assert spec.speed_range[0] <= train.speeds.min() and train.speeds.max() <= spec.speed_range[1]
    assert len(set(train.pitches.tolist())) > 3 and len(set(train.speeds.tolist())) > 3
    waves, lengths = train.padded(8000)
    assert waves.shape == (len(train), 8000) and (lengths <= 8000).all()


@needs_espeak
def test_held_out_voices_are_disjoint_from_training_voices(sets):
    train, held = sets
    assert set(train.voices) == set(S.DEBUG_SPEC.train_voices)
    assert set(held.voices) == set(S.DEBUG_SPEC.eval_voices)
    assert not set(train.voices) & set(held.voices)
    with pytest.raises(ValueError, match="overlap"):
        S._build(S.SpeechSpec(texts=("one",), train_voices=("en-us",), eval_voices=("en-us",)))


@needs_espeak
def test_build_is_deterministic_and_cached(tmp_path, sets, monkeypatch):
    spec = S.SpeechSpec(
        texts=("four", "cyan"),
        train_voices=("en-gb",),
        eval_voices=("en-us",),
        train_renditions=2,
        eval_renditions=1,
    )
    a_train, a_held = S.load_speech(str(tmp_path / "a"), spec)
    b_train, b_held = S.load_speech(str(tmp_path / "b"), spec)
    for x, y in zip(a_train.waves + a_held.waves, b_train.waves + b_held.waves):
        np.testing.assert_array_equal(x, y)
    assert (a_train.pitches == b_train.pitches).all() and (a_train.speeds == b_train.speeds).all()
    # A cached set loads without espeak-ng.
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    c_train, _ = S.load_speech(str(tmp_path / "a"), spec)
    np.testing.assert_array_equal(c_train.waves[1], a_train.waves[1])


@needs_espeak
def test_a_corrupt_cache_is_rebuilt_with_a_warning(tmp_path, capsys):
    spec = S.SpeechSpec(
        texts=("five",),
        train_voices=("en-gb",),
        eval_voices=("en-us",),
        train_renditions=1,
        eval_renditions=1,
    )
    train, _ = S.load_speech(str(tmp_path), spec)
    path = os.path.join(tmp_path, f"speech_{spec.key()}.npz")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    again, _ = S.load_speech(str(tmp_path), spec)
    assert "unreadable" in capsys.readouterr().err
    np.testing.assert_array_equal(again.waves[0], train.waves[0])
    S.load_speech(str(tmp_path), spec)  # the rebuilt cache is whole again
    assert "unreadable" not in capsys.readouterr().err
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_missing_espeak_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(S.EspeakMissing) as e:
        S.load_speech(str(tmp_path), S.DEBUG_SPEC)
    assert "apt-get install -y espeak-ng" in str(e.value) and "make espeak" in str(e.value)
    assert not os.listdir(tmp_path)


def test_missing_espeak_on_path_in_a_fresh_process(tmp_path):
    code = (
        "from paddle_ernie5.data.speech import load_speech, DEBUG_SPEC, EspeakMissing\n"
        "try:\n"
        f"    load_speech({str(tmp_path)!r}, DEBUG_SPEC)\n"
        "except EspeakMissing as e:\n"
        "    print('MSG', e)\n"
    )
    env = dict(os.environ, PATH=str(tmp_path))  # no espeak-ng on this PATH
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert (
        "MSG espeak-ng is not installed" in out.stdout
        and "apt-get install -y espeak-ng" in out.stdout
    )
