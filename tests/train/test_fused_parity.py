"""The fused CPU ops (model.fused_ops, train.fused_optimizer) train the same model as the
pure-Paddle references: same recipe and seed, the loss of every step agrees to 1e-4 relative
over 50 steps.

The runs keep the routers' aux-free bias fixed (`model.moe.bias_update_rate=0`). The update
bias += rate * sign(target - load) is discontinuous: when a last-bit difference moves one token
to another expert and that expert's load crosses the target, its bias moves by a whole step and
the two runs route differently from then on. Two pure-Paddle formulations of the same reference
(x*x for pow in RMSNorm, silu(a)*b for swiglu) part that way on pretrain_tiny within 28 steps
(docs/results.md section 10), so with the update on, only bit-identical kernels could agree."""

import numpy as np

from paddle_ernie5.train.trainer import Trainer


def _losses(debug_config, fused: bool, steps: int) -> tuple[list[float], list[float]]:
    switch = str(fused).lower()
    cfg = debug_config(
        f"train.max_steps={steps}",
        f"model.fused_ops={switch}",
        f"train.fused_optimizer={switch}",
        "model.moe.bias_update_rate=0",
        f"train.run_dir={debug_config().train.run_dir}_{switch}",
    )
    trainer = Trainer(cfg, log=lambda *_: None)
    text, mtp = [], []
    for _ in range(steps):
        metrics = trainer.train_step()
        text.append(metrics["loss/text"])
        mtp.append(metrics["loss/mtp"])
    return text, mtp


def test_fused_and_reference_loss_curves_agree_over_50_steps(debug_config):
    fused_text, fused_mtp = _losses(debug_config, True, 50)
    ref_text, ref_mtp = _losses(debug_config, False, 50)
    np.testing.assert_allclose(fused_text, ref_text, rtol=1e-4)
    np.testing.assert_allclose(fused_mtp, ref_mtp, rtol=1e-4)
    # Training moved: the curves compare something (loss fell well below its start).
    assert fused_text[-1] < fused_text[0] - 0.5
