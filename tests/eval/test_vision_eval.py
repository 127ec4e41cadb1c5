"""Vision metrics and `ernie5 generate` on a debug multimodal run (random tiny tokenizer and
judge)."""

import os

import numpy as np
import paddle
import pytest
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5.cli import main


@pytest.fixture(scope="module")
def run(data_cache, tmp_path_factory):
    from paddle_ernie5.config import VisionJudgeConfig
    from paddle_ernie5.eval.vision_judge import VisionJudge
    from paddle_ernie5.train.trainer import Trainer

    folder = str(tmp_path_factory.mktemp("vision_run"))
    paddle.seed(0)
    judge = VisionJudge(VisionJudgeConfig(image_size=8, width=4))
    judge.save(os.path.join(folder, "judge"))
    cfg = vision_config(
        data_cache,
        folder + "/run",
        tiny_tokenizer(folder),
        "data.mixture.image_gen=1",
        "data.mixture.image_qa=1",
        "data.mixture.video_gen=1",
        "data.mixture.video_qa=1",
        f"model.vision.judge={folder}/judge",
        "train.max_steps=2",
        "train.save_every=2",
        "train.eval_every=2",
        "data.eval_batches=1",
    )
    Trainer(cfg, log=lambda *_: None).fit()
    return cfg, folder


def test_vision_metrics_have_chance_levels_and_table_rows(run):
    from paddle_ernie5.data.text import get_text_tokenizer
    from paddle_ernie5.eval import vision_eval
    from paddle_ernie5.eval.runner import load_model

    cfg, folder = run
    cfg, model = load_model(cfg.train.run_dir, log=lambda *_: None)
    tok = get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.train.seed, cfg.data.val_fraction
    )
    m = vision_eval.vision_metrics(cfg, model, tok, max_items=3, log=lambda *_: None)
    assert m["vision/image_qa_items"] == 3 and m["vision/t2i_prompts"] == 3
    assert (
        m["vision/image_qa_digit_chance"] == 0.1 and m["vision/video_qa_direction_chance"] == 0.25
    )
    assert m["vision/video_qa_speed_chance"] == 0.5
    assert m["vision/t2i_all_chance"] == pytest.approx(1 / 480)
    for key in (
        "vision/image_qa_digit",
        "vision/t2i_all",
        "vision/t2i_digit",
        "vision/video_qa_direction",
        "vision/video_qa_speed",
    ):
        assert 0.0 <= m[key] <= 1.0 and m[key] * 3 == pytest.approx(round(m[key] * 3)), key
    assert m["vision/t2v_clips"] == 3 and m["vision/t2v_direction_chance"] == 0.25
    for key in ("t2v", "judge_real_video", "judge_recon_video"):
        x = m[f"vision/{key}_direction"]
        assert 0.0 <= x <= 1.0 and x * 3 == pytest.approx(round(x * 3)), key
    for k in ("digit", "fg", "bg"):
        assert 0.0 <= m[f"vision/judge_real_image_{k}"] <= 1.0
    rows = vision_eval.report_rows(m)
    assert rows.count("| chance ") == 20 and "video QA: direction" in rows
    assert "video QA: speed" in rows
    assert "text->video judged: direction" in rows and "judge on real held-out images" in rows


def test_sampled_judging_and_caption_information(run):
    import dataclasses

    from paddle_ernie5.data.text import get_text_tokenizer
    from paddle_ernie5.data.vision_sources import encoded_digits
    from paddle_ernie5.eval import vision_eval
    from paddle_ernie5.eval.runner import load_model

    cfg, _ = run
    cfg, model = load_model(cfg.train.run_dir, log=lambda *_: None)
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, vision=dataclasses.replace(cfg.model.vision, judge_samples=2)
        ),
    )
    tok = get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.train.seed, cfg.data.val_fraction
    )
    m = vision_eval.vision_metrics(cfg, model, tok, max_items=3, log=lambda *_: None)
    assert m["vision/t2i_sampled_images"] == 6
    assert m["vision/t2i_sampled_all_chance"] == pytest.approx(1 / 480)
    for k in ("digit", "fg", "bg", "all"):
        x = m[f"vision/t2i_sampled_{k}"]
        assert 0.0 <= x <= 1.0 and x * 6 == pytest.approx(round(x * 6)), k
    # Captions differ in length, so a batch pads rows: batched and one image at a time agree.
    data = encoded_digits(cfg, "image", "heldout")
    key = "vision/t2i_caption_nats"
    batched = vision_eval.caption_information(model, cfg, tok, data, 6)[key]
    single = vision_eval.caption_information(model, cfg, tok, data, 6, batch=1)[key]
    uneven = vision_eval.caption_information(model, cfg, tok, data, 6, batch=4)[key]
    assert batched == pytest.approx(single, abs=1e-5) and uneven == pytest.approx(single, abs=1e-5)
    assert abs(batched) > 1e-6
    three = vision_eval.caption_information(model, cfg, tok, data, 3)[key]
    assert m[key] == pytest.approx(three, abs=1e-6)


def test_sampled_images_are_judged_against_their_own_captions(run, monkeypatch):
    import dataclasses

    from paddle_ernie5.eval import vision_eval, vision_judge

    cfg, _ = run
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model, vision=dataclasses.replace(cfg.model.vision, judge_samples=2)
        ),
    )
    combos = vision_eval.heldout_combos(cfg.model.vision.heldout_combo_fraction)[:3]

    # Image = (caption index, sample): greedy is sample 0, sampled seeds 1000, 2000 are 1 and 2.
    def fake_generate(model, cfg, tokenizer, tok, captions, temperature=0.0, seed=0, **_):
        s = 0 if temperature == 0 else seed // 1000
        return np.array([[[[i, s]]] for i in range(len(captions))], np.float32)

    class FakeJudge:  # digit right only for caption 0, colour always, background only in sample 1
        def predict(self, images):
            i, s = images[:, 0, 0].astype(int), images[:, 0, 1].astype(int)
            truth = np.array(combos)[i]
            return {
                "digit": np.where(i == 0, truth[:, 0], -1),
                "fg": truth[:, 1],
                "bg": np.where(s == 1, truth[:, 2], -1),
            }

    monkeypatch.setattr(vision_eval, "generate_images", fake_generate)
    monkeypatch.setattr(vision_judge.VisionJudge, "load", staticmethod(lambda path: FakeJudge()))
    m = vision_eval.text_to_image_judged(None, cfg, None, None, max_items=3)
    assert m["vision/t2i_digit"] == pytest.approx(1 / 3) and m["vision/t2i_bg"] == 0.0
    assert m["vision/t2i_sampled_images"] == 6
    assert m["vision/t2i_sampled_digit"] == pytest.approx(1 / 3)
    assert m["vision/t2i_sampled_fg"] == 1.0
    assert m["vision/t2i_sampled_bg"] == pytest.approx(1 / 2)
    assert m["vision/t2i_sampled_all"] == pytest.approx(1 / 6)  # caption 0 in sample 1


def test_candidate_ranking_picks_the_most_likely_answer(run, monkeypatch):
    from paddle_ernie5.data.text import get_text_tokenizer
    from paddle_ernie5.data.vision_sources import encoded_digits
    from paddle_ernie5.eval import vision_eval
    from paddle_ernie5.eval.runner import load_model

    cfg, _ = run
    cfg, model = load_model(cfg.train.run_dir, log=lambda *_: None)
    tok = get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.train.seed, cfg.data.val_fraction
    )
    data = encoded_digits(cfg, "image", "heldout")
    question = "What colour is the digit?"
    # A scorer that prefers "blue" everywhere: accuracy is the share of blue digits.
    n = 8
    blue = vision_eval.COLOURS.index("blue")
    monkeypatch.setattr(
        vision_eval,
        "target_logprobs",
        lambda model, docs, batch=96: np.tile(np.eye(8)[blue], len(docs) // 8),
    )
    items = [(i, question, vision_eval.COLOURS[data.labels["fg"][i]]) for i in range(n)]
    acc = vision_eval.qa_accuracy(model, cfg, tok, "image", data.feats, items)
    assert acc == pytest.approx(np.mean(data.labels["fg"][:n] == blue))


def test_generate_writes_png_and_gif_and_answers(run, tmp_path, capsys):
    from PIL import Image

    cfg, _ = run
    ckpt = cfg.train.run_dir
    out = str(tmp_path / "gen")
    prompts = ["a red 3 on a blue background", "a green 7 on a white background"]
    argv = ["generate", "--checkpoint", ckpt, "--prompt", prompts[0], "--prompt", prompts[1]]
    assert main([*argv, "--out", out, "--cfg-scale", "2"]) == 0
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pngs == ["image_000.png", "image_001.png"]
    assert Image.open(os.path.join(out, pngs[0])).size == (64, 64)  # 8 x 8 pixels, upscaled 8x
    prompt = "a red 3 moving left slowly on a blue background"
    argv = ["generate", "--checkpoint", ckpt, "--video", "--prompt", prompt]
    assert main([*argv, "--out", out, "--temperature", "1"]) == 0
    gif = Image.open(os.path.join(out, "video_000.gif"))
    assert gif.n_frames == cfg.model.vision.video_frames
    capsys.readouterr()
    image = os.path.join(out, pngs[0])
    argv = ["generate", "--checkpoint", ckpt, "--image", image, "--question", "What digit is this?"]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("What digit is this?")
    assert main(["generate", "--checkpoint", ckpt]) == 2


def test_visualdl_gets_generated_images_and_per_source_routing_heatmaps(data_cache, tmp_path):
    import glob

    from visualdl import LogReader

    from paddle_ernie5.train.trainer import Trainer

    cfg = vision_config(
        data_cache,
        str(tmp_path / "run"),
        tiny_tokenizer(str(tmp_path)),
        "data.mixture.image_gen=1",
        "data.mixture.image_qa=1",
        "train.visualdl=true",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "train.save_every=3",
        "data.eval_batches=1",
    )
    Trainer(cfg, log=lambda *_: None).fit()
    reader = LogReader(file_path=glob.glob(str(tmp_path / "run" / "vdl" / "*"))[0])
    tags = reader.get_tags()
    assert {
        "samples/image",
        "routing/usage_layers_x_experts/image_generation",
        "routing/usage_layers_x_experts/image_understanding",
    } <= set(tags["image"])
    assert "loss/image_bits" in tags["scalar"]


def test_routing_report_runs_on_a_debug_checkpoint(run, tmp_path):
    from paddle_ernie5.eval.runner import routing_report

    cfg, folder = run
    out = tmp_path / "report"
    text = routing_report(cfg.train.run_dir, str(out), max_batches=1, log=lambda *_: None)
    for name in ("usage_heatmaps.png", "iou_top25.png", "entropy.png", "report.md"):
        assert (out / name).stat().st_size > 0
    for source in ("image understanding", "video generation", "text/"):
        assert source in text
    assert "| image understanding vs video understanding | 0.98 / 0.52 / 0.64 | " in text
    assert "not measurable" in text  # no audio in this model: text vs audio cannot be measured


def test_generated_clips_are_judged_against_their_own_captions(run, monkeypatch):
    from paddle_ernie5.data.vision_sources import encoded_digits
    from paddle_ernie5.eval import vision_eval, vision_judge

    cfg, _ = run
    data = encoded_digits(cfg, "video", "heldout")
    direction = data.labels["direction"][:3]

    # Generated clip i is marked by a negative pixel -1 - i; real and reconstructed clips are not.
    def fake_generate(model, cfg, tokenizer, tok, captions, kind="image", **_):
        assert kind == "video" and len(captions) == 3
        x = np.zeros([len(captions), 4, 3, 2, 2], np.float32)
        x[:, 0, 0, 0, 0] = -1 - np.arange(len(captions))
        return x

    class FakeJudge:  # generated: direction right only for clip 0; real and reconstructed: right
        cfg = vision_judge.VisionJudgeConfig(image_size=8, width=4)

        def predict(self, clips):
            marks = np.asarray(clips)[:, 0, 0, 0, 0]
            wrong = (direction + 1) % 4
            got = np.where((marks < 0) & (marks != -1), wrong, direction)
            return {
                "direction": got,
                **{k: data.labels[k][:3] for k in ("digit", "fg", "bg")},
                "speed": np.searchsorted((1, 2), data.labels["speed"][:3]),
            }

    monkeypatch.setattr(vision_eval, "generate_images", fake_generate)
    monkeypatch.setattr(
        vision_eval, "decode_tokens", lambda tok, t, s: np.zeros([len(t), 4, 3, 2, 2], np.float32)
    )
    monkeypatch.setattr(vision_judge.VisionJudge, "load", staticmethod(lambda path: FakeJudge()))
    m = vision_eval.text_to_video_judged(None, cfg, None, None, data, 3)
    assert m["vision/t2v_direction"] == pytest.approx(1 / 3)
    assert m["vision/judge_real_video_direction"] == 1.0
    assert m["vision/judge_recon_video_direction"] == 1.0
    assert m["vision/t2v_digit"] == 1.0 and m["vision/t2v_speed"] == 1.0


def test_clips_are_sampled_at_their_own_guidance_scale(run, monkeypatch):
    from dataclasses import replace

    from paddle_ernie5.config import ConfigError
    from paddle_ernie5.eval import vision_eval

    cfg, _ = run
    seen = []

    def fake_sample(model, prompt, kind, *, cfg_scale, **_):
        seen.append((kind, cfg_scale))
        frames = 1 if kind == "image" else cfg.model.vision.video_frames
        return np.ones([len(prompt), frames, 1, cfg.model.vision.bits], np.float32)

    monkeypatch.setattr(vision_eval, "sample_visual", fake_sample)
    monkeypatch.setattr(
        vision_eval, "decode_tokens", lambda tok, t, s: np.zeros([len(t), t.shape[1], 3, 2, 2])
    )
    tokenizer = type(
        "T", (), {"bos_id": 2, "eos_id": 3, "encode": staticmethod(lambda s: [5] * len(s.split()))}
    )()
    v = replace(cfg.model.vision, cfg_scale=1.5, video_cfg_scale=2.5)
    guided = replace(cfg, model=replace(cfg.model, vision=v))
    for kind in ("image", "video"):
        vision_eval.generate_images(None, guided, tokenizer, None, ["a b", "c d"], kind=kind)
        vision_eval.generate_images(
            None, guided, tokenizer, None, ["a b"], kind=kind, cfg_scale=4.0
        )
    assert seen == [("image", 1.5), ("image", 4.0), ("video", 2.5), ("video", 4.0)]
    # 0 (the default): clips take cfg_scale; images never read video_cfg_scale
    assert replace(v, video_cfg_scale=0.0).guidance_scale("video") == 1.5
    assert cfg.model.vision.guidance_scale("video") == cfg.model.vision.cfg_scale == 1.0
    with pytest.raises(ConfigError, match="video_cfg_scale"):
        replace(v, video_cfg_scale=-1.0).validate("model.vision")
