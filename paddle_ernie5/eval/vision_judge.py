"""Independent judge of digit images and videos: a small CNN trained only on real data.

It scores what the backbone generates (a GenEval analogue: does a "red 3 on blue" prompt give a red
3 on blue?) and serves as an RL verifier. It never sees tokenizer output or generated samples in
training, so its verdicts do not share the generator's mistakes.

    frame [3, H, W] -> [rgb, ink] (ink = distance to the frame's median colour, i.e. the background:
    the digit's shape without its colours, so one set of shape features serves all colour pairs)
    -> video frames only: rolled so that the ink's circular centroid is at the centre
    [4, H, W] --trunk (5 convs, 2 poolings)--> [D4, H/4, W/4] --flatten--> e
    image:  heads digit / fg / bg on e
    video:  heads digit / fg / bg on the mean of e over frames
            motion: convs over each pair of consecutive (unrolled) frames (8 channels) -> mean
            over pairs and cells -> heads direction / speed (a pair of frames shows which way
            edges moved)

Video digits wrap around the frame edges (data/digits.py) and sit anywhere; rolling every frame to
its circular ink centroid puts the digit in one place, so a flattened (layout-aware) head can read
it. Images are already centred and are not rolled: the centroid's shape-dependent shift costs
accuracy on them. (Global pooling instead of flattening loses the stroke layout and learns
digits far more slowly.) Convolutions pad circularly for the same reason. GroupNorm rather than
BatchNorm: images and video frames come in separate batches with different statistics, and a
per-sample norm has no running averages to disagree between training and evaluation.

Legend: N samples, T frames, C=3, H W pixels, D channels.

API:
    judge = VisionJudge.load(path)          # a vision_judge run dir or its judge/ folder
    judge.predict(x) -> {head: int64 [N]}   # x: [N, 3, H, W] images or [N, T, 3, H, W] videos
                                            #    in [0, 1]
    judge.score(x, targets) -> {head: accuracy}   for the heads present in `targets`
    evaluate(judge, cache_dir) -> held-out accuracy per head, beside chance
Trained by train/vision_judge.py (`ernie5 train recipes/vision_judge.yaml`).
Inputs of another size are resized (bilinear) to the judge's image_size.
"""

from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from ..config import VisionJudgeConfig, from_dict, to_plain
from ..data.digits import COLOURS, DIRECTIONS, SPEEDS
from ..io import read_layer, save_layer

FORMAT_VERSION = 1
IMAGE_HEADS = {"digit": 10, "fg": len(COLOURS), "bg": len(COLOURS)}
MOTION_HEADS = {"direction": len(DIRECTIONS), "speed": len(SPEEDS)}


def _conv(a: int, b: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2D(a, b, 3, padding=1, padding_mode="circular"),
        nn.GroupNorm(min(8, b), b),
        nn.ReLU(),
    )


class VisionJudge(nn.Layer):
    def __init__(self, cfg: VisionJudgeConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.trunk = nn.Sequential(
            _conv(4, d),
            _conv(d, d),
            nn.MaxPool2D(2),
            _conv(d, 2 * d),
            _conv(2 * d, 2 * d),
            nn.MaxPool2D(2),
            _conv(2 * d, 4 * d),
        )
        self.motion = nn.Sequential(
            _conv(8, d), _conv(d, 2 * d), nn.MaxPool2D(2), _conv(2 * d, 2 * d)
        )
        cells = (cfg.image_size // 4) ** 2
        self.heads = nn.LayerDict({k: nn.Linear(4 * d * cells, n) for k, n in IMAGE_HEADS.items()})
        self.motion_heads = nn.LayerDict({k: nn.Linear(2 * d, n) for k, n in MOTION_HEADS.items()})

    def forward(self, x) -> dict:
        """x [N, 3, H, W] or [N, T, 3, H, W] in [0, 1] -> {head: logits [N, classes]}."""
        x = self._resize(x)
        video = x.ndim == 5
        N, T = (x.shape[0], x.shape[1]) if video else (x.shape[0], 1)
        H, W = x.shape[-2:]
        rgb = x.reshape([N * T, 3, H * W])
        paper = paddle.median(rgb, axis=-1, keepdim=True)  # the background is most of the frame
        ink = paddle.sqrt(((rgb - paper) ** 2).sum(1, keepdim=True) + 1e-6)
        frames = paddle.concat([rgb * 2 - 1, ink], axis=1).reshape([N * T, 4, H, W])
        e = (
            self.trunk(_centre(frames) if video else frames)
            .flatten(1)
            .reshape([N, T, -1])
            .mean(axis=1)
        )
        out = {k: head(e) for k, head in self.heads.items()}
        if video:
            f = frames.reshape([N, T, 4, H, W])
            pairs = paddle.concat([f[:, :-1], f[:, 1:]], axis=2).reshape([N * (T - 1), 8, H, W])
            m = self.motion(pairs).mean(axis=[2, 3]).reshape([N, T - 1, -1]).mean(axis=1)
            out.update({k: head(m) for k, head in self.motion_heads.items()})
        return out

    def _resize(self, x):
        if isinstance(x, np.ndarray):
            x = paddle.to_tensor(x, dtype="float32")
        size = self.cfg.image_size
        if x.shape[-1] == size and x.shape[-2] == size:
            return x
        lead = x.shape[:-3]
        y = F.interpolate(
            x.reshape([-1, *x.shape[-3:]]), size=[size, size], mode="bilinear", align_corners=False
        )
        return y.reshape([*lead, 3, size, size])

    @paddle.no_grad()
    def predict(self, x, batch: int = 256) -> dict:
        """Class index per head (int64 numpy arrays); videos add direction and speed index."""
        was_training = self.training
        self.eval()
        outs: dict = {}
        for i in range(0, len(x), batch):
            for k, logits in self(x[i : i + batch]).items():
                outs.setdefault(k, []).append(logits.argmax(-1).numpy())
        if was_training:
            self.train()
        return {k: np.concatenate(v) for k, v in outs.items()}

    def score(self, x, targets: dict) -> dict:
        """Accuracy per head, for the heads both predicted and present in `targets`.
        Speed targets may be given in pixels per frame (1, 2) or as indices into SPEEDS."""
        pred = self.predict(x)
        out = {}
        for k, p in pred.items():
            if k not in targets:
                continue
            t = np.asarray(targets[k])
            if k == "speed" and np.all(np.isin(t, SPEEDS)):
                t = np.searchsorted(SPEEDS, t)
            out[k] = float(np.mean(p == t))
        return out

    def save(self, path: str) -> None:
        save_layer(path, self, {"format_version": FORMAT_VERSION, "config": to_plain(self.cfg)})

    @classmethod
    def load(cls, path: str) -> VisionJudge:
        if os.path.isdir(os.path.join(path, "judge")):
            path = os.path.join(path, "judge")
        meta, state = read_layer(
            path, "vision judge", "train one with `ernie5 train recipes/vision_judge.yaml`"
        )
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: judge format {meta.get('format_version')} != {FORMAT_VERSION}"
            )
        cfg = from_dict(VisionJudgeConfig, meta["config"], "vision_judge")
        cfg.validate("vision_judge")
        judge = cls(cfg)
        if set(state) != set(judge.state_dict()):
            raise ValueError(f"{path}: parameters do not match the config")
        judge.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
        judge.eval()
        return judge


def _centre(x_NCHW):
    """Roll each frame so the circular centroid of its ink channel (the last) lands at the
    centre."""
    N, C, H, W = x_NCHW.shape
    ink = x_NCHW[:, -1]
    out = x_NCHW
    for axis, n in ((2, H), (3, W)):
        angle = paddle.to_tensor(2 * np.pi * np.arange(n) / n, dtype="float32")
        profile = ink.sum(axis=2 if axis == 2 else 1)  # ink [N, H, W] -> [N, n]
        theta = paddle.atan2(
            (profile * paddle.sin(angle)).sum(-1), (profile * paddle.cos(angle)).sum(-1)
        )
        centre = paddle.round(theta / (2 * np.pi) * n).astype("int64")  # [N]
        # idx [N, n]: source position of every output position
        idx = (paddle.arange(n, dtype="int64").unsqueeze(0) + centre.unsqueeze(1) - n // 2) % n
        shape = [N, 1, n, 1] if axis == 2 else [N, 1, 1, n]
        expand = [N, C, n, W] if axis == 2 else [N, C, H, n]
        out = paddle.take_along_axis(out, idx.reshape(shape).expand(expand), axis=axis)
    return out


def _targets(labels: dict) -> dict:
    out = dict(labels)
    if "speed" in out:
        out["speed"] = np.searchsorted(SPEEDS, out["speed"])
    return out


def evaluate(judge: VisionJudge, cache_dir: str) -> dict:
    """Held-out accuracy per head on real images and videos, with chance level beside each."""
    from ..data.digits import digit_images, digit_videos

    jc = judge.cfg
    images = digit_images(
        "heldout", size=jc.image_size, cache_dir=cache_dir, copies=jc.image_copies
    )
    out = {f"image_{k}_acc": v for k, v in judge.score(images.pixels, images.labels).items()}
    if jc.video_every:
        videos = digit_videos("heldout", size=jc.image_size, frames=jc.frames, cache_dir=cache_dir)
        out.update(
            {f"video_{k}_acc": v for k, v in judge.score(videos.pixels, videos.labels).items()}
        )
    chance = {
        **{k: 1 / n for k, n in IMAGE_HEADS.items()},
        **{k: 1 / n for k, n in MOTION_HEADS.items()},
    }
    out.update({f"chance_{k}": c for k, c in chance.items()})
    return {k: round(v, 4) for k, v in out.items()}
