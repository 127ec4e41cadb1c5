"""Audio in the backbone: summed level embeddings, the depth-wise head, depth-wise sampling with the
KV cache and decoding to audio. A randomly initialised small codec stands in for a trained one."""

import numpy as np
import paddle
import pytest

from paddle_ernie5 import config as C
from paddle_ernie5.config import AudioCodecConfig
from paddle_ernie5.errors import UserError
from paddle_ernie5.model import audio as A
from paddle_ernie5.model.losses import compute_loss
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.model.params import count_params
from paddle_ernie5.tokenizers.audio import AudioCodec, CodecMissing, load_codec
from paddle_ernie5.train.pretrained import init_layer_fresh

SMALL_CODEC = AudioCodecConfig(
    levels=3, codebook_size=16, code_dim=8, channels=16, res_blocks=0, griffin_lim_iters=2
)


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    paddle.seed(1)
    path = str(tmp_path_factory.mktemp("codec"))
    AudioCodec(SMALL_CODEC).save(path)
    return path


@pytest.fixture
def audio_config(debug_config, codec_dir):
    def make(*overrides):
        return debug_config(
            "model.modalities=[text,audio]",
            f"model.audio.codec_dir={codec_dir}",
            "model.audio.levels=3",
            "model.audio.codebook_size=16",
            "model.audio.embed_dim=8",
            "model.audio.head_hidden=32",
            "model.audio.max_frames=6",
            *overrides,
        )

    return make


def _batch(cfg, seed=0, b=2, s=12):
    """Text then audio frames at positions 4..9, next-frame targets at positions 3..9 (a TTS
    layout)."""
    rng = np.random.default_rng(seed)
    a = cfg.model.audio
    types = np.zeros((b, s), np.int64)
    types[:, 4:10] = A.AUDIO_TYPE
    codes = np.zeros((b, s, a.levels), np.int64)
    codes[:, 4:10] = rng.integers(0, a.codebook_size, (b, 6, a.levels))
    targets = np.zeros_like(codes)
    mask = np.zeros((b, s, a.levels), np.float32)
    targets[:, 3:9], mask[:, 3:9] = codes[:, 4:10], 1.0
    targets[:, 9, 0], mask[:, 9, 0] = a.codebook_size, 1.0  # <eoa>
    ids = rng.integers(0, cfg.model.vocab_size, (b, s))
    ids[types == A.AUDIO_TYPE] = 0
    pos = np.broadcast_to(np.arange(s), (b, 3, s)).copy()
    return {
        "input_ids": paddle.to_tensor(ids),
        "token_types": paddle.to_tensor(types),
        "positions": paddle.to_tensor(pos),
        "startend_row_indices": None,
        "labels": paddle.to_tensor(np.where(types == 0, np.roll(ids, -1, 1), -100)),
        "audio_codes": paddle.to_tensor(codes),
        "audio_targets": paddle.to_tensor(targets),
        "audio_target_mask": paddle.to_tensor(mask),
    }


def test_audio_token_is_the_projected_sum_of_its_level_embeddings(audio_config):
    cfg = audio_config()
    paddle.seed(0)
    emb = Ernie5Model(cfg.model).embed
    batch = _batch(cfg)
    x = emb(batch).numpy()
    layer = emb.by_modality["audio"]
    tables, proj = layer.tables.numpy(), layer.proj.weight.numpy()
    codes = batch["audio_codes"].numpy()
    b, j = 1, 6
    expected = sum(tables[l, codes[b, j, l]] for l in range(3)) @ proj
    np.testing.assert_allclose(x[b, j], expected, rtol=1e-5, atol=1e-6)
    # text positions keep the text embedding
    text = emb.text_table().weight.numpy()[batch["input_ids"].numpy()[b, 1]]
    np.testing.assert_allclose(x[b, 1], text, rtol=1e-6)


def test_forward_backward_reaches_embeddings_head_and_backbone(audio_config):
    cfg = audio_config()
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    batch = _batch(cfg)
    out = model(batch)
    heads = model.head_losses(out, batch)
    assert sorted(heads) == ["audio/level0", "audio/level1", "audio/level2"]
    assert [w for _, _, w in heads.values()] == [1.0, 0.5, 0.5]
    assert [float(c) for _, c, _ in heads.values()] == [14.0, 12.0, 12.0]  # <eoa> only at level 0
    # an untrained head is near uniform: level 0 has K + 1 classes
    assert float(heads["audio/level0"][0]) == pytest.approx(np.log(17), rel=0.1)
    parts = compute_loss(out, batch["labels"], cfg.model, heads)
    expected = (
        float(parts.text)
        + sum(w * float(l) for l, _, w in heads.values())
        + cfg.model.mtp_loss_weight * float(parts.mtp)
    )
    assert float(parts.total) == pytest.approx(expected, rel=1e-5)
    parts.total.backward()
    layer = model.embed.by_modality["audio"]
    for p in (
        layer.tables,
        layer.proj.weight,
        model.heads["audio"].outs[2].mlp[0].weight,
        model.heads["audio"].code_embed[1].weight,
        model.blocks[0].attn.qkv.weight,
    ):
        assert p.grad is not None and float(p.grad.abs().sum()) > 0


def test_depthwise_head_level_l_sees_the_codes_of_earlier_levels_only(audio_config):
    cfg = audio_config()
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    model.eval()
    head = model.heads["audio"]
    h = paddle.randn([1, 12, cfg.model.hidden_size])
    batch = _batch(cfg, b=1)
    base = [t.numpy() for t in head(h, batch)["logits"]]
    changed = batch["audio_targets"].numpy().copy()
    changed[..., 1] = (changed[..., 1] + 3) % 16
    new = [
        t.numpy() for t in head(h, {**batch, "audio_targets": paddle.to_tensor(changed)})["logits"]
    ]
    np.testing.assert_allclose(new[0], base[0])
    np.testing.assert_allclose(new[1], base[1])
    assert np.abs(new[2] - base[2]).max() > 1e-4
    assert base[0].shape[-1] == 17 and base[1].shape[-1] == 16


def test_a_text_only_batch_has_no_audio_loss(audio_config):
    cfg = audio_config()
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    batch = {k: v for k, v in _batch(cfg).items() if not k.startswith("audio")}
    batch["token_types"] = paddle.zeros_like(batch["token_types"])
    out = model(batch)
    assert out.extra["audio"] == {} and model.head_losses(out, batch) == {}


def test_parameter_count_includes_the_audio_modules(audio_config):
    for overrides in ((), ("model.audio.head_hidden=0",)):
        model = Ernie5Model(audio_config(*overrides).model)
        assert count_params(model.cfg)["total"] == sum(
            int(np.prod(p.shape)) for p in model.parameters()
        )


def test_tables_start_at_the_codec_codebooks(audio_config, codec_dir):
    cfg = audio_config("model.audio.init_from_codebooks=true")
    cb = AudioCodec.load(codec_dir).codebooks().numpy()
    layer = Ernie5Model(cfg.model).embed.by_modality["audio"]
    init_layer_fresh(layer)
    np.testing.assert_allclose(layer.tables.numpy(), cb / cb.std(), rtol=1e-4, atol=1e-6)
    layer = Ernie5Model(audio_config().model).embed.by_modality["audio"]
    before = layer.tables.numpy()
    init_layer_fresh(layer)  # init_from_codebooks false: the random start stays
    np.testing.assert_array_equal(layer.tables.numpy(), before)
    with pytest.raises(UserError, match="embed_dim"):
        init_layer_fresh(
            Ernie5Model(
                audio_config(
                    "model.audio.init_from_codebooks=true", "model.audio.embed_dim=12"
                ).model
            ).embed.by_modality["audio"]
        )


def test_missing_or_mismatched_codec_is_a_clear_error(audio_config, tmp_path):
    with pytest.raises(CodecMissing, match="recipes/audio_codec.yaml"):
        init_layer_fresh(
            Ernie5Model(
                audio_config(
                    "model.audio.init_from_codebooks=true",
                    f"model.audio.codec_dir={tmp_path / 'none'}",
                ).model
            ).embed.by_modality["audio"]
        )
    with pytest.raises(UserError, match="does not fit the codec"):
        load_codec(audio_config("model.audio.codebook_size=32").model.audio)


def test_audio_config_is_validated(audio_config):
    with pytest.raises(C.ConfigError, match="model.audio.level_loss_weights"):
        audio_config("model.audio.level_loss_weights=[1.0, 0.5]")
    with pytest.raises(C.ConfigError, match="model.audio.level_loss_weights"):
        audio_config("model.audio.level_loss_weights=[0.0, 1.0, 1.0]")
    assert audio_config(
        "model.audio.level_loss_weights=[1.0, 0.2, 0.1]"
    ).model.audio.level_weights() == (1.0, 0.2, 0.1)


def test_greedy_depthwise_sampling_with_the_cache_matches_a_full_forward(audio_config):
    """Every greedily sampled frame is what the head picks from a cache-free forward over the prompt
    and the frames before it (KV cache, audio step inputs and level feedback agree with training's
    path)."""
    cfg = audio_config()
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    prompt = [1, 7, 9, 11]
    codes = A.sample_speech(model, [prompt], max_frames=5, temperature=0.0)[0]
    assert codes.shape == (5, 3)
    s = len(prompt) + len(codes)
    types = np.zeros((1, s), np.int64)
    types[0, len(prompt) :] = A.AUDIO_TYPE
    frames = np.zeros((1, s, 3), np.int64)
    frames[0, len(prompt) :] = codes
    ids = np.zeros((1, s), np.int64)
    ids[0, : len(prompt)] = prompt
    out = model(
        {
            "input_ids": paddle.to_tensor(ids),
            "token_types": paddle.to_tensor(types),
            "positions": paddle.arange(s).reshape([1, 1, s]).expand([1, 3, s]),
            "startend_row_indices": None,
            "audio_codes": paddle.to_tensor(frames),
        },
        with_mtp=False,
    )
    head = model.heads["audio"]
    rng = np.random.default_rng(0)
    for t in range(len(codes)):
        expected, _ = head.sample(out.hidden[:, len(prompt) - 1 + t], rng, temperature=0.0)
        np.testing.assert_array_equal(expected[0], codes[t])


def test_sampling_stops_at_eoa_and_decodes_to_audio_of_the_right_length(audio_config, codec_dir):
    cfg = audio_config()
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    codec = AudioCodec.load(codec_dir)
    speech = A.sample_speech(
        model, [[1, 5, 6], [1, 8, 6], [1, 5, 6, 9]], max_frames=4, temperature=1.0, seed=3
    )
    for codes in speech:
        assert codes.shape[1] == 3 and 0 < len(codes) <= 4
        assert codes.min() >= 0 and codes.max() < 16
        wave = codec.decode(codes[None])
        assert wave.shape == (1, len(codes) * codec.samples_per_frame) and np.isfinite(wave).all()
    # a head that always ends: no frames at all
    head = model.heads["audio"]
    bias = head.outs[0].mlp[2].bias
    bias.set_value(paddle.concat([paddle.zeros([16]), paddle.full([1], 1e4)]))
    assert [len(c) for c in A.sample_speech(model, [[1, 5, 6]], max_frames=4, seed=0)] == [0]
