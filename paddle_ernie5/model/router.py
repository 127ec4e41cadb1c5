"""Top-k router over ONE expert pool, with aux-loss-free selection bias.

Legend: T tokens, M model width, E experts, K top-k.

The router sees only hidden states (no modality id). Scores are fp32. The selection bias shifts
which experts are *chosen* but never the combine weights; the trainer updates it after each
optimizer step from the loads this router reports (`update_selection_bias`). Aux losses and loads
are explicit outputs.

Router replay (RL): `forced_ids_TK` makes the router use expert ids recorded elsewhere (the rollout)
instead of its own top-k choice; the combine weights are still computed from the current scores at
those ids, so gradients reach the router exactly as if it had chosen them. What the router would
have chosen is still reported (`chosen_ids_TK`), so replay's effect can be measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..config import MoEConfig


@dataclass
class Routing:
    topk_ids_TK: paddle.Tensor  # int64 expert index per (token, slot)
    topk_weights_TK: paddle.Tensor  # fp32 combine weights (sum to 1 over K)
    load_E: paddle.Tensor  # int64 number of assignments per expert in this call
    aux_loss: paddle.Tensor  # sequence-level balance loss (0 if disabled)
    z_loss: paddle.Tensor  # router z-loss (0 if disabled)
    logits_TE: paddle.Tensor | None = None  # fp32 router logits, detached (dashboards, analysis)
    # The router's own top-k before any replay (RL diagnostics); topk_ids_TK when nothing is forced
    chosen_ids_TK: paddle.Tensor | None = None


class Router(nn.Layer):
    def __init__(self, hidden_size: int, cfg: MoEConfig, init_std: float):
        super().__init__()
        self.cfg = cfg
        self.weight = self.create_parameter(
            [hidden_size, cfg.num_experts],
            dtype="float32",
            default_initializer=nn.initializer.Normal(std=init_std),
        )
        self.register_buffer(
            "selection_bias", paddle.zeros([cfg.num_experts], dtype="float32"), persistable=True
        )

    def forward(
        self,
        x_TM,
        num_seqs: int = 1,
        top_k: int | None = None,
        expert_mask_E: np.ndarray | None = None,
        forced_ids_TK=None,
    ) -> Routing:
        cfg = self.cfg
        k = top_k or cfg.top_k
        logits_TE = paddle.matmul(x_TM.astype("float32"), self.weight)
        if expert_mask_E is not None:
            # Experts outside an elastic subset do not exist for this pass: the router behaves
            # exactly like the router of a model sliced down to the subset (same scores, choices).
            allowed = paddle.to_tensor(expert_mask_E).unsqueeze(0)
            logits_TE = paddle.where(allowed, logits_TE, paddle.full_like(logits_TE, float("-inf")))
        scores_TE = (
            F.softmax(logits_TE, axis=-1) if cfg.score_func == "softmax" else F.sigmoid(logits_TE)
        )
        select_TE = scores_TE.detach() + self.selection_bias
        if expert_mask_E is not None:
            select_TE = paddle.where(allowed, select_TE, paddle.full_like(select_TE, float("-inf")))
        chosen_ids_TK = paddle.topk(select_TE, k, axis=-1).indices
        topk_ids_TK = chosen_ids_TK if forced_ids_TK is None else forced_ids_TK.astype("int64")
        picked_TK = paddle.take_along_axis(scores_TE, topk_ids_TK, axis=-1)
        topk_weights_TK = picked_TK / (picked_TK.sum(axis=-1, keepdim=True) + 1e-20)
        load_E = paddle.bincount(topk_ids_TK.flatten(), minlength=cfg.num_experts)

        zero = paddle.zeros([], dtype="float32")
        aux_loss = (
            self._sequence_aux_loss(scores_TE, topk_ids_TK, num_seqs)
            if cfg.aux_loss_weight > 0
            else zero
        )
        z_loss = (
            paddle.logsumexp(logits_TE, axis=-1).pow(2).mean() if cfg.z_loss_weight > 0 else zero
        )
        return Routing(
            topk_ids_TK,
            topk_weights_TK,
            load_E,
            aux_loss,
            z_loss,
            logits_TE.detach(),
            chosen_ids_TK,
        )

    def _sequence_aux_loss(self, scores_TE, topk_ids_TK, num_seqs: int):
        """E * sum_e f_e * P_e averaged over sequences (DeepSeek-V3 complementary balance loss)."""
        e, k = self.cfg.num_experts, topk_ids_TK.shape[-1]
        t = scores_TE.shape[0] // num_seqs
        probs_NSE = (scores_TE / (scores_TE.sum(axis=-1, keepdim=True) + 1e-20)).reshape(
            [num_seqs, t, e]
        )
        onehot_NSE = F.one_hot(topk_ids_TK, e).sum(axis=1).reshape([num_seqs, t, e])
        frac_NE = onehot_NSE.mean(axis=1) * (e / k)
        return (frac_NE * probs_NSE.mean(axis=1)).sum(axis=-1).mean()

    @paddle.no_grad()
    def update_selection_bias(
        self, load_E: np.ndarray, rate: float, expert_mask_E: np.ndarray | None = None
    ) -> None:
        """bias += rate * sign(mean_load - load); experts outside an elastic subset keep their
        bias."""
        load = np.asarray(load_E, dtype=np.float64)
        active = np.ones_like(load, dtype=bool) if expert_mask_E is None else expert_mask_E
        if not active.any():
            return
        delta = rate * np.sign(load[active].mean() - load) * active
        self.selection_bias.set_value(
            self.selection_bias + paddle.to_tensor(delta.astype(np.float32))
        )
