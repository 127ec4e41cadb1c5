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

Universal pool (model/universal.py): a router built with a `window` (the W pool experts its layer
reaches) scores only those W choices, adds the trajectory state's projection to its logits, keeps
its selection bias per window slot and returns pool ids; loads and elastic masks are in pool order.
A slot may be closed (a negative `window_offset` on its logit and selection score, set by a
conversion and decayed by the trainer). Legend there: W window slots, C = E or W router choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from ..config import MoEConfig

# A window slot whose offset is below this is closed: left out of the balance (it takes no load).
CLOSED_BELOW = -1.0


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
    def __init__(
        self, hidden_size: int, cfg: MoEConfig, init_std: float, window: np.ndarray | None = None
    ):
        super().__init__()
        self.cfg = cfg
        # Pool ids of the choices (universal pool) or None (the choices are the layer's experts).
        self.window = None if window is None else np.asarray(window, dtype=np.int64)
        choices = cfg.num_experts if window is None else len(window)
        self.weight = self.create_parameter(
            [hidden_size, choices],
            dtype="float32",
            default_initializer=nn.initializer.Normal(std=init_std),
        )
        self.register_buffer(
            "selection_bias", paddle.zeros([choices], dtype="float32"), persistable=True
        )
        if window is not None:
            d = cfg.universal.trajectory_dim
            if d > 0:
                self.state_proj = self.create_parameter(
                    [d, choices], dtype="float32", default_initializer=nn.initializer.Constant(0.0)
                )
            self.register_buffer(
                "window_offset", paddle.zeros([choices], dtype="float32"), persistable=True
            )
            self._slot_of = np.full([cfg.num_experts], -1, dtype=np.int64)
            self._slot_of[self.window] = np.arange(choices)
            self._window_t = paddle.to_tensor(self.window)

    def forward(
        self,
        x_TM,
        num_seqs: int = 1,
        top_k: int | None = None,
        expert_mask_E: np.ndarray | None = None,
        forced_ids_TK=None,
        state_TD=None,
    ) -> Routing:
        """`expert_mask_E`, `forced_ids_TK` and the returned ids and loads are in pool order;
        `state_TD`: the trajectory state (universal routers)."""
        cfg = self.cfg
        k = top_k or cfg.top_k
        logits_TC = paddle.matmul(x_TM.astype("float32"), self.weight)
        offset_C = None
        if self.window is not None:
            if state_TD is not None and cfg.universal.trajectory_dim > 0:
                logits_TC = logits_TC + paddle.matmul(state_TD, self.state_proj)
            offset_C = self.window_offset
            logits_TC = logits_TC + offset_C
            if expert_mask_E is not None:
                expert_mask_E = np.asarray(expert_mask_E)[self.window]
        if expert_mask_E is not None:
            # Experts outside an elastic subset do not exist for this pass: the router behaves
            # exactly like the router of a model sliced down to the subset (same scores, choices).
            allowed = paddle.to_tensor(expert_mask_E).unsqueeze(0)
            logits_TC = paddle.where(allowed, logits_TC, paddle.full_like(logits_TC, float("-inf")))
        scores_TC = (
            F.softmax(logits_TC, axis=-1) if cfg.score_func == "softmax" else F.sigmoid(logits_TC)
        )
        select_TC = scores_TC.detach() + self.selection_bias
        if offset_C is not None:
            select_TC = select_TC + offset_C
        if expert_mask_E is not None:
            select_TC = paddle.where(allowed, select_TC, paddle.full_like(select_TC, float("-inf")))
        chosen_TK = paddle.topk(select_TC, k, axis=-1).indices
        if forced_ids_TK is None:
            slots_TK = chosen_TK
        elif self.window is None:
            slots_TK = forced_ids_TK.astype("int64")
        else:
            slots_TK = paddle.to_tensor(self._slot_of[forced_ids_TK.numpy().astype(np.int64)])
        picked_TK = paddle.take_along_axis(scores_TC, slots_TK, axis=-1)
        topk_weights_TK = picked_TK / (picked_TK.sum(axis=-1, keepdim=True) + 1e-20)
        topk_ids_TK, chosen_ids_TK = self.to_pool(slots_TK), self.to_pool(chosen_TK)
        load_E = paddle.bincount(topk_ids_TK.flatten(), minlength=cfg.num_experts)

        zero = paddle.zeros([], dtype="float32")
        aux_loss = (
            self._sequence_aux_loss(scores_TC, slots_TK, num_seqs)
            if cfg.aux_loss_weight > 0
            else zero
        )
        z_loss = (
            paddle.logsumexp(logits_TC, axis=-1).pow(2).mean() if cfg.z_loss_weight > 0 else zero
        )
        return Routing(
            topk_ids_TK,
            topk_weights_TK,
            load_E,
            aux_loss,
            z_loss,
            logits_TC.detach(),
            chosen_ids_TK,
        )

    def to_pool(self, slots_TK):
        """Router choices -> expert ids (pool ids for a window router)."""
        if self.window is None:
            return slots_TK
        return paddle.gather(self._window_t, slots_TK.reshape([-1])).reshape(slots_TK.shape)

    def _sequence_aux_loss(self, scores_TE, topk_ids_TK, num_seqs: int):
        """E * sum_e f_e * P_e averaged over sequences (DeepSeek-V3 complementary balance loss)."""
        e, k = scores_TE.shape[-1], topk_ids_TK.shape[-1]
        t = scores_TE.shape[0] // num_seqs
        probs_NSE = (scores_TE / (scores_TE.sum(axis=-1, keepdim=True) + 1e-20)).reshape(
            [num_seqs, t, e]
        )
        onehot_NSE = F.one_hot(topk_ids_TK, e).sum(axis=1).reshape([num_seqs, t, e])
        frac_NE = onehot_NSE.mean(axis=1) * (e / k)
        return (frac_NE * probs_NSE.mean(axis=1)).sum(axis=-1).mean()

    @paddle.no_grad()
    def update_selection_bias(
        self,
        load_E: np.ndarray,
        rate: float,
        expert_mask_E: np.ndarray | None = None,
        target_C: np.ndarray | None = None,
    ) -> None:
        """bias += rate * sign(target - load), target = the mean load of the active choices (or
        `target_C`, per choice, e.g. the universal balance's); experts outside an elastic subset,
        and closed window slots, keep their bias. `load_E`, `expert_mask_E`: pool order."""
        load = np.asarray(load_E, dtype=np.float64)
        active = np.ones_like(load, dtype=bool) if expert_mask_E is None else expert_mask_E
        if self.window is not None:
            load, active = load[self.window], active[self.window] & self.open_slots()
        if not active.any():
            return
        target = load[active].mean() if target_C is None else np.asarray(target_C)
        delta = rate * np.sign(target - load) * active
        self.selection_bias.set_value(
            self.selection_bias + paddle.to_tensor(delta.astype(np.float32))
        )

    def open_slots(self) -> np.ndarray:
        """[W] bool: window slots open enough to take part in the balance."""
        return self.window_offset.numpy() >= CLOSED_BELOW

    @paddle.no_grad()
    def open_window(self, decay: float) -> None:
        """One step of the progressive opening: offset *= decay (offsets under 1e-3 become 0)."""
        offset = self.window_offset.numpy() * decay
        offset[np.abs(offset) < 1e-3] = 0.0
        self.window_offset.set_value(paddle.to_tensor(offset.astype(np.float32)))
