"""Mixture of Universal Experts (MoUE): one expert pool shared by every MoE layer.

Legend: P pool experts, W window (the experts one MoE layer reaches), T tokens, K top-k, D width of
the trajectory state, L MoE layers.

Staggered rotational topology (model.moe.universal): MoE layer j routes over the W pool experts
(start_j + i) mod P, i < W, with start_j = j * stride mod P (or explicit `starts`):

    pool     e0 e1 e2 e3 e4 e5 e6 e7          P = 8, W = 4, stride = 2
    layer 0  [---------]
    layer 1        [---------]
    layer 2              [---------]
    layer 3  ---]              [------        (wraps around)

An expert's exposure is the number of windows holding it. Reuse makes a token's path a walk over
the pool; the windows keep the set of paths bounded (W^L instead of P^L) and keep neighbouring
layers' experts overlapping.

Universal router: besides the hidden state, each router sees a small per-token trajectory state
carried over the depth, s_{j+1} = tanh(s_j A + sum_k w_k emb[e_k]) (s_0 = 0), i.e. which pool
experts the token used so far. Its projection into the router logits starts at zero.

Universal expert load balance (`balance_targets`): the aux-free bias of each layer window steers
the layer's loads to targets t[l, e] with row sums = the layer's assignments and column sums =
the same total for every pool expert (iterative proportional fitting on the window incidence), so
an expert reached by many windows is not loaded more in total than one reached by few.
"""

from __future__ import annotations

import numpy as np
import paddle
from paddle import nn

from ..config import ModelConfig
from .experts import GroupedExperts


def moe_layer_indices(cfg: ModelConfig) -> list[int]:
    """Block indices of the MoE layers, in depth order."""
    return list(range(cfg.moe.first_dense_layers, cfg.num_layers))


def layer_windows(cfg: ModelConfig) -> dict[int, np.ndarray]:
    """Block index -> the pool experts its window holds, in window order (int64 [W])."""
    u, e = cfg.moe.universal, cfg.moe.num_experts
    layers = moe_layer_indices(cfg)
    w = u.window_size(e)
    starts = u.window_starts(len(layers), e)
    return {i: (s + np.arange(w, dtype=np.int64)) % e for i, s in zip(layers, starts)}


def exposure(windows: dict[int, np.ndarray], num_experts: int) -> np.ndarray:
    """[P] number of windows that hold each pool expert."""
    out = np.zeros([num_experts], dtype=np.int64)
    for ids in windows.values():
        out[ids] += 1
    return out


def balance_targets(
    loads: dict[int, np.ndarray],
    windows: dict[int, np.ndarray],
    num_experts: int,
    active: dict[int, np.ndarray] | None = None,
    iters: int = 200,
) -> dict[int, np.ndarray]:
    """Exposure-corrected load targets, per layer in window order ([W] float64).

    `loads`: layer -> [W] assignments of the step (window order); `active`: layer -> [W] bool
    slots that may take load (elastic subsets, open slots; default all). Targets keep every
    layer's total and give every pool expert that some active slot reaches the same total over
    the layers; where that is infeasible, iterative proportional fitting gives the closest fit
    (alternating row and column scaling of the active incidence)."""
    layers = sorted(loads)
    rows = np.array([float(np.sum(loads[l])) for l in layers])
    inc = np.zeros([len(layers), num_experts])
    for r, l in enumerate(layers):
        mask = np.ones(len(windows[l]), bool) if active is None else active[l]
        inc[r, windows[l][mask]] = 1.0
    reached = inc.sum(0) > 0
    cols = np.where(reached, rows.sum() / max(1, reached.sum()), 0.0)
    t = inc.copy()
    for _ in range(iters):
        t *= (rows / np.maximum(t.sum(1), 1e-12))[:, None]
        t *= (cols / np.maximum(t.sum(0), 1e-12))[None, :]
    t *= (rows / np.maximum(t.sum(1), 1e-12))[:, None]  # rows exact, columns as close as they fit
    return {l: t[r, windows[l]] for r, l in enumerate(layers)}


def balance_stats(
    loads: dict[int, np.ndarray], windows: dict[int, np.ndarray], num_experts: int
) -> dict:
    """Load balance of a universal pool. `loads`: layer -> [P] assignments (pool order).

    per_window: layer -> max/mean load inside its window; total_P: each expert's load summed over
    the layers; exposure_P: windows holding it; max_over_mean: of total_P over the reached
    experts (1 = every expert carries the same total, the universal balance's aim);
    per_exposure_max_over_mean: of total_P / exposure_P (what per-window balancing equalises)."""
    total = np.zeros([num_experts], dtype=np.float64)
    per_window = {}
    for l, load in loads.items():
        load = np.asarray(load, dtype=np.float64)
        total += load
        inside = load[windows[l]]
        per_window[l] = float(inside.max() / max(inside.mean(), 1e-12))
    exp = exposure({l: windows[l] for l in loads}, num_experts)
    reached = exp > 0
    per_exp = total[reached] / exp[reached]
    return {
        "per_window": per_window,
        "total_P": total,
        "exposure_P": exp,
        "max_over_mean": float(total[reached].max() / max(total[reached].mean(), 1e-12)),
        "per_exposure_max_over_mean": float(per_exp.max() / max(per_exp.mean(), 1e-12)),
    }


class UniversalPool(nn.Layer):
    """The shared experts (`experts`, [P] stacked SwiGLUs) and the trajectory recurrence
    (`expert_embed` [P, D], `state_mix` [D, D]); held by the model, used by every MoE layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        moe, d = cfg.moe, cfg.moe.universal.trajectory_dim
        self.trajectory_dim = d
        self.experts = GroupedExperts(
            moe.num_experts, cfg.hidden_size, moe.expert_hidden, cfg.init_std
        )
        if d > 0:
            # Unit-scale embeddings keep the state inside tanh's working range from the start.
            self.expert_embed = self.create_parameter(
                [moe.num_experts, d], default_initializer=nn.initializer.Normal(std=d**-0.5)
            )
            self.state_mix = self.create_parameter(
                [d, d], default_initializer=nn.initializer.Normal(std=d**-0.5)
            )

    def initial_state(self, num_tokens: int):
        """s_0 = 0 ([T, D]); None without a trajectory state."""
        if self.trajectory_dim == 0:
            return None
        return paddle.zeros([num_tokens, self.trajectory_dim], dtype="float32")

    def next_state(self, state_TD, ids_TK, weights_TK):
        """s' = tanh(s A + sum_k w_k emb[e_k]): the state after a layer chose `ids_TK` (pool ids)
        with combine weights `weights_TK`."""
        if self.trajectory_dim == 0:
            return None
        t, k = ids_TK.shape
        emb_TKD = paddle.gather(self.expert_embed, ids_TK.reshape([-1])).reshape([t, k, -1])
        visited_TD = (weights_TK.astype("float32").unsqueeze(-1) * emb_TKD).sum(axis=1)
        return paddle.tanh(paddle.matmul(state_TD, self.state_mix) + visited_TD)
