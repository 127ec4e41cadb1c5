import math

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import ConfigError
from paddle_ernie5.optim.optimizer import optimizer_state
from paddle_ernie5.train.precision import Precision, plan
from paddle_ernie5.train.trainer import Trainer, read_metrics

PLANS = [
    # precision, on_gpu, world_size, dtype supported -> mode
    ("fp32", False, 1, True, "fp32"),
    ("fp32", True, 4, True, "fp32"),
    ("bf16", False, 1, True, "emulation"),
    ("bf16", False, 2, True, "emulation"),
    ("bf16", True, 1, True, "amp"),
    ("bf16", True, 8, True, "amp"),
    ("fp16", True, 1, True, "amp"),
]
REFUSED = [
    ("fp16", False, 1, True, "invalid on a CPU device"),
    ("fp16", True, 2, True, "one process"),
    ("bf16", True, 1, False, "no bfloat16 support"),
]


@pytest.mark.parametrize("precision,on_gpu,world,supported,mode", PLANS)
def test_plan(precision, on_gpu, world, supported, mode):
    assert plan(precision, on_gpu, world, supported) == mode


@pytest.mark.parametrize("precision,on_gpu,world,supported,message", REFUSED)
def test_plan_refuses_what_cannot_run(precision, on_gpu, world, supported, message):
    with pytest.raises(ConfigError, match=message):
        plan(precision, on_gpu, world, supported)


def test_fp16_on_the_cpu_is_a_config_error_before_any_work(debug_config, tmp_path):
    cfg = debug_config("train.precision=fp16", f"data.cache_dir={tmp_path / 'never_built'}")
    with pytest.raises(ConfigError, match=r"train.precision='fp16' is invalid on a CPU device"):
        Trainer(cfg, log=lambda *_: None)
    assert not (tmp_path / "never_built").exists()


def test_precision_is_validated(debug_config):
    with pytest.raises(ConfigError, match="fp32, bf16 or fp16"):
        debug_config("train.precision=fp64")
    with pytest.raises(ConfigError, match="only the pretraining trainer"):
        debug_config("train.precision=bf16", "component=sft")


def test_describe_names_the_mode_actually_used():
    assert Precision("fp32", on_gpu=False).describe() == "fp32"
    assert (
        Precision("bf16", on_gpu=False)
        .describe()
        .startswith("bf16 (CPU emulation: bf16 rounding around float32 math")
    )
    assert "auto_cast O1 in bfloat16" in Precision("bf16", on_gpu=True).describe()


def _train(cfg):
    logs = []
    trainer = Trainer(cfg, log=logs.append)
    trainer.fit()
    losses = [m["loss"] for m in read_metrics(cfg.train.run_dir) if "loss" in m]
    return trainer, losses, logs


def test_bf16_emulation_trains_with_float32_masters(debug_config, tmp_path):
    steps = ("train.max_steps=3", "train.eval_every=3", "train.save_every=3")
    _, fp32, _ = _train(debug_config(*steps, f"train.run_dir={tmp_path / 'fp32'}"))
    trainer, bf16, logs = _train(
        debug_config(*steps, "train.precision=bf16", f"train.run_dir={tmp_path / 'bf16'}")
    )
    assert any(
        l.startswith("precision: bf16 (CPU emulation: bf16 rounding around float32 math")
        for l in logs
    )
    assert len(bf16) == 3 and all(math.isfinite(x) for x in bf16)
    assert abs(bf16[0] - fp32[0]) <= 0.02 * abs(fp32[0])
    assert bf16 != fp32  # the forward really rounds
    state = optimizer_state(trainer.model, trainer.optimizer)
    assert state and all(v.dtype == np.float32 for v in state.values())
    assert any("moment1" in k for k in state) and any("moment2" in k for k in state)
    assert all(p.dtype == paddle.float32 for p in trainer.model.parameters())


def test_bf16_emulation_updates_the_float32_masters(debug_config):
    """AdamW's first step moves each decayed weight from p to p (1 - lr wd) - lr g/(|g| + eps),
    about lr sign(g) away from p (1 - lr wd). Had the step started from the bf16-rounded weight
    r, every element would be off by a further |p - r| (1 - lr wd)."""
    trainer = Trainer(debug_config("train.precision=bf16"), log=lambda *_: None)
    weight = trainer.model.blocks[0].attn.qkv.weight
    before = weight.numpy().copy()
    trainer.train_step()
    after = weight.numpy()
    lr, wd = trainer.learning_rate_at(0), trainer.cfg.train.weight_decay
    rounded = paddle.to_tensor(before).astype("bfloat16").astype("float32").numpy()
    from_master = np.abs(np.abs(after - before * (1 - lr * wd)) - lr)
    from_rounded = np.abs(np.abs(after - rounded * (1 - lr * wd)) - lr)
    # Measured: medians ~3e-7 (Adam's eps, clipping) and ~1.4e-5.
    assert np.median(from_master) < 1e-6 < np.median(from_rounded)
