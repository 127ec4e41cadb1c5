"""Speech sources of the mixture: coded speech cached per codec, held-out voices kept out of
training, the ASR and TTS document layouts, and a packed speech batch through the model
(forward/backward)."""

import shutil

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import AudioCodecConfig
from paddle_ernie5.data import audio_sources as T
from paddle_ernie5.data import mixture
from paddle_ernie5.data import speech as S
from paddle_ernie5.data.packing import IGNORE
from paddle_ernie5.tokenizers.audio import AudioCodec

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed: run `make espeak`"
)
SMALL_CODEC = AudioCodecConfig(levels=3, codebook_size=16, code_dim=8, channels=16, res_blocks=0)


@pytest.fixture(scope="module")
def codec_dir(tmp_path_factory):
    paddle.seed(2)
    path = str(tmp_path_factory.mktemp("codec"))
    AudioCodec(SMALL_CODEC).save(path)
    return path


@pytest.fixture(scope="module")
def coded(data_cache, codec_dir):
    return T.load_coded_speech(data_cache, codec_dir, S.DEBUG_SPEC, log=lambda *_: None)


@pytest.fixture
def ctx(debug_config, codec_dir, coded):
    cfg = debug_config(
        "model.modalities=[text,audio]",
        f"model.audio.codec_dir={codec_dir}",
        "model.audio.levels=2",
        "model.audio.codebook_size=16",
        "model.audio.embed_dim=8",
        "data.mixture.asr=1.0",
        "data.mixture.tts=1.0",
    )
    from paddle_ernie5.data.loader import build_text_data

    tok, loader, _ = build_text_data(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.seq_len, 2, 0
    )
    c = mixture.MixtureContext(cfg, tok, "train", loader.docs_ids_fn(0))
    c.cache["coded_speech"] = coded
    return c


@needs_espeak
def test_codes_are_the_codec_encoding_of_each_utterance_and_cached(
    data_cache, codec_dir, coded, monkeypatch
):
    train, held = coded
    waves_train, waves_held = S.load_speech(data_cache, S.DEBUG_SPEC)
    codec = AudioCodec.load(codec_dir)
    assert len(train) == len(waves_train) and len(held) == len(waves_held)
    for i in (0, len(train) - 1):
        w = waves_train.waves[i]
        assert (
            train.codes[i].shape == (codec.frames_for(len(w)), 3)
            and train.codes[i].dtype == np.int64
        )
        alone = codec.encode(w[None])[0]
        # batch padding may only touch the last frame's receptive field
        assert (alone[:-2] == train.codes[i][:-2]).mean() > 0.9
    assert set(train.voices).isdisjoint(held.voices)
    assert set(held.voices) == set(S.DEBUG_SPEC.eval_voices)

    def no_codec(_):
        raise AssertionError("the codec ran although the codes are cached")

    monkeypatch.setattr("paddle_ernie5.tokenizers.audio.open_codec", no_codec)
    again, _ = T.load_coded_speech(data_cache, codec_dir, S.DEBUG_SPEC, log=lambda *_: None)
    np.testing.assert_array_equal(again.codes[3], train.codes[3])


@needs_espeak
def test_a_different_codec_gets_its_own_cache(data_cache, codec_dir, coded, tmp_path):
    paddle.seed(5)
    AudioCodec(SMALL_CODEC).save(str(tmp_path))
    from paddle_ernie5.tokenizers.audio import codec_fingerprint

    assert codec_fingerprint(str(tmp_path)) != codec_fingerprint(codec_dir)
    other, _ = T.load_coded_speech(data_cache, str(tmp_path), S.DEBUG_SPEC, log=lambda *_: None)
    assert any((a != b).any() for a, b in zip(other.codes, coded[0].codes))


def test_missing_codec_or_espeak_is_a_clear_error(tmp_path, monkeypatch, codec_dir):
    from paddle_ernie5.errors import UserError

    with pytest.raises(UserError, match="recipes/audio_codec.yaml"):
        T.load_coded_speech(str(tmp_path), str(tmp_path / "none"), S.DEBUG_SPEC)
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(S.EspeakMissing, match="apt-get install -y espeak-ng"):
        T.load_coded_speech(str(tmp_path), codec_dir, S.DEBUG_SPEC, log=lambda *_: None)


@needs_espeak
def test_training_split_holds_only_training_voices(ctx, coded):
    assert T.coded_speech(ctx) is coded[0]
    ctx.split = "val"
    assert T.coded_speech(ctx) is coded[1]
    assert not set(coded[0].voices) & set(S.DEBUG_SPEC.eval_voices)


@needs_espeak
def test_asr_document_layout(ctx):
    source = mixture.SOURCES["asr"](ctx)
    i = 4
    head, audio, tail = source.document(i, np.random.default_rng(0))
    codes = source.codes(i)
    f = len(codes)
    words = ctx.text(source.data.texts[i])
    assert codes.shape[1] == 2
    assert head.input_ids.tolist() == [ctx.tokenizer.bos_id, ctx.special_id("<boa>")]
    assert (audio.token_types == 3).all() and (audio.blocks is None)
    np.testing.assert_array_equal(audio.extras["audio_codes"], codes)
    assert tail.input_ids.tolist() == [ctx.special_id("<eoa>")] + words + [ctx.tokenizer.eos_id]
    # loss on the transcript only
    assert tail.labels.tolist() == words + [ctx.tokenizer.eos_id, IGNORE]
    assert (head.labels == IGNORE).all() and (audio.labels == IGNORE).all()
    positions = np.concatenate([s.positions for s in (head, audio, tail)], axis=1)
    np.testing.assert_array_equal(positions, np.tile(np.arange(3 + f + len(words) + 1), (3, 1)))
    assert all(s.extras["audio_target_mask"].sum() == 0 for s in (head, audio, tail))


@needs_espeak
def test_asr_prompt_puts_a_question_before_the_transcript(debug_config, codec_dir, coded, ctx):
    cfg = debug_config(
        "model.modalities=[text,audio]",
        f"model.audio.codec_dir={codec_dir}",
        "model.audio.levels=2",
        "model.audio.codebook_size=16",
        "model.audio.embed_dim=8",
        "model.audio.asr_prompt='What is said?'",
        "data.mixture.asr=1.0",
    )
    c = mixture.MixtureContext(cfg, ctx.tokenizer, "train", ctx.text_docs, {"coded_speech": coded})
    source = mixture.SOURCES["asr"](c)
    i = 4
    _, audio, tail = source.document(i, np.random.default_rng(0))
    question, answer = ctx.text("What is said?"), ctx.text(" " + source.data.texts[i])
    eos = ctx.tokenizer.eos_id
    assert tail.input_ids.tolist() == [ctx.special_id("<eoa>")] + question + answer + [eos]
    # only the transcript and <eos> are targets; the question is context, like a QA question
    assert tail.labels.tolist() == [IGNORE] * len(question) + answer + [eos, IGNORE]
    assert int(tail.positions[0, 0]) == 2 + len(source.codes(i)) == 2 + len(audio.input_ids)


@needs_espeak
def test_tts_document_layout(ctx):
    source = mixture.SOURCES["tts"](ctx)
    i = 2
    head, audio, tail = source.document(i, np.random.default_rng(0))
    codes = source.codes(i)
    f, k = len(codes), ctx.cfg.model.audio.codebook_size
    words = ctx.text(source.data.texts[i])
    assert head.input_ids.tolist() == [ctx.tokenizer.bos_id] + words + [ctx.special_id("<boa>")]
    assert tail.input_ids.tolist() == [ctx.special_id("<eoa>")]
    targets = np.concatenate([s.extras["audio_targets"] for s in (head, audio, tail)])
    mask = np.concatenate([s.extras["audio_target_mask"] for s in (head, audio, tail)])
    start = len(words) + 1  # <boa>
    np.testing.assert_array_equal(targets[start : start + f], codes)  # <boa> and frames: next frame
    # the last frame predicts <eoa> on level 0 only
    assert targets[start + f, 0] == k and mask[start + f].tolist() == [1.0, 0.0]
    assert (
        mask[start : start + f].all()
        and mask[:start].sum() == 0
        and mask[start + f + 1 :].sum() == 0
    )
    assert all((s.labels == IGNORE).all() for s in (head, audio, tail))


@needs_espeak
def test_a_packed_speech_batch_trains_the_model(ctx):
    from paddle_ernie5.model.inputs import to_model_batch
    from paddle_ernie5.model.losses import compute_loss
    from paddle_ernie5.model.model import Ernie5Model

    loader = mixture.MixtureLoader(ctx, 3, seed=1)
    np_batch = loader.batch_at(0)
    assert {"asr", "tts"} & set(loader.last_sources)
    assert np_batch["audio_codes"].shape == (3, ctx.cfg.data.seq_len, 2)
    assert np_batch["mask_causal"] is False
    audio = np_batch["token_types"] == 3
    # audio frames are causal: UTE_j = j
    assert (np_batch["startend_row_indices"][:, 0, :, 1][audio] == np.nonzero(audio)[1]).all()
    paddle.seed(0)
    model = Ernie5Model(ctx.cfg.model)
    batch = to_model_batch(np_batch)
    out = model(batch)
    heads = model.head_losses(out, batch)
    if "tts" in loader.last_sources:
        assert float(heads["audio/level0"][1]) > 0
    parts = compute_loss(out, batch["labels"], ctx.cfg.model, heads)
    parts.total.backward()
    assert model.embed.by_modality["audio"].tables.grad is not None
