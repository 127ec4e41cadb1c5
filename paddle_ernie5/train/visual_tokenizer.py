"""Training the visual tokenizer (component visual_tokenizer) on the built-in digits, on the loop
of train/loop.py: reconstruction MSE plus the quantiser's commitment loss, with a video batch every
visual_tokenizer.video_every steps and progressive bits. Saves <run_dir>/tokenizer and reports
held-out PSNR (and the vision judge's accuracy on reconstructions, if configured).

    ernie5 train recipes/visual_tokenizer.yaml
"""

from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn.functional as F

from ..config import VisualTokenizerConfig, to_plain
from ..optim.optimizer import apply_update, build_optimizer
from ..tokenizers.visual import VisualTokenizer, psnr, reconstruct
from .loop import Component, Loop


def active_bits(cfg: VisualTokenizerConfig, step: int, max_steps: int) -> int:
    """Bits in use at `step` under the progressive schedule (equal phases)."""
    if not cfg.bit_schedule:
        return cfg.bits
    phase = min(len(cfg.bit_schedule) - 1, step * len(cfg.bit_schedule) // max(1, max_steps))
    return cfg.bit_schedule[phase]


class TokenizerSteps(Component):
    """Optimise `tok` on `batches(step) -> list of frame arrays` (images [N, 3, H, W] or clips
    [N, T, 3, H, W], each a term of the step's loss)."""

    name = "visual tokenizer"

    def __init__(self, tok: VisualTokenizer, opt, batches, train):
        self.model, self.optimizer, self.batches, self.tr = tok, opt, batches, train
        self.config = to_plain(tok.cfg)

    def step(self, step: int) -> dict[str, float]:
        tok = self.model
        bits = active_bits(tok.cfg, step, self.tr.max_steps)
        total, rec_sum = 0.0, 0.0
        for frames in self.batches(step):
            x = paddle.to_tensor(frames)
            x_hat, vq = tok(x, bits)
            rec = F.mse_loss(x_hat, x.unsqueeze(1) if x.ndim == 4 else x)
            total = total + rec + vq
            rec_sum += float(rec)
        total.backward()
        apply_update(tok, self.optimizer, step, self.tr)
        return {"train/loss": float(total), "train/recon_mse": rec_sum, "train/bits": bits}


def train_steps(
    tok: VisualTokenizer, opt, batches, cfg_train, max_steps: int, start: int = 0
) -> list[float]:
    """The tokenizer's steps `start..max_steps-1` in memory (no seeding, no files); every loss."""
    tok.train()
    steps = TokenizerSteps(tok, opt, batches, cfg_train)
    return [steps.step(s)["train/loss"] for s in range(start, max_steps)]


class TokenizerRun(TokenizerSteps):
    """The recipe's run: random train-split digit images and clips, evaluation on held-out ones."""

    def __init__(self, cfg, rng: np.random.Generator):
        from ..data.digits import digit_images, digit_videos

        vt, tr = cfg.visual_tokenizer, cfg.train
        data = dict(size=vt.image_size, cache_dir=cfg.data.cache_dir)
        images = digit_images("train", copies=vt.image_copies, **data)
        videos = digit_videos("train", frames=vt.frames, **data)
        tok = VisualTokenizer(vt)

        def batches(step):
            out = [images.pixels[rng.integers(len(images), size=tr.batch_size)]]
            if vt.video_every and step % vt.video_every == 0:
                out.append(videos.pixels[rng.integers(len(videos), size=vt.video_batch_size)])
            return out

        super().__init__(tok, build_optimizer(tok, tr), batches, tr)
        self.cfg = cfg

    def evaluate(self) -> dict:
        return evaluate(self.model, self.cfg)

    def finish(self, run_dir: str) -> dict:
        self.model.save(os.path.join(run_dir, "tokenizer"))
        return {
            "vocab_size": self.model.vocab_size,
            "tokens_per_frame": self.model.tokens_per_frame,
        }


def train_from_config(cfg) -> dict:
    """Train on the built-in digits, save to <run_dir>/tokenizer, report held-out PSNR."""
    loop = Loop(cfg.train, cfg)
    return loop.fit(TokenizerRun(cfg, loop.rng))


def evaluate(tok: VisualTokenizer, cfg) -> dict:
    """Held-out PSNR for images, videos and each prefix of scales; judge accuracy if configured."""
    from ..data.digits import digit_images, digit_videos

    vt = tok.cfg
    data = dict(size=vt.image_size, cache_dir=cfg.data.cache_dir)
    images = digit_images("heldout", copies=1, **data)
    videos = digit_videos("heldout", frames=vt.frames, **data)
    rec_images = reconstruct(tok, images.pixels)
    rec_videos = reconstruct(tok, videos.pixels, batch=16)
    metrics = {
        "psnr_image_heldout": psnr(rec_images, images.pixels),
        "psnr_video_heldout": psnr(rec_videos, videos.pixels),
    }
    for n in range(1, len(vt.scales)):
        metrics[f"psnr_image_heldout_scales{n}"] = psnr(
            reconstruct(tok, images.pixels, num_scales=n), images.pixels
        )
    if vt.judge:
        from ..eval.vision_judge import VisionJudge

        judge = VisionJudge.load(vt.judge)
        real = judge.score(images.pixels, images.labels)
        fake = judge.score(rec_images, images.labels)
        for head in ("digit", "fg", "bg"):
            metrics[f"judge_{head}_real"] = real[head]
            metrics[f"judge_{head}_recon"] = fake[head]
        if judge.cfg.video_every:
            real = judge.score(videos.pixels, videos.labels)
            fake = judge.score(rec_videos, videos.labels)
            for head in ("digit", "direction"):
                metrics[f"judge_video_{head}_real"] = real[head]
                metrics[f"judge_video_{head}_recon"] = fake[head]
    return {k: round(v, 4) for k, v in metrics.items()}
