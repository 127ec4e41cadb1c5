import shutil

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import AudioCodecConfig, TrainConfig
from paddle_ernie5.data import speech as S
from paddle_ernie5.tokenizers import audio as A
from paddle_ernie5.tokenizers import mel as M
from paddle_ernie5.train import audio_codec as T

TINY = AudioCodecConfig(
    levels=4, codebook_size=32, code_dim=16, channels=32, res_blocks=1, max_seconds=1.6
)
TRAIN = TrainConfig(
    max_steps=80,
    batch_size=8,
    lr=1e-2,
    min_lr=1e-3,
    schedule="cosine",
    warmup_steps=5,
    weight_decay=0.0,
    progress=False,
)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed: run `make espeak`"
)


@pytest.fixture(scope="module")
def sets(data_cache):
    return S.load_speech(data_cache, S.DEBUG_SPEC)


@pytest.fixture(scope="module")
def trained(sets):
    codec, metrics = T.fit_codec(TINY, TRAIN, *sets)
    return codec, metrics


def test_encode_decode_shapes():
    paddle.seed(0)
    codec = A.AudioCodec(TINY).eval()
    spf = codec.samples_per_frame
    assert (spf, codec.frame_rate, codec.sample_rate) == (640, 25.0, 16000)
    wave = np.random.default_rng(0).normal(0, 0.1, (2, 5 * spf + 100)).astype(np.float32)
    codes = codec.encode(wave)
    assert codes.shape == (2, 6, 4) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < TINY.codebook_size
    assert codec.decode_mel(codes).shape == (2, 6 * codec.mels_per_frame, M.N_MELS)
    assert codec.decode(codes).shape == (2, 6 * spf)
    emb = codec.embed_levels(codes)
    assert emb.shape == [2, 6, 4, TINY.code_dim]
    np.testing.assert_allclose(emb[0, 0, 2].numpy(), codec.codebooks()[2, codes[0, 0, 2]].numpy())


@pytest.mark.parametrize("rate,per_frame", [(12.5, 1280), (50.0, 320)])
def test_frame_rate_is_configurable(rate, per_frame):
    codec = A.AudioCodec(
        AudioCodecConfig(
            frame_rate=rate, codebook_size=8, code_dim=8, channels=8, res_blocks=0, max_seconds=1.6
        )
    )
    codes = codec.encode(np.zeros((1, 3 * per_frame), np.float32))
    assert codec.samples_per_frame == per_frame and codes.shape[:2] == (1, 3)
    assert codec.decode_mel(codes).shape[1] * M.HOP == 3 * per_frame


def test_each_residual_level_reduces_the_quantisation_error():
    paddle.seed(0)
    rvq = A.ResidualVQ(TINY)
    z = paddle.randn([2000, TINY.code_dim])
    rvq.init_kmeans(z)
    rvq.eval()
    _, quants, _ = rvq(z, paddle.ones([2000]))
    errors = [float(((z - quants[:n].sum(0)) ** 2).sum(-1).mean()) for n in range(TINY.levels + 1)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_dead_codes_are_restarted_at_batch_residuals():
    paddle.seed(0)
    rvq = A.ResidualVQ(TINY)
    z = paddle.randn([256, TINY.code_dim])
    rvq.init_kmeans(z)
    rvq.usage[0] = paddle.scatter(rvq.usage[0].clone(), paddle.to_tensor([3]), paddle.zeros([1]))
    far = paddle.full([TINY.code_dim], 50.0)
    rvq.codebook[0] = paddle.scatter(
        rvq.codebook[0].clone(), paddle.to_tensor([3]), far.unsqueeze(0)
    )
    rvq.train()
    rvq(z, paddle.ones([256]))
    row = rvq.codebook[0, 3].numpy()
    assert np.abs(row).max() < 20  # moved from the unreachable spot onto the data
    assert float(rvq.usage[0, 3]) == pytest.approx(1.0)
    # restarted at one of the batch's level-0 residuals (the inputs themselves), exactly
    dist = ((z.numpy() - row) ** 2).sum(-1)
    assert dist.min() == 0.0, dist.min()


def test_gradient_codebook_learning_trains_the_codebook():
    cfg = AudioCodecConfig(
        codebook_learning="gradient",
        levels=2,
        codebook_size=8,
        code_dim=8,
        channels=8,
        res_blocks=0,
        max_seconds=1.6,
    )
    codec = A.AudioCodec(cfg)
    assert not codec.rvq.codebook.stop_gradient
    mel = paddle.to_tensor(
        M.log_mel(np.random.default_rng(0).normal(0, 0.1, (2, 6400)).astype(np.float32))
    )
    z = codec.encode_latent(mel)
    _, quants, loss = codec.quantise(z, paddle.ones(z.shape[:2]))
    (loss + quants.sum()).backward()
    assert codec.rvq.codebook.grad is not None and float(codec.rvq.codebook.grad.abs().sum()) > 0


def test_sampled_codes_decode_to_audio_of_the_right_length():
    """What generation does: draw level 0 for a frame, then each residual level in turn."""
    codec = A.AudioCodec(TINY).eval()
    rng = np.random.default_rng(0)
    frames = 7
    codes = np.zeros((1, frames, TINY.levels), np.int64)
    for f in range(frames):
        for level in range(TINY.levels):
            codes[0, f, level] = rng.integers(0, TINY.codebook_size)
    wave = codec.decode(codes)
    assert wave.shape == (1, frames * codec.samples_per_frame)
    assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0


@needs_espeak
def test_training_learns_and_each_level_lowers_the_decoded_error(trained, sets):
    codec, held_out = trained
    # On the speech it was trained on (the debug set has one held-out voice, too few to be smooth):
    m = T.evaluate(codec, T._Batches(codec, sets[0], TINY.max_seconds))
    by_levels = [m[f"mel_l1_levels_{n}"] for n in range(1, TINY.levels + 1)]
    assert all(b <= a + 0.005 for a, b in zip(by_levels, by_levels[1:])), by_levels
    assert by_levels[-1] < by_levels[0] - 0.02, by_levels
    assert m["mel_l1"] < 1.3  # an untrained decoder is 3-4 nats off
    assert held_out["mel_l1"] < 2.0 and held_out["train_ctc"] < 5.0
    assert held_out["code_perplexity_mean"] > 4


@needs_espeak
def test_save_load_round_trips_codes_and_audio(trained, sets, tmp_path):
    codec, _ = trained
    waves, _ = sets[1].padded(12800)
    codec.save(str(tmp_path))
    again = A.AudioCodec.load(str(tmp_path))
    codes = codec.encode(waves[:4])
    np.testing.assert_array_equal(again.encode(waves[:4]), codes)
    np.testing.assert_allclose(again.decode_mel(codes), codec.decode_mel(codes), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="recipes/audio_codec.yaml"):
        A.AudioCodec.load(str(tmp_path / "nothing"))


def test_ctc_helpers():
    h, e, l, o = A.text_to_labels("helo")
    assert A.ctc_greedy(np.array([0, h, h, 0, e, l, 0, l, o, o])) == "hello"
    assert [A.CHARS[i - 1] for i in A.text_to_labels("Red 7!")] == list("red ")


@needs_espeak
def test_train_from_config_reports_judge_accuracy_on_reconstructions(
    debug_config, monkeypatch, tmp_path
):
    from paddle_ernie5.train import speech_judge as J

    full = S.load_speech
    monkeypatch.setattr(S, "load_speech", lambda cache_dir: full(cache_dir, S.DEBUG_SPEC))
    judge_cfg = debug_config(
        "component=speech_judge",
        "train.max_steps=4",
        "speech_judge.channels=16",
        f"train.run_dir={tmp_path / 'judge'}",
    )
    J.train_from_config(judge_cfg)
    cfg = debug_config(
        "component=audio_codec",
        "train.max_steps=4",
        f"audio_codec.judge={tmp_path / 'judge'}",
        "audio_codec.codebook_size=16",
        "audio_codec.code_dim=8",
        "audio_codec.channels=16",
        "audio_codec.griffin_lim_iters=4",
    )
    metrics = T.train_from_config(cfg)
    reported = {"mel_l1", "level0_cer", "judge_acc_real", "judge_acc_codec", "judge_chance"}
    assert reported <= set(metrics)
    codec = A.AudioCodec.load(cfg.train.run_dir)
    assert codec.codebook_size == 16 and codec.num_levels == 4


@pytest.mark.parametrize(
    "override,needle",
    [
        (
            "audio_codec.frame_rate=30",
            "audio_codec.frame_rate=30.0 is invalid: allowed 12.5, 25 or 50",
        ),
        (
            "audio_codec.codebook_learning=kmeans",
            "audio_codec.codebook_learning='kmeans' is invalid",
        ),
        (
            "audio_codec.max_seconds=1.01",
            "audio_codec.max_seconds=1.01 is invalid: allowed a positive multiple",
        ),
        ("speech_judge.dropout=1.5", "speech_judge.dropout=1.5 is invalid"),
    ],
)
def test_bad_audio_settings_raise_one_clear_error(override, needle):
    import os

    from support import RECIPES

    from paddle_ernie5 import config as C

    with pytest.raises(C.ConfigError) as e:
        C.load_config(os.path.join(RECIPES, "audio_codec.yaml"), [override])
    assert needle in str(e.value)
