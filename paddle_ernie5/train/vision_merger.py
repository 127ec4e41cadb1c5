"""Patch-merger pre-training (component vision_merger): the understanding path's own warm-up stage.

Trained jointly from scratch with a tiny backbone, the merger learns only what the backbone
already reads (colours): digit and motion answers stay at chance, because neither side has learned
its half of the readout. Pre-trained alone, it learns them in a few hundred steps, and the backbone
then learns to read them (ERNIE5.md's understanding path starts from a trained visual encoder;
ours is trained here, on the training split only).

    pictures (train split) -> pre-quantisation features -> image / video embedding (patch merger,
    place embedding and place projection, exactly as in the backbone) -> mean over the picture's
    tokens -> one linear head per configured attribute of its caption (vision_merger.*_attributes;
    by default direction and speed for clips, images not pre-trained; recipes/vision_merger.yaml
    adds digit, digit colour and background for images) -> summed cross-entropy

The colour heads delay the digit head rather than suppress it: held-out digit 0.17 after 300
steps, 0.76 after 600, 0.90 after 1200 with both colour heads beside it.

The mean of a picture's tokens is what a backbone's attention reads first, so features that
answer through it are features the backbone can learn to use. Saved: <run_dir>/merger.safetensors
(the weights of each pre-trained kind's visual embedding) and metrics.json (held-out accuracy of
each head, beside chance). A multimodal run starts from them with model.vision.merger_init=<run_dir>
(fresh runs only).
"""

from __future__ import annotations

import os

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..config import to_plain
from ..io import write_bytes
from ..optim.optimizer import apply_update, build_optimizer
from .loop import Component, Loop
from .pretrained import MERGER_WEIGHTS as WEIGHTS
from .pretrained import merger_key


def _classes(attribute: str) -> int:
    from ..eval.vision_judge import IMAGE_HEADS, MOTION_HEADS

    return {**IMAGE_HEADS, **MOTION_HEADS}[attribute]


class MergerProbe(nn.Layer):
    """The backbone's two visual input embeddings plus a linear head per attribute on the mean
    token."""

    def __init__(self, model_cfg, mc):
        super().__init__()
        from ..model.vision import ImageEmbedding, VideoEmbedding

        wanted = {"image": tuple(mc.image_attributes), "video": tuple(mc.video_attributes)}
        # Kinds with no attribute get no embedding.
        self.attributes = {kind: a for kind, a in wanted.items() if a}
        layers = {"image": ImageEmbedding, "video": VideoEmbedding}
        self.embed = nn.LayerDict({kind: layers[kind](model_cfg) for kind in self.attributes})
        m = model_cfg.hidden_size
        self.heads = nn.LayerDict(
            {
                f"{kind}_{k}": nn.Linear(m, _classes(k))
                for kind, attrs in self.attributes.items()
                for k in attrs
            }
        )

    def forward(self, kind: str, groups, places) -> dict:
        """groups [N, P, G, K], places [N, P] -> {attribute: logits [N, classes]}"""
        from ..model.vision import FEATURE_KEY, PATCH_INDEX_KEY

        tokens = self.embed[kind]({FEATURE_KEY[kind]: groups, PATCH_INDEX_KEY: places})
        pooled = tokens.mean(axis=1)
        return {k: self.heads[f"{kind}_{k}"](pooled) for k in self.attributes[kind]}


def _arrays(cfg, data, index: np.ndarray, kind: str):
    from ..data.vision_sources import merged_segment
    from ..model.vision import FEATURE_KEY, PATCH_INDEX_KEY

    segs = [merged_segment(data.feats[i], cfg.model.vision, kind, 0) for i in index]
    groups = np.stack([s.extras[FEATURE_KEY[kind]] for s in segs]).astype(np.float32)
    places = np.stack([s.extras[PATCH_INDEX_KEY] for s in segs])
    return paddle.to_tensor(groups), paddle.to_tensor(places)


def _targets(labels: dict, index: np.ndarray) -> dict:
    from ..eval.vision_judge import _targets as judge_targets

    return judge_targets({k: v[index] for k, v in labels.items()})


@paddle.no_grad()
def evaluate(probe: MergerProbe, cfg, sets: dict, batch: int = 256) -> dict:
    """Held-out accuracy of every head (mean-token readout), with chance beside it."""
    probe.eval()
    out = {}
    for kind, data in sets.items():
        n = len(data.feats)
        preds = {k: [] for k in probe.attributes[kind]}
        for i in range(0, n, batch):
            index = np.arange(i, min(n, i + batch))
            for k, lg in probe(kind, *_arrays(cfg, data, index, kind)).items():
                preds[k].append(lg.numpy().argmax(-1))
        truth = _targets(data.labels, np.arange(n))
        for k in probe.attributes[kind]:
            out[f"{kind}_{k}_acc"] = round(float(np.mean(np.concatenate(preds[k]) == truth[k])), 4)
            out[f"{kind}_{k}_chance"] = round(1 / _classes(k), 4)
    probe.train()
    return out


class MergerRun(Component):
    """The probe trained on random train-split pictures of each configured kind."""

    name = "patch merger"

    def __init__(self, cfg, rng: np.random.Generator):
        from ..data.vision_sources import encoded_digits, load_visual_tokenizer

        self.cfg, self.tr, self.rng = cfg, cfg.train, rng
        self.config = {"model": to_plain(cfg.model), "vision_merger": to_plain(cfg.vision_merger)}
        tok = load_visual_tokenizer(cfg.model.vision)
        self.model = probe = MergerProbe(cfg.model, cfg.vision_merger)
        kinds = list(probe.attributes)
        self.train_sets = {kind: encoded_digits(cfg, kind, "train", tok) for kind in kinds}
        self.held = {kind: encoded_digits(cfg, kind, "heldout", tok) for kind in kinds}
        self.optimizer = build_optimizer(probe, self.tr)

    def step(self, step: int) -> dict[str, float]:
        total = 0.0
        for kind, data in self.train_sets.items():
            index = self.rng.integers(len(data.feats), size=self.tr.batch_size)
            targets = _targets(data.labels, index)
            for k, lg in self.model(kind, *_arrays(self.cfg, data, index, kind)).items():
                total = total + F.cross_entropy(lg, paddle.to_tensor(targets[k]))
        total.backward()
        apply_update(self.model, self.optimizer, step, self.tr)
        return {"train/loss": float(total)}

    def evaluate(self) -> dict:
        return evaluate(self.model, self.cfg, self.held)

    def finish(self, run_dir: str) -> dict:
        from safetensors.numpy import save

        weights = {
            merger_key(kind, name): np.ascontiguousarray(value.numpy())
            for kind in self.held
            for name, value in self.model.embed[kind].state_dict().items()
        }
        write_bytes(os.path.join(run_dir, WEIGHTS), save(weights))
        return {}


def train_from_config(cfg) -> dict:
    """Pre-train the configured kinds' visual embeddings on the train split; save them; report
    held-out accuracy."""
    loop = Loop(cfg.train, cfg)
    return loop.fit(MergerRun(cfg, loop.rng))
