"""The `elastic` section: once-for-all training of sub-models (depth, expert width, top-k)."""

from __future__ import annotations

from dataclasses import dataclass

from ._check import _check


@dataclass(frozen=True, kw_only=True)
class ElasticConfig:
    """Once-for-all sampling of sub-models (depth, expert width, top-k), one draw per micro-batch.

    Each axis independently keeps the full setting with its `*_full_prob` (ERNIE5.md: 0.75-0.8),
    otherwise draws uniformly: a layer count in [min_layers, L-1], an expert-subset size in
    [min_experts, E-1], a top-k in [1, k-1]. Which layers and experts: `depth_rule` and
    `width_rule`."""

    enabled: bool = False
    depth_full_prob: float = 0.75
    min_layers: int = 1
    # even: keep n layers evenly spaced over the depth, first and last included;
    # prefix: the first n.
    depth_rule: str = "even"
    width_full_prob: float = 0.8
    min_experts: int = 0  # smallest expert subset; 0 = model.moe.top_k
    # random: a uniformly random subset each draw (so any subset can be exported later);
    # prefix: experts 0..n-1.
    width_rule: str = "random"
    topk_full_prob: float = 0.8
    # true: when the draw is a proper sub-model, the micro-batch also trains the full model and the
    # loss is their weighted mean (ERNIE5.md: full and sampled sub-models in the same backward
    # pass); costs up to 2x compute per step. false: the micro-batch trains the drawn view only.
    full_every_step: bool = True
    # With full_every_step, the weight of the sub-model's loss beside the full model's 1; the two
    # are normalised to sum to 1 (0.5: the full model gets 2/3 of the micro-batch's gradient,
    # 1: the mean).
    sub_loss_weight: float = 0.5
    # With full_every_step, in-place distillation: the sub-model's loss also gets this weight x the
    # mean KL(full || sub) of the next-token distributions over the text targets, the full model's
    # (from the same micro-batch, detached) as the teacher. 0 = labels only.
    distill_weight: float = 0.0

    def validate(self, at: str) -> None:
        for name in ("depth_full_prob", "width_full_prob", "topk_full_prob"):
            _check(at, name, getattr(self, name), 0 <= getattr(self, name) <= 1, "0..1")
        _check(at, "min_layers", self.min_layers, self.min_layers >= 1, ">= 1")
        _check(at, "sub_loss_weight", self.sub_loss_weight, self.sub_loss_weight > 0, "> 0")
        _check(
            at, "distill_weight", self.distill_weight, self.distill_weight >= 0, ">= 0 (0 = off)"
        )
        _check(at, "min_experts", self.min_experts, self.min_experts >= 0, ">= 0 (0 = top_k)")
        _check(
            at,
            "depth_rule",
            self.depth_rule,
            self.depth_rule in ("even", "prefix"),
            "even or prefix",
        )
        _check(
            at,
            "width_rule",
            self.width_rule,
            self.width_rule in ("random", "prefix"),
            "random or prefix",
        )
