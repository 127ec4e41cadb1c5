"""Patch-merger pre-training (component vision_merger) and starting a multimodal run from it."""

import numpy as np
import paddle
import pytest
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5 import config as C
from paddle_ernie5.errors import UserError
from paddle_ernie5.model.model import Ernie5Model
from paddle_ernie5.train import vision_merger as VM
from paddle_ernie5.train.pretrained import init_fresh, init_layer_fresh, read_merger


@pytest.fixture(scope="module")
def merger_run(data_cache, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("merger"))
    tok_dir = tiny_tokenizer(folder)
    cfg = vision_config(
        data_cache,
        folder + "/run",
        tok_dir,
        "component=vision_merger",
        "train.progress=false",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "train.batch_size=4",
        "vision_merger.image_attributes=[digit]",
        "vision_merger.video_attributes=[direction,speed,fg]",
    )
    return cfg, VM.train_from_config(cfg), tok_dir


def test_pretraining_reports_each_configured_head_beside_chance(merger_run):
    cfg, metrics, _ = merger_run
    assert metrics["image_digit_chance"] == 0.1 and metrics["video_direction_chance"] == 0.25
    assert metrics["video_speed_chance"] == 0.5 and metrics["video_fg_chance"] == 0.125
    assert not any(k.startswith("image_fg") or k.startswith("video_digit") for k in metrics)
    # 3 steps: only the range; test_pretraining_learns_every_head_above_chance trains for it
    assert all(0 <= metrics[k] <= 1 for k in metrics if k.endswith("_acc"))


def test_pretraining_learns_every_head_above_chance(data_cache, tmp_path):
    """400 steps on a fixed seed: every configured head well above chance on the held-out split
    (digit 0.35, direction 0.35, speed 0.65, colour 0.50 when written)."""
    cfg = vision_config(
        data_cache,
        str(tmp_path / "run"),
        tiny_tokenizer(data_cache),
        "component=vision_merger",
        "train.progress=false",
        "train.max_steps=400",
        "train.warmup_steps=1",
        "train.batch_size=32",
        "train.lr=0.01",
        "vision_merger.image_attributes=[digit]",
        "vision_merger.video_attributes=[direction,speed,fg]",
    )
    metrics = VM.train_from_config(cfg)
    heads = [k[: -len("_acc")] for k in metrics if k.endswith("_acc")]
    assert sorted(heads) == ["image_digit", "video_direction", "video_fg", "video_speed"]
    for head in heads:
        assert metrics[f"{head}_acc"] > metrics[f"{head}_chance"] + 0.06, (head, metrics)


def test_a_fresh_run_starts_from_the_pretrained_mergers(merger_run, data_cache, tmp_path):
    cfg, _, tok_dir = merger_run
    saved = read_merger(cfg.train.run_dir)
    run_cfg = vision_config(
        data_cache, str(tmp_path / "mm"), tok_dir, f"model.vision.merger_init={cfg.train.run_dir}"
    )
    paddle.seed(5)
    model = Ernie5Model(run_cfg.model)
    notes = init_fresh(model)
    assert sum(bool(n) for n in notes) == 2  # image and video
    for kind in ("image", "video"):
        own = model.embed.by_modality[kind].state_dict()
        loaded = [k for k in own if k.startswith(("merger.", "place."))]
        assert "merger.place_proj.weight" in loaded
        for k in loaded:
            np.testing.assert_array_equal(own[k].numpy(), saved[kind][k])
        own_bits, saved_bits = own["bits.weight"].numpy(), saved[kind]["bits.weight"]
        assert not np.array_equal(own_bits, saved_bits)  # not loaded


def test_a_missing_or_misfitting_merger_run_is_a_clear_error(merger_run, data_cache, tmp_path):
    cfg, _, tok_dir = merger_run
    for override, needle in (
        (f"model.vision.merger_init={tmp_path}", "no merger.safetensors there"),
        (f"model.vision.merger_init={cfg.train.run_dir}", "does not fit this model"),
    ):
        extra = ["model.vision.merger_width=32"] if "fit" in needle else []
        model = Ernie5Model(
            vision_config(data_cache, str(tmp_path / "mm"), tok_dir, override, *extra).model
        )
        with pytest.raises(UserError, match=needle):
            init_layer_fresh(model.embed.by_modality["image"])


def test_unknown_attributes_are_refused(data_cache, tmp_path):
    with pytest.raises(C.ConfigError, match="vision_merger.image_attributes"):
        vision_config(
            data_cache, str(tmp_path), str(tmp_path), "vision_merger.image_attributes=[direction]"
        )


def test_frozen_kinds_keep_their_pretrained_merger(merger_run, data_cache, tmp_path):
    cfg, _, tok_dir = merger_run
    run_cfg = vision_config(
        data_cache,
        str(tmp_path / "mm"),
        tok_dir,
        f"model.vision.merger_init={cfg.train.run_dir}",
        "model.vision.freeze_merger=[video]",
    )
    model = Ernie5Model(run_cfg.model)
    video, image = (model.embed.by_modality[k] for k in ("video", "image"))
    assert all(p.stop_gradient for p in video.merger.parameters() + video.place.parameters())
    assert not any(p.stop_gradient for p in image.merger.parameters())
    assert not video.bits.weight.stop_gradient  # generation inputs keep training
    # Three optimizer steps on both QA sources: the frozen video merger keeps the pre-trained
    # weights exactly (no update, no weight decay); the image merger, trained, moves.
    from paddle_ernie5.train.trainer import Trainer

    train_cfg = vision_config(
        data_cache,
        str(tmp_path / "fit"),
        tok_dir,
        f"model.vision.merger_init={cfg.train.run_dir}",
        "model.vision.freeze_merger=[video]",
        "data.mixture.image_qa=1",
        "data.mixture.video_qa=1",
        "train.max_steps=3",
        "train.warmup_steps=1",
        "train.save_every=3",
        "train.eval_every=3",
        "data.eval_batches=1",
        "train.weight_decay=0.1",
    )
    trainer = Trainer(train_cfg, log=lambda *_: None)
    saved = read_merger(cfg.train.run_dir)
    trainer.fit()
    by_kind = trainer.model.embed.by_modality
    video_now, image_now = by_kind["video"].state_dict(), by_kind["image"].state_dict()
    for k in (k for k in saved["video"] if k.startswith(("merger.", "place."))):
        np.testing.assert_array_equal(video_now[k].numpy(), saved["video"][k], err_msg=k)
    assert not np.array_equal(
        image_now["merger.out.weight"].numpy(), saved["image"]["merger.out.weight"]
    )
    for bad in ("model.vision.freeze_merger=[audio]", "model.vision.freeze_merger=[image]"):
        with pytest.raises(C.ConfigError, match="model.vision.freeze_merger"):
            extra = [f"model.vision.merger_init={cfg.train.run_dir}"] if "audio" in bad else []
            vision_config(data_cache, str(tmp_path), tok_dir, bad, *extra)


def test_a_kind_the_run_did_not_pretrain_starts_random(data_cache, tmp_path):
    tok_dir = tiny_tokenizer(str(tmp_path))
    cfg = vision_config(
        data_cache,
        str(tmp_path / "vm"),
        tok_dir,
        "component=vision_merger",
        "train.progress=false",
        "train.max_steps=1",
        "train.warmup_steps=1",
        "train.batch_size=2",
        "vision_merger.image_attributes=[]",
    )
    metrics = VM.train_from_config(cfg)
    assert not any(k.startswith("image_") for k in metrics)
    model = Ernie5Model(
        vision_config(
            data_cache,
            str(tmp_path / "mm"),
            tok_dir,
            f"model.vision.merger_init={cfg.train.run_dir}",
        ).model
    )
    assert "starts random" in init_layer_fresh(model.embed.by_modality["image"])
    assert "initialised from" in init_layer_fresh(model.embed.by_modality["video"])
    frozen = Ernie5Model(
        vision_config(
            data_cache,
            str(tmp_path / "mm"),
            tok_dir,
            f"model.vision.merger_init={cfg.train.run_dir}",
            "model.vision.freeze_merger=[image]",
        ).model
    )
    with pytest.raises(UserError, match="pre-trained no image merger"):  # a fixed random merger
        init_layer_fresh(frozen.embed.by_modality["image"])
    saved = read_merger(cfg.train.run_dir)
    assert set(saved) == {"video"}  # only the pre-trained kind is built and saved
