import json
import os

import numpy as np
import pytest

from paddle_ernie5.io import checkpoint
from paddle_ernie5.optim.schedules import learning_rate
from paddle_ernie5.train.trainer import Trainer, read_metrics

LOSS_KEYS = ("loss", "loss/text", "loss/mtp", "train/grad_norm")


def _losses(run_dir):
    return {m["step"]: tuple(m[k] for k in LOSS_KEYS) for m in read_metrics(run_dir) if "loss" in m}


def test_interrupted_and_resumed_run_reproduces_losses_exactly(debug_config, tmp_path):
    full = debug_config("train.save_every=3", f"train.run_dir={tmp_path / 'full'}")
    Trainer(full, log=lambda *_: None).fit()
    part = debug_config("train.save_every=3", f"train.run_dir={tmp_path / 'part'}")
    # "Crash" after step 5 (checkpoints at 3 and 5).
    Trainer(part, log=lambda *_: None).fit(stop_at=5)
    assert len(checkpoint.list_checkpoints(str(tmp_path / "part" / "checkpoints"))) == 2
    logs = []
    resumed = Trainer(part, log=logs.append)
    resumed.fit()
    assert any("resumed from" in l and "step_00000005" in l for l in logs)
    a, b = _losses(str(tmp_path / "full")), _losses(str(tmp_path / "part"))
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(1, 9))
    assert a == b  # bit-exact, every step including the resumed ones


def test_truncated_checkpoint_is_refused_and_the_previous_one_is_used(debug_config, tmp_path):
    cfg = debug_config("train.save_every=2", "train.max_steps=4", "train.keep_last=3")
    Trainer(cfg, log=lambda *_: None).fit()
    root = os.path.join(cfg.train.run_dir, "checkpoints")
    ckpts = checkpoint.list_checkpoints(root)
    assert [os.path.basename(c) for c in ckpts] == ["step_00000002", "step_00000004"]
    target = os.path.join(ckpts[-1], "model.safetensors")
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load(ckpts[-1])
    warnings = []
    trainer = Trainer(cfg, log=warnings.append)
    assert trainer.try_resume()
    assert trainer.step == 2
    assert any(
        "checkpoint step_00000004 is damaged (model.safetensors is corrupt or truncated" in w
        and w.endswith("; using step_00000002")
        for w in warnings
    )
    assert os.path.exists(target)  # refused, not deleted


def test_checkpoint_keep_last_and_atomic_layout(debug_config):
    cfg = debug_config("train.save_every=1", "train.max_steps=4", "train.keep_last=2")
    Trainer(cfg, log=lambda *_: None).fit()
    root = os.path.join(cfg.train.run_dir, "checkpoints")
    assert sorted(os.listdir(root)) == ["step_00000003", "step_00000004"]
    assert os.path.exists(os.path.join(cfg.train.run_dir, "config.yaml"))


def test_training_reduces_loss_and_updates_the_selection_bias(debug_config):
    cfg = debug_config(
        "train.max_steps=30",
        "train.eval_every=30",
        "train.save_every=30",
        "train.lr=0.01",
        "model.moe.bias_update_rate=0.01",
    )
    trainer = Trainer(cfg, log=lambda *_: None)
    result = trainer.fit()
    metrics = [m for m in read_metrics(cfg.train.run_dir) if "loss" in m]
    assert metrics[-1]["loss/text"] < metrics[0]["loss/text"] - 1.0
    assert result.val_loss < trainer.unigram_loss() + 0.5
    for _, moe in trainer.model.moe_layers():
        bias = moe.router.selection_bias.numpy()
        # 30 sign updates of 0.01: every entry is a multiple of 0.01 within +-0.3, and not all zero.
        np.testing.assert_allclose(bias * 100, np.round(bias * 100), atol=1e-3)
        assert np.abs(bias).max() <= 0.3 + 1e-6 and np.abs(bias).max() > 0


@pytest.mark.parametrize("schedule", ["wsd", "cosine"])
def test_schedules(debug_config, schedule):
    tc = debug_config(
        f"train.schedule={schedule}",
        "train.max_steps=100",
        "train.warmup_steps=10",
        "train.lr=1.0",
        "train.min_lr=0.1",
        "train.decay_fraction=0.2",
    ).train
    lrs = np.array([learning_rate(s, tc) for s in range(100)])
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert lrs[-1] == pytest.approx(0.1)
    assert np.all(np.diff(lrs[10:]) <= 1e-12)
    if schedule == "wsd":
        assert np.all(lrs[10:80] == 1.0) and lrs[85] < 1.0


def test_golden_losses_of_the_debug_recipe(debug_config):
    """Stored losses of the first 8 steps; a refactor that changes them must say why and
    regenerate."""
    golden = json.load(open(os.path.join(os.path.dirname(__file__), "golden_debug.json")))
    cfg = debug_config(*golden["overrides"])
    Trainer(cfg, log=lambda *_: None).fit()
    metrics = [m for m in read_metrics(cfg.train.run_dir) if "loss" in m]
    np.testing.assert_allclose([m["loss/text"] for m in metrics], golden["loss/text"], rtol=1e-5)
    np.testing.assert_allclose([m["loss/mtp"] for m in metrics], golden["loss/mtp"], rtol=1e-5)


def test_visualdl_dashboards_hold_scalars_histograms_images_text_and_hparams(debug_config):
    import glob

    from visualdl import LogReader

    cfg = debug_config("train.visualdl=true", "train.max_steps=4", "train.eval_every=4")
    Trainer(cfg, log=lambda *_: None).fit()
    files = glob.glob(os.path.join(cfg.train.run_dir, "vdl", "*"))
    assert len(files) == 1  # one log file per run
    tags = LogReader(file_path=files[0]).get_tags()
    assert {
        "loss/text",
        "loss/mtp",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "val/loss",
        "moe/entropy/layer0",
        "moe/max_over_mean/layer1",
    } <= set(tags["scalar"])
    assert {"moe/load/layer0", "moe/router_logits/layer1"} <= set(tags["histogram"])
    assert tags["image"] == ["routing/usage_layers_x_experts/text"]
    assert tags["text"] == ["samples/text"]
    assert tags["hyper_parameters"] == ["hparam"]
