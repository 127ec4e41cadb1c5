"""AdaGC (optim/optimizer.AdaGC): clip factors and gamma against a numpy re-computation, the
no-clipping limit, the checkpointed state and config validation."""

import math

import numpy as np
import paddle
import pytest

from paddle_ernie5.config import ClipConfig, ConfigError
from paddle_ernie5.io import checkpoint
from paddle_ernie5.optim.optimizer import AdaGC
from paddle_ernie5.train.trainer import Trainer, read_metrics


def _toy(seed=0):
    paddle.seed(seed)
    model = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.Tanh(), paddle.nn.Linear(3, 2))
    opt = paddle.optimizer.AdamW(
        learning_rate=0.05, parameters=model.parameters(), weight_decay=0.01
    )
    return model, opt


def _inputs():
    rng = np.random.default_rng(7)
    # The third batch is scaled up so its gradients jump above the EMA: AdaGC must clip it.
    return [rng.normal(size=(5, 4)).astype("float32") * scale for scale in (3.0, 1.0, 6.0)]


def _backward(model, x):
    out = model(paddle.to_tensor(x))
    (out**2).mean().backward()


def test_clip_factors_and_gamma_match_numpy_over_three_steps():
    cfg = ClipConfig(mode="adagc", beta=0.9, lambda_rel=1.05, warmup_steps=2)
    lambda_abs = 0.5
    model, opt = _toy()
    adagc = AdaGC(cfg, lambda_abs)
    names = [n for n, _ in model.named_parameters()]
    gamma = {n: math.inf for n in names}
    seen_clip_in_warmup = seen_clip_after_warmup = False
    for step, x in enumerate(_inputs()):
        _backward(model, x)
        raw = {n: p.grad.numpy().astype(np.float64) for n, p in model.named_parameters()}
        stats = adagc.clip(model.named_parameters())
        norms = {n: np.linalg.norm(raw[n]) for n in names}
        if step < cfg.warmup_steps:  # global clipping; gamma = running min of clipped norms
            total = math.sqrt(sum(v**2 for v in norms.values()))
            want_h = {n: min(1.0, lambda_abs / total) for n in names}
            gamma = {n: min(gamma[n], want_h[n] * norms[n]) for n in names}
            seen_clip_in_warmup |= want_h[names[0]] < 1
        else:  # per tensor against the EMA
            want_h = {n: min(1.0, cfg.lambda_rel * gamma[n] / norms[n]) for n in names}
            gamma = {n: cfg.beta * gamma[n] + (1 - cfg.beta) * want_h[n] * norms[n] for n in names}
            seen_clip_after_warmup |= any(h < 1 for h in want_h.values())
        for n, p in model.named_parameters():
            np.testing.assert_allclose(p.grad.numpy(), raw[n] * want_h[n], rtol=1e-5, atol=1e-7)
            assert adagc.gamma[n] == pytest.approx(gamma[n], rel=1e-5)
        h = np.array([want_h[n] for n in names])
        assert stats.norm == pytest.approx(math.sqrt(sum(v**2 for v in norms.values())), rel=1e-5)
        assert stats.fraction_clipped == pytest.approx(np.mean(h < 1))
        assert stats.mean_factor == pytest.approx(h.mean(), rel=1e-5)
        opt.step()
        opt.clear_grad(set_to_zero=False)
    assert step == 2 and adagc.step == 3
    assert seen_clip_in_warmup and seen_clip_after_warmup  # both rules actually clipped something


def test_huge_thresholds_equal_no_clipping():
    clipped_model, clipped_opt = _toy(seed=3)
    plain_model, plain_opt = _toy(seed=3)
    adagc = AdaGC(ClipConfig(mode="adagc", lambda_rel=1e9, warmup_steps=1), lambda_abs=1e9)
    for x in _inputs() * 2:
        for model, opt in ((clipped_model, clipped_opt), (plain_model, plain_opt)):
            _backward(model, x)
            if model is clipped_model:
                stats = adagc.clip(model.named_parameters())
                assert stats.fraction_clipped == 0 and stats.mean_factor == 1
            opt.step()
            opt.clear_grad(set_to_zero=False)
    for a, b in zip(clipped_model.parameters(), plain_model.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_state_dict_round_trip_continues_identically():
    cfg = ClipConfig(mode="adagc", beta=0.8, warmup_steps=1)
    a = AdaGC(cfg, 1.0)
    names = ["w", "b", "silent"]
    a.factors(names, np.array([3.0, 0.5, 0.0]))
    b = AdaGC(cfg, 1.0)
    b.load_state_dict(a.state_dict())
    assert b.step == 1 and b.gamma == a.gamma
    assert "silent" not in b.gamma  # zero norm: no observation
    norms = np.array([10.0, 0.4, 2.0])
    np.testing.assert_array_equal(a.factors(names, norms), b.factors(names, norms))
    assert a.gamma == b.gamma
    # A tensor first seen after the warm-up starts its EMA at its own norm, unclipped.
    assert a.gamma["silent"] == 2.0
    moments, mine = AdaGC.split_state({"blocks.0.x::moment1_0": np.zeros(2), **a.state_dict()})
    assert list(moments) == ["blocks.0.x::moment1_0"] and set(mine) == set(a.state_dict())


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.clip.mode=foo", "train.clip.mode='foo' is invalid: allowed global or adagc"),
        ("train.clip.beta=-0.5", "train.clip.beta=-0.5 is invalid: allowed 0 <= beta < 1"),
        ("train.clip.lambda_rel=0", "train.clip.lambda_rel=0.0 is invalid: allowed > 0"),
        ("train.clip.warmup_steps=-1", "train.clip.warmup_steps=-1 is invalid"),
    ],
)
def test_bad_clip_values_are_config_errors(debug_config, override, needle):
    with pytest.raises(ConfigError) as err:
        debug_config(override)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_adagc_and_simreg_run_resumes_bit_exactly(debug_config, tmp_path):
    """Interrupted at step 5 (past the 3-step warm-up) and resumed: every logged value matches an
    uninterrupted run, so gamma and the step counter travel in the checkpoint."""
    opts = (
        "train.save_every=5",
        "train.clip.mode=adagc",
        "train.clip.warmup_steps=3",
        "train.clip_norm=0.5",
        "train.simreg.enabled=true",
        "train.simreg.max_anchors=16",
    )
    full = debug_config(*opts, f"train.run_dir={tmp_path / 'full'}")
    Trainer(full, log=lambda *_: None).fit()
    part = debug_config(*opts, f"train.run_dir={tmp_path / 'part'}")
    Trainer(part, log=lambda *_: None).fit(stop_at=5)
    saved = checkpoint.load(
        checkpoint.list_checkpoints(str(tmp_path / "part" / "checkpoints"))[-1]
    )[1]
    assert int(saved[AdaGC.STEP_KEY][0]) == 5 and any(
        k.startswith(AdaGC.GAMMA_PREFIX) for k in saved
    )
    Trainer(part, log=lambda *_: None).fit()
    keys = (
        "loss",
        "loss/text",
        "loss/simreg",
        "train/grad_norm",
        "clip/fraction_clipped",
        "clip/mean_factor",
    )
    a = [tuple(m[k] for k in keys) for m in read_metrics(str(tmp_path / "full")) if "loss" in m]
    b = [tuple(m[k] for k in keys) for m in read_metrics(str(tmp_path / "part")) if "loss" in m]
    assert len(a) == 8 and a == b
    assert all(v[2] > 0 for v in a)  # SimReg found positives in every step
    assert any(v[4] > 0 for v in a[3:])  # the per-tensor rule clipped something after the warm-up


def test_adagc_outside_pretraining_is_refused_by_name():
    import os

    from support import RECIPES

    from paddle_ernie5.config import load_config

    with pytest.raises(ConfigError, match=r"train.clip.mode='adagc'.*component 'sft'"):
        load_config(os.path.join(RECIPES, "sft_tiny.yaml"), ["train.clip.mode=adagc"])
