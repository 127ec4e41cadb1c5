"""Training the vision judge (component vision_judge) on real train-split digits, on the loop of
train/loop.py: cross-entropy summed over the heads, with a video batch every
vision_judge.video_every steps. Saves <run_dir>/judge and reports held-out accuracy per head
(eval/vision_judge.py).

    ernie5 train recipes/vision_judge.yaml
"""

from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn.functional as F

from ..config import to_plain
from ..eval.vision_judge import VisionJudge, _targets, evaluate
from ..optim.optimizer import apply_update, build_optimizer
from .loop import Component, Loop


class JudgeSteps(Component):
    """Optimise `judge` on `batches(step) -> list of (pixels, targets per head)`."""

    name = "vision judge"

    def __init__(self, judge: VisionJudge, opt, batches, train):
        self.model, self.optimizer, self.batches, self.tr = judge, opt, batches, train
        self.config = to_plain(judge.cfg)

    def step(self, step: int) -> dict[str, float]:
        total = 0.0
        for pixels, targets in self.batches(step):
            for k, lg in self.model(pixels).items():
                total = total + F.cross_entropy(lg, paddle.to_tensor(targets[k]))
        total.backward()
        apply_update(self.model, self.optimizer, step, self.tr)
        return {"train/loss": float(total)}


def train_steps(judge: VisionJudge, opt, batches, cfg_train, max_steps: int) -> list[float]:
    """The judge's steps 0..max_steps-1 in memory (no seeding, no files); every loss."""
    judge.train()
    steps = JudgeSteps(judge, opt, batches, cfg_train)
    losses = [steps.step(s)["train/loss"] for s in range(max_steps)]
    judge.eval()
    return losses


class JudgeRun(JudgeSteps):
    """The recipe's run: random train-split images and clips, evaluation on held-out ones."""

    def __init__(self, cfg, rng: np.random.Generator):
        from ..data.digits import digit_images, digit_videos

        jc, tr = cfg.vision_judge, cfg.train
        data = dict(size=jc.image_size, cache_dir=cfg.data.cache_dir)
        images = digit_images("train", copies=jc.image_copies, **data)
        videos = digit_videos("train", frames=jc.frames, **data)
        img_t, vid_t = _targets(images.labels), _targets(videos.labels)
        judge = VisionJudge(jc)

        def batches(step):
            i = rng.integers(len(images), size=tr.batch_size)
            out = [(images.pixels[i], {k: v[i] for k, v in img_t.items()})]
            if jc.video_every and step % jc.video_every == 0:
                j = rng.integers(len(videos), size=jc.video_batch_size)
                out.append((videos.pixels[j], {k: v[j] for k, v in vid_t.items()}))
            return out

        super().__init__(judge, build_optimizer(judge, tr), batches, tr)
        self.cache_dir = cfg.data.cache_dir

    def evaluate(self) -> dict:
        return evaluate(self.model, self.cache_dir)

    def finish(self, run_dir: str) -> dict:
        self.model.save(os.path.join(run_dir, "judge"))
        return {}


def train_from_config(cfg) -> dict:
    """Train on real train-split digits, save to <run_dir>/judge, report held-out accuracy per
    head."""
    loop = Loop(cfg.train, cfg)
    return loop.fit(JudgeRun(cfg, loop.rng))
