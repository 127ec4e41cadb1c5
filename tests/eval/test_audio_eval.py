"""Speech evaluation and `ernie5 generate` audio options on a debug model with a random small
codec."""

import os
import shutil
import wave

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import AudioCodecConfig
from paddle_ernie5.data import audio_sources as T
from paddle_ernie5.data import mixture
from paddle_ernie5.data import speech as S
from paddle_ernie5.eval import audio as EA
from paddle_ernie5.tokenizers.audio import AudioCodec

pytestmark = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng is not installed: run `make espeak`"
)
SMALL_CODEC = AudioCodecConfig(
    levels=2, codebook_size=16, code_dim=8, channels=16, res_blocks=0, griffin_lim_iters=2
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from paddle_ernie5.eval.speech_judge import SpeechJudge

    paddle.seed(3)
    root = tmp_path_factory.mktemp("audio_eval")
    AudioCodec(SMALL_CODEC).save(str(root / "codec"))
    SpeechJudge(channels=8).save(str(root / "judge"))
    return str(root / "codec"), str(root / "judge")


@pytest.fixture
def cfg(debug_config, dirs, monkeypatch, request):
    monkeypatch.setattr(T, "SPEECH_SPEC", S.DEBUG_SPEC)
    codec, judge = dirs
    prompt = getattr(request, "param", "")
    return debug_config(
        f"model.audio.asr_prompt={prompt!r}",
        "model.modalities=[text,audio]",
        f"model.audio.codec_dir={codec}",
        f"model.audio.judge={judge}",
        "model.audio.levels=2",
        "model.audio.codebook_size=16",
        "model.audio.embed_dim=8",
        "model.audio.init_from_codebooks=true",
        "model.audio.max_frames=5",
        "data.mixture.asr=1.0",
        "data.mixture.tts=1.0",
    )


def _tokenizer(cfg):
    from paddle_ernie5.data.text import get_text_tokenizer

    return get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.train.seed, cfg.data.val_fraction
    )


def test_metrics_are_reported_beside_chance(cfg):
    from paddle_ernie5.model.model import Ernie5Model

    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    m = EA.audio_metrics(cfg, model, _tokenizer(cfg), log=lambda *_: None)
    spec = S.DEBUG_SPEC
    words = sum(t in S.WORDS for t in spec.texts)
    assert m["audio/asr_utterances"] == words * len(spec.eval_voices) * spec.eval_renditions
    assert m["audio/asr_chance"] == m["audio/tts_chance"] == pytest.approx(1 / 18)
    assert 0 <= m["audio/asr_word_acc"] <= 1 and 0 <= m["audio/tts_judge_acc"] <= 1
    assert m["audio/tts_samples"] == 2 * len(S.WORDS)
    assert 0 <= m["audio/tts_mean_seconds"] <= 5 * 0.04 + 1e-9
    rows = EA.report_rows(m)
    assert "ASR word accuracy" in rows and "TTS intelligibility" in rows and "chance 0.056" in rows


@pytest.mark.parametrize("cfg", ["", "What is said?"], indirect=True)
def test_transcription_prompt_is_the_training_layout(cfg):
    """The first transcript token greedy decoding picks equals the argmax of the text logits at
    <eoa> in a packed ASR training document (same tokens, types, positions and audio codes)."""
    from paddle_ernie5.data.multimodal import pack_segments
    from paddle_ernie5.model.generation import generate
    from paddle_ernie5.model.inputs import to_model_batch
    from paddle_ernie5.model.model import Ernie5Model

    tok = _tokenizer(cfg)
    mixture.load_source_modules()
    source = mixture.SOURCES["asr"](mixture.MixtureContext(cfg, tok, "val"))
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    model.eval()
    for i in (0, 5):
        doc = source.document(i, np.random.default_rng(0))
        batch = to_model_batch(pack_segments([doc], cfg.data.seq_len, tok.pad_id))
        # the last prompt position: <eoa>, or the end of the question after it
        last = 2 + len(source.codes(i)) + len(T.asr_question(tok, cfg.model.audio.asr_prompt))
        logits = model(batch, with_mtp=False).logits.numpy()[0, last]
        expected = int(logits.argmax())
        n = last + 1
        got = generate(
            model,
            batch["input_ids"].numpy()[:, :n],
            1,
            temperature=0.0,
            prompt_extras={
                "token_types": batch["token_types"].numpy()[:, :n],
                "audio_codes": batch["audio_codes"].numpy()[:, :n],
            },
        )
        assert int(got.tokens[0, 0]) == expected
        said = EA.transcribe(model, tok, cfg, [source.codes(i)], max_tokens=1)[0]
        assert said == tok.decode([expected]).strip() if expected != tok.eos_id else said == ""


def test_wav_round_trip(tmp_path):
    x = (0.5 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    EA.write_wav(str(tmp_path / "a.wav"), x, 16000)
    np.testing.assert_allclose(EA.read_wav(str(tmp_path / "a.wav")), x, atol=1e-4)
    with wave.open(str(tmp_path / "b.wav"), "wb") as f:  # 8 kHz stereo is resampled and averaged
        f.setnchannels(2), f.setsampwidth(2), f.setframerate(8000)
        f.writeframes((np.stack([x[:4000], x[:4000]], 1) * 32767).astype(np.int16).tobytes())
    assert abs(len(EA.read_wav(str(tmp_path / "b.wav"))) - 8000) <= 1


def test_trained_run_generates_speech_and_transcribes_it(cfg, tmp_path, capsys):
    """Two training steps on the speech mixture (eval at the end logs generated speech), then
    `ernie5 generate --speech` writes a WAV of whole codec frames and `--transcribe` reads it
    back."""
    from paddle_ernie5 import cli
    from paddle_ernie5.config import replace
    from paddle_ernie5.train.trainer import Trainer

    run_cfg = replace(
        cfg, train=replace(cfg.train, max_steps=2, eval_every=2, save_every=2, visualdl=True)
    )
    Trainer(run_cfg, log=lambda *_: None).fit()
    run = run_cfg.train.run_dir
    assert any(n.startswith("vdlrecords") for n in os.listdir(os.path.join(run, "vdl")))
    out = str(tmp_path / "say.wav")
    argv = ["generate", "--checkpoint", run, "--speech", "seven", "--out", out]
    assert cli.main([*argv, "--temperature", "1.0"]) == 0
    with wave.open(out) as f:
        assert (
            f.getframerate() == 16000
            and f.getnframes() % 640 == 0
            and 0 < f.getnframes() <= 5 * 640
        )
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", run, "--transcribe", out]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert (
        cli.main(["generate", "--checkpoint", run, "--transcribe", str(tmp_path / "none.wav")]) == 2
    )
    assert "no such file" in capsys.readouterr().err


def test_visualdl_gets_generated_speech_and_per_source_routing_heatmaps(cfg):
    """A 3-step run of a speech model: VisualDL's reader finds the audio and the per-source
    images."""
    import glob

    from visualdl import LogReader

    from paddle_ernie5.config import replace
    from paddle_ernie5.train.trainer import Trainer

    run = replace(
        cfg,
        train=replace(
            cfg.train, visualdl=True, max_steps=3, warmup_steps=1, eval_every=3, save_every=3
        ),
        data=replace(cfg.data, eval_batches=1),
    )
    Trainer(run, log=lambda *_: None).fit()
    tags = LogReader(file_path=glob.glob(os.path.join(run.train.run_dir, "vdl", "*"))[0]).get_tags()
    assert {"samples/speech/seven", "samples/speech/blue"} <= set(tags["audio"])
    assert {
        "routing/usage_layers_x_experts/text",
        "routing/usage_layers_x_experts/audio_understanding",
        "routing/usage_layers_x_experts/audio_generation",
    } <= set(tags["image"])
    assert {"loss/audio/level0", "loss/audio/level1"} <= set(tags["scalar"])
