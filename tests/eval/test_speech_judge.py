import shutil

import numpy as np
import pytest

from paddle_ernie5.config import SpeechJudgeConfig, TrainConfig
from paddle_ernie5.data import speech as S
from paddle_ernie5.eval.speech_judge import SpeechJudge
from paddle_ernie5.train.speech_judge import fit_judge

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed: run `make espeak`"
)

TINY = SpeechJudgeConfig(channels=24, max_seconds=1.0, dropout=0.0)
TRAIN = TrainConfig(
    max_steps=80,
    batch_size=16,
    lr=3e-3,
    min_lr=3e-4,
    schedule="cosine",
    warmup_steps=5,
    weight_decay=0.0,
    progress=False,
)


@pytest.fixture(scope="module")
def trained(data_cache):
    train, held = S.load_speech(data_cache, S.DEBUG_SPEC)
    judge, metrics = fit_judge(TINY, TRAIN, train, held)
    return judge, metrics, train.words_only(), held.words_only()


def test_judge_is_well_above_chance_on_held_out_voices(trained):
    judge, m, train, held = trained
    spoken = len(set(train.word_ids.tolist()))  # the debug set speaks 6 of the 18 words
    assert m["chance"] == pytest.approx(1 / len(S.WORDS))
    assert m["heldout_utterances"] == len(held) and m["heldout_voices"] == 1
    assert m["heldout_acc"] >= 2.5 / spoken, m
    assert judge.score(train.waves, train.word_ids) >= 0.8


def test_predict_score_and_probs_agree(trained):
    judge, m, _, held = trained
    pred = judge.predict(held.waves)
    probs = judge.probs(held.waves)
    assert pred.dtype == np.int64 and pred.shape == (len(held),)
    assert probs.shape == (len(held), len(S.WORDS))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == pred).all()
    by_name = judge.score(held.waves, [S.WORDS[i] for i in held.word_ids])
    assert by_name == pytest.approx(m["heldout_acc"])
    padded, _ = held.padded()
    assert (judge.predict(padded) == pred).all()  # trailing silence does not change the verdict


def test_save_load_gives_the_same_verdicts(trained, tmp_path):
    judge, _, _, held = trained
    judge.save(str(tmp_path))
    again = SpeechJudge.load(str(tmp_path))
    np.testing.assert_allclose(again.probs(held.waves), judge.probs(held.waves), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="recipes/speech_judge.yaml"):
        SpeechJudge.load(str(tmp_path / "missing"))


def test_train_from_config_writes_a_loadable_judge(debug_config, data_cache, monkeypatch):
    import json
    import os

    from paddle_ernie5.train import speech_judge as J

    full = S.load_speech
    monkeypatch.setattr(S, "load_speech", lambda cache_dir: full(cache_dir, S.DEBUG_SPEC))
    cfg = debug_config("component=speech_judge", "train.max_steps=6", "speech_judge.channels=16")
    metrics = J.train_from_config(cfg)
    assert {"heldout_acc", "heldout_acc_griffin_lim", "chance", "train_seconds"} <= set(metrics)
    judge = SpeechJudge.load(cfg.train.run_dir)
    assert judge.hparams["channels"] == 16
    with open(os.path.join(cfg.train.run_dir, "metrics.json")) as f:
        assert json.load(f)["heldout_acc"] == metrics["heldout_acc"]
