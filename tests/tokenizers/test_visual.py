import os

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import TrainConfig, VisualTokenizerConfig
from paddle_ernie5.optim.optimizer import build_optimizer
from paddle_ernie5.tokenizers.visual import (
    VisualTokenizer,
    codes_to_ids,
    ids_to_codes,
    psnr,
    reconstruct,
)
from paddle_ernie5.train.visual_tokenizer import active_bits, train_steps

TINY = VisualTokenizerConfig(
    image_size=8, width=8, downsample=2, bits=6, scales=(1, 2, 4), temporal_kernel=2, frames=4
)


def _tok(cfg=TINY, seed=0):
    paddle.seed(seed)
    tok = VisualTokenizer(cfg)
    tok.eval()
    return tok


def test_codes_ids_round_trip_is_bit_exact():
    bits = 12
    ids = np.arange(2**bits, dtype=np.int64).reshape(4, 1, 32, 32)
    codes = ids_to_codes(ids, bits)
    assert codes.shape == (4, 1, 32, 32, bits) and set(np.unique(codes)) == {-1.0, 1.0}
    np.testing.assert_array_equal(codes_to_ids(codes), ids)
    assert codes_to_ids(np.array([[1, -1, -1], [-1, 1, 1]], np.float32)).tolist() == [1, 6]
    # paddle path agrees with numpy
    t_codes = ids_to_codes(paddle.to_tensor(ids), bits)
    np.testing.assert_array_equal(t_codes.numpy(), codes)
    np.testing.assert_array_equal(codes_to_ids(t_codes).numpy(), ids)


def test_encode_decode_shapes_for_image_and_video():
    tok = _tok()
    rng = np.random.default_rng(0)
    img = rng.random((3, 3, 8, 8), dtype=np.float32)
    feats, codes = tok.encode(img)
    assert feats.shape == [3, 1, 6, 4, 4]
    assert [c.shape for c in codes] == [[3, 1, s, s, 6] for s in (1, 2, 4)]
    assert tok.decode(codes).shape == [3, 1, 3, 8, 8]
    vid = rng.random((2, 4, 3, 8, 8), dtype=np.float32)
    feats, codes = tok.encode(vid)
    assert [c.shape for c in codes] == [[2, 4, s, s, 6] for s in (1, 2, 4)]
    assert set(np.unique(np.concatenate([c.numpy().ravel() for c in codes]))) == {-1.0, 1.0}
    assert tok.decode(codes).shape == [2, 4, 3, 8, 8]
    # ids of real codes survive the trip back to codes and decode identically
    ids = [codes_to_ids(c) for c in codes]
    again = [ids_to_codes(i, 6) for i in ids]
    np.testing.assert_array_equal(tok.decode(again).numpy(), tok.decode(codes).numpy())
    assert tok.vocab_size == 64 and tok.tokens_per_frame == 21


def test_video_encoder_and_decoder_are_causal_in_time():
    tok = _tok()
    # make the temporal mixers non-trivial (they start at zero)
    for layer in (tok.encoder.time.proj, tok.decoder.time.proj):
        layer.weight.set_value(paddle.randn(layer.weight.shape) * 0.3)
    rng = np.random.default_rng(1)
    vid = rng.random((2, 4, 3, 8, 8), dtype=np.float32)
    changed = vid.copy()
    changed[:, 2] = rng.random((2, 3, 8, 8), dtype=np.float32)
    f1, c1 = tok.encode(vid)
    f2, c2 = tok.encode(changed)
    np.testing.assert_array_equal(f1.numpy()[:, :2], f2.numpy()[:, :2])
    assert np.abs(f1.numpy()[:, 2:] - f2.numpy()[:, 2:]).max() > 1e-3
    for a, b in zip(c1, c2):
        np.testing.assert_array_equal(a.numpy()[:, :2], b.numpy()[:, :2])
    assert any((a.numpy()[:, 2] != b.numpy()[:, 2]).any() for a, b in zip(c1, c2))
    assert any((a.numpy()[:, 3] != b.numpy()[:, 3]).any() for a, b in zip(c1, c2))  # frame 3 sees 2
    d1, d2 = tok.decode(c1).numpy(), tok.decode(c2).numpy()
    np.testing.assert_array_equal(d1[:, :2], d2[:, :2])
    # a frame encoded alone gets the same codes as the first frame of a clip
    _, alone = tok.encode(vid[:, 0])
    for a, b in zip(alone, c1):
        np.testing.assert_array_equal(a.numpy()[:, 0], b.numpy()[:, 0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny tokenizer trained briefly on real 8x8 digits (shared by the tests below)."""
    from paddle_ernie5.data.digits import digit_images

    cache = str(tmp_path_factory.mktemp("cache"))
    train = digit_images("train", size=8, copies=1, cache_dir=cache)
    held = digit_images("heldout", size=8, copies=1, cache_dir=cache)
    tok = _tok()
    cfg = TrainConfig(
        max_steps=300, lr=3e-3, min_lr=3e-4, schedule="cosine", warmup_steps=5, weight_decay=0.0
    )
    opt = build_optimizer(tok, cfg)
    rng = np.random.default_rng(0)
    losses = train_steps(
        tok, opt, lambda s: [train.pixels[rng.integers(len(train), size=32)]], cfg, cfg.max_steps
    )
    tok.eval()
    return tok, held, losses


def test_training_reduces_loss_on_a_fixed_batch():
    tok = _tok(seed=3)
    cfg = TrainConfig(
        max_steps=25, lr=3e-3, warmup_steps=0, weight_decay=0.0, schedule="cosine", min_lr=3e-3
    )
    batch = np.random.default_rng(0).random((8, 3, 8, 8), dtype=np.float32) * 0.2 + 0.4
    losses = train_steps(tok, build_optimizer(tok, cfg), lambda s: [batch], cfg, cfg.max_steps)
    assert losses[-1] < 0.5 * losses[0]


def test_each_scale_reduces_reconstruction_error(trained):
    tok, held, losses = trained
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    x = held.pixels[:256]
    scores = [psnr(reconstruct(tok, x, num_scales=n), x) for n in (1, 2, 3)]
    assert scores[0] < scores[1] < scores[2], scores
    assert scores[2] > 16.0, scores  # a flat mean-colour image scores about 10 dB


def test_fewer_bits_decode_and_schedule():
    cfg = VisualTokenizerConfig(
        image_size=8, width=8, downsample=2, bits=6, scales=(1, 2, 4), bit_schedule=(2, 4, 6)
    )
    assert [active_bits(cfg, s, 90) for s in (0, 29, 30, 59, 60, 89)] == [2, 2, 4, 4, 6, 6]
    tok = _tok(cfg)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    _, codes = tok.encode(x, bits=3)
    assert codes[-1].shape == [2, 1, 4, 4, 3]
    assert int(codes_to_ids(codes[-1]).max()) < 8
    # decoding 3 bits equals decoding 6 bits whose last 3 are zero in the latent
    full = [paddle.concat([c, paddle.zeros([*c.shape[:-1], 3])], axis=-1) for c in codes]
    np.testing.assert_allclose(tok.decode(codes).numpy(), tok.decode(full).numpy(), atol=1e-6)


def test_save_load_round_trip(trained, tmp_path):
    tok, held, _ = trained
    tok.save(str(tmp_path / "tok"))
    again = VisualTokenizer.load(str(tmp_path / "tok"))
    assert again.cfg == tok.cfg
    x = held.pixels[:16]
    for a, b in zip(tok.encode(x)[1], again.encode(x)[1]):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(reconstruct(tok, x), reconstruct(again, x))


def test_train_from_config_writes_tokenizer_and_reports_psnr(tmp_path, data_cache):
    from support import RECIPES

    from paddle_ernie5.config import load_config

    cfg = load_config(
        os.path.join(RECIPES, "visual_tokenizer.yaml"),
        [
            f"data.cache_dir={data_cache}",
            f"train.run_dir={tmp_path / 'run'}",
            "train.visualdl=false",
            "train.progress=false",
            "train.max_steps=3",
            "train.warmup_steps=1",
            "train.batch_size=4",
            "visual_tokenizer.width=8",
            "visual_tokenizer.video_batch_size=1",
        ],
    )
    from paddle_ernie5.train.visual_tokenizer import train_from_config

    m = train_from_config(cfg)
    assert {"psnr_image_heldout", "psnr_video_heldout", "psnr_image_heldout_scales1"} <= set(m)
    assert all(np.isfinite(v) for v in m.values())
    tok = VisualTokenizer.load(str(tmp_path / "run"))
    assert tok.cfg == cfg.visual_tokenizer


@pytest.mark.parametrize(
    "override,needle",
    [
        (
            "visual_tokenizer.scales=[1, 2, 4]",
            "visual_tokenizer.scales=(1, 2, 4) is invalid: allowed increasing sides >= 1 ending at "
            "image_size / downsample = 8",
        ),
        (
            "visual_tokenizer.downsample=3",
            "visual_tokenizer.downsample=3 is invalid: allowed a power of 2",
        ),
        (
            "visual_tokenizer.bit_schedule=[6, 4, 8]",
            "visual_tokenizer.bit_schedule=(6, 4, 8) is invalid",
        ),
        ("vision_judge.frames=1", "vision_judge.frames=1 is invalid: allowed >= 2"),
    ],
)
def test_bad_vision_config_values_raise_one_clear_error(override, needle):
    from support import RECIPES

    from paddle_ernie5.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(RECIPES, "visual_tokenizer.yaml"), [override])
    assert needle in str(e.value)
