"""Elastic (once-for-all) training: draw a sub-model view for every micro-batch (and, with
elastic.full_every_step, train the full model on the same micro-batch beside it).

The draws come from a generator seeded by train.seed and saved in checkpoints, so an elastic run
is reproducible and resumes exactly. The sub-model trains through the same parameters and the same
loss as the full model; gradients of every micro-batch (whatever its view) meet in one optimizer
step.

With a universal expert pool (model.moe.universal) the width axis draws, for every MoE layer, the
same number n of experts from that layer's window (n in [min_experts, W-1]; random or the window's
first n), so every layer keeps at least top_k choices; the view carries them per layer.
"""

from __future__ import annotations

import numpy as np

from ..config import ElasticConfig, ModelConfig, MoEConfig
from ..model.universal import balance_targets, layer_windows
from ..model.view import FULL_VIEW, ElasticView, evenly_spaced_layers


class ElasticSampler:
    def __init__(self, cfg: ElasticConfig, model_cfg: ModelConfig, seed: int):
        self.cfg = cfg
        self.num_layers = model_cfg.num_layers
        self.num_experts = model_cfg.moe.num_experts
        self.top_k = model_cfg.moe.top_k
        self.min_experts = cfg.min_experts or self.top_k
        self.rng = np.random.default_rng([seed, 0xE1A5])
        # Universal pool: experts are drawn inside each MoE layer's window.
        self.windows = layer_windows(model_cfg) if model_cfg.moe.universal.enabled else None
        self.width = (
            self.num_experts
            if self.windows is None
            else len(self.windows[next(iter(self.windows))])
        )

    def sample(self) -> ElasticView:
        if not self.cfg.enabled:
            return FULL_VIEW
        cfg, rng = self.cfg, self.rng
        # Three independent draws, always made, so the stream does not depend on earlier outcomes.
        u_depth, u_width, u_topk = rng.random(3)
        layers = experts = top_k = None
        if u_depth >= cfg.depth_full_prob and cfg.min_layers < self.num_layers:
            n = int(rng.integers(cfg.min_layers, self.num_layers))
            layers = (
                evenly_spaced_layers(self.num_layers, n)
                if cfg.depth_rule == "even"
                else tuple(range(n))
            )
        layer_experts = None
        if u_width >= cfg.width_full_prob and self.min_experts < self.width:
            n = int(rng.integers(self.min_experts, self.width))
            if self.windows is None:
                experts = self._subset(self.num_experts, n)
            else:
                layer_experts = tuple(
                    (i, tuple(sorted(window[list(self._subset(len(window), n))].tolist())))
                    for i, window in self.windows.items()
                )
        if u_topk >= cfg.topk_full_prob and self.top_k > 1:
            top_k = int(rng.integers(1, self.top_k))
        return ElasticView(layers=layers, experts=experts, top_k=top_k, layer_experts=layer_experts)

    def _subset(self, size: int, n: int) -> tuple[int, ...]:
        """n of range(size): random (width_rule random) or the first n."""
        if self.cfg.width_rule == "random":
            return tuple(sorted(self.rng.choice(size, n, replace=False).tolist()))
        return tuple(range(n))

    def sample_views(self) -> list[ElasticView]:
        """The views one micro-batch trains: the sampled one, preceded by the full model when
        `full_every_step` is set and the draw is a proper sub-model (ERNIE5.md: the full model and
        the sampled sub-models are optimised in the same backward pass)."""
        view = self.sample()
        if self.cfg.enabled and self.cfg.full_every_step and view != FULL_VIEW:
            return [FULL_VIEW, view]
        return [view]

    def view_weights(self, n_views: int) -> tuple[float, ...]:
        """Loss weights of the views `sample_views` returned, summing to 1: (1,) for one view, else
        the full model's 1 and the sub-model's `sub_loss_weight`, normalised."""
        if n_views == 1:
            return (1.0,)
        w = self.cfg.sub_loss_weight
        return (1.0 / (1.0 + w), w / (1.0 + w))

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class LoadAccumulator:
    """Expert loads of one optimizer step, per MoE layer, fair to experts that some micro-batches
    masked out: an expert's load is averaged over the micro-batches in which it could be chosen."""

    def __init__(self):
        self.load: dict[int, np.ndarray] = {}
        self.active: dict[int, np.ndarray] = {}

    def add(self, layer: int, load_E: np.ndarray, mask_E: np.ndarray | None) -> None:
        mask = np.ones_like(load_E, dtype=bool) if mask_E is None else mask_E
        self.load[layer] = self.load.get(layer, 0) + load_E
        self.active[layer] = self.active.get(layer, 0) + mask.astype(np.int64)

    def mean_load(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(load per micro-batch in which the expert was allowed,
        mask of experts allowed at least once)"""
        active = self.active[layer]
        seen = active > 0
        return np.where(seen, self.load[layer] / np.maximum(active, 1), 0.0), seen


def update_router_biases(moe_layers, loads: LoadAccumulator, moe: MoEConfig) -> None:
    """The aux-free bias update of every router that ran in the step (after the optimizer step).

    Standard layers steer each expert towards the layer's mean load. Universal layers (one pool,
    model/universal.py) steer each window slot towards the exposure-corrected target of
    `balance_targets` (balance "universal") or the window's mean (balance "window"); then every
    window's closed slots open by one step (universal.open_decay)."""
    ran = [(i, layer) for i, layer in moe_layers if i in loads.load]
    means = {i: loads.mean_load(i) for i, _ in ran}
    uni = moe.universal
    targets = {}
    if uni.enabled and uni.balance == "universal" and ran:
        windows = {i: layer.router.window for i, layer in ran}
        targets = balance_targets(
            {i: means[i][0][windows[i]] for i, _ in ran},
            windows,
            moe.num_experts,
            {i: means[i][1][windows[i]] & layer.router.open_slots() for i, layer in ran},
        )
    for i, layer in ran:
        load, seen = means[i]
        layer.router.update_selection_bias(load, moe.bias_update_rate, seen, targets.get(i))
    if uni.enabled:
        for _, layer in moe_layers:
            layer.router.open_window(uni.open_decay)
