"""Mixture-of-experts feed-forward: router -> dispatcher -> experts -> combine, plus a shared
expert.

Legend: B batch, S sequence, T = B*S tokens, M width, E experts, K top-k.

    x_BSM -> router -> Routing(ids, weights, load)
          -> dispatcher.dispatch -> expert_inputs_ECM -> experts -> dispatcher.combine -> y_TM
          + shared_expert(x)

With `expert_backend` cpu_op (auto on the CPU) and the local dispatcher, dispatch, experts and
combine are one fused op (experts.routed) that reads token rows by index; expert-parallel
dispatchers, and grouped, take the path drawn above.

Universal pool (model/universal.py): the layer owns only its router (over its window) and shared
expert; the routed experts are the model's pool, passed in at construction and not registered
here (the model holds them once). The router also reads the trajectory state, and the layer
reports the state after it (`RouterStats.trajectory_TD`) for the next MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
from paddle import nn

from ..config import MoEConfig
from ..ops.moe_experts import resolve_backend
from .dispatch import LocalDispatcher
from .experts import GroupedExperts, SwiGLU
from .router import Router, Routing
from .universal import UniversalPool
from .view import FULL_VIEW, ElasticView


@dataclass
class RouterStats:
    """What one MoE layer reports per forward (explicit outputs, read by losses and the trainer)."""

    load_E: paddle.Tensor  # int64 assignments per expert
    aux_loss: paddle.Tensor
    z_loss: paddle.Tensor
    expert_mask_E: np.ndarray | None  # experts the elastic view allowed (None = all)
    topk_ids_TK: paddle.Tensor | None = None  # experts chosen per token (for router replay)
    logits_TE: paddle.Tensor | None = None  # router logits, detached
    chosen_ids_TK: paddle.Tensor | None = None  # the router's own choice (differs under replay)
    trajectory_TD: paddle.Tensor | None = None  # universal router state after this layer


class MoE(nn.Layer):
    def __init__(
        self,
        hidden_size: int,
        cfg: MoEConfig,
        init_std: float,
        fused: bool = True,
        pool: UniversalPool | None = None,
        window: np.ndarray | None = None,
    ):
        """`pool` and `window`: a layer of a universal model (the shared pool, this layer's
        window of pool ids)."""
        super().__init__()
        self.cfg = cfg
        self.router = Router(hidden_size, cfg, init_std, window)
        # A tuple keeps the pool out of this layer's sublayers: its parameters belong to the model.
        self._pool = (pool,) if pool is not None else None
        if pool is None:
            self.experts = GroupedExperts(cfg.num_experts, hidden_size, cfg.expert_hidden, init_std)
        self.shared = (
            SwiGLU(hidden_size, cfg.shared_expert_hidden * cfg.num_shared_experts, init_std, fused)
            if cfg.num_shared_experts > 0
            else None
        )
        # A strategy object without state; expert parallelism swaps it for a distributed one.
        self.dispatcher = LocalDispatcher(cfg.capacity_factor)

    @property
    def universal(self) -> bool:
        return self._pool is not None

    def expert_bank(self) -> GroupedExperts:
        """The routed experts this layer runs: its own, or the universal pool's."""
        return self._pool[0].experts if self._pool is not None else self.experts

    def route(
        self, x_TM, num_seqs: int, view: ElasticView, forced_ids_TK=None, state_TD=None
    ) -> Routing:
        return self.router(
            x_TM,
            num_seqs=num_seqs,
            top_k=view.top_k,
            expert_mask_E=view.expert_mask(self.cfg.num_experts),
            forced_ids_TK=forced_ids_TK,
            state_TD=state_TD,
        )

    def forward(self, x_BSM, view: ElasticView = FULL_VIEW, replay_ids_BSK=None, state_TD=None):
        """`replay_ids_BSK`: recorded expert ids to use instead of the router's choice (router
        replay). `state_TD`: the trajectory state from the previous MoE layer (universal; None at
        the first)."""
        b, s, m = x_BSM.shape
        x_TM = x_BSM.reshape([b * s, m])
        forced = None if replay_ids_BSK is None else replay_ids_BSK.reshape([b * s, -1])
        if self.universal and state_TD is None:
            state_TD = self._pool[0].initial_state(b * s)
        routing = self.route(x_TM, b, view, forced, state_TD)
        y_TM = self.routed_experts(x_TM, routing)
        if self.shared is not None:
            y_TM = y_TM + self.shared(x_TM)
        stats = RouterStats(
            routing.load_E,
            routing.aux_loss,
            routing.z_loss,
            view.expert_mask(self.cfg.num_experts),
            routing.topk_ids_TK,
            routing.logits_TE,
            routing.chosen_ids_TK,
        )
        if self.universal:
            stats.trajectory_TD = self._pool[0].next_state(
                state_TD, routing.topk_ids_TK, routing.topk_weights_TK
            )
        return y_TM.reshape([b, s, m]), stats

    def routed_experts(self, x_TM, routing: Routing):
        """The weighted sum of each token's experts: the fused op when it serves this call."""
        fused = (
            isinstance(self.dispatcher, LocalDispatcher)
            and resolve_backend(self.cfg.expert_backend, x_TM) == "cpu_op"
        )
        if fused:
            return self.expert_bank().routed(
                x_TM,
                routing.topk_ids_TK,
                routing.topk_weights_TK,
                self.cfg.capacity_factor,
                backend="cpu_op",
            )
        expert_inputs_ECM, _, meta = self.dispatcher.dispatch(x_TM, routing, self.cfg.num_experts)
        return self.dispatcher.combine(self.expert_bank()(expert_inputs_ECM), meta)

    def forward_reference(self, x_BSM, view: ElasticView = FULL_VIEW, state_TD=None):
        """Naive per-expert loop with the same routing: the oracle the grouped path is tested
        against."""
        b, s, m = x_BSM.shape
        x_TM = x_BSM.reshape([b * s, m])
        routing = self.route(x_TM, b, view, None, state_TD)
        ids_TK = routing.topk_ids_TK.numpy()
        y_TM = paddle.zeros_like(x_TM)
        for e in range(self.cfg.num_experts):
            tok, slot = np.nonzero(ids_TK == e)
            if tok.size == 0:
                continue
            tok_t = paddle.to_tensor(tok)
            w = paddle.gather_nd(
                routing.topk_weights_TK, paddle.to_tensor(np.stack([tok, slot], 1))
            )
            out = self.expert_bank().expert_forward(e, paddle.gather(x_TM, tok_t))
            out = out * w.unsqueeze(-1)
            y_TM = paddle.index_add(y_TM, tok_t, 0, out)
        if self.shared is not None:
            y_TM = y_TM + self.shared(x_TM)
        return y_TM.reshape([b, s, m])
