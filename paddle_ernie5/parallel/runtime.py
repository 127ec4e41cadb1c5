"""What the trainer calls to run on one process or many: the same methods, two implementations.

`SingleProcess` is the identity (the trainer's single-process numbers stay bit-exact).
`Distributed` runs data parallel (dp), expert parallel (ep) and optimizer-state sharding (stage
1) under `paddle.distributed.launch`, with only all_reduce / all_gather / broadcast, so it runs on
gloo:

    global batch ──shard_batch──> this rank's rows ──model──> loss normalised by the GLOBAL
                                                              target counts
    backward ──reduce_gradients──> dense grads summed over data ranks, expert grads over the ranks
                                   holding the same experts (sum, because each rank's loss is
                                   already its share of the global mean)
    clip (global norm, expert part summed over ep) ──optimizer step (stage 1: owned params, then
    broadcast)──> router loads summed over data ranks ──> identical aux-free bias update everywhere

`train.batch_size` is the global batch, so a recipe gives the same optimisation on any number of
processes. Checkpoints hold full expert weights (rows joined over ep) and are written by rank 0.
"""

from __future__ import annotations

import numpy as np
import paddle

from ..config import Config
from ..model.losses import IGNORE, mtp_labels
from ..optim.optimizer import (
    build_optimizer,
    clip_by_global_norm,
    global_grad_norm,
    is_fused,
    load_optimizer_state,
    optimizer_state,
    scale_grads,
    tensor_sq_norms,
)
from . import comm, expert, topology


def _loss_values(parts) -> dict[str, float]:
    return {
        "loss": float(parts.total),
        "loss/text": float(parts.text),
        "loss/mtp": float(parts.mtp) if parts.mtp is not None else 0.0,
        "loss/aux": float(parts.aux),
        "loss/z": float(parts.z),
        **{f"loss/{name}": float(loss) for name, (loss, _, _) in parts.heads.items()},
    }


class SingleProcess:
    rank, world_size, is_main = 0, 1, True
    pipelined = False  # True: the runtime runs each micro-step's forward and backward itself
    # What build_optimizer returned. With the fused AdamW, clipping sums the squares with its op
    # and leaves the clip factor to its step.
    optimizer = None

    def refresh_model(self, model) -> None:
        """Make this rank's whole model current before it runs whole (evaluation, generation):
        nothing to do unless pipelined (parallel/pipeline_runtime.py)."""

    def wrap_model(self, model):
        return model

    def train_forward(self, model):
        """The callable a training forward goes through (the model itself on one process)."""
        return model

    def build_optimizer(self, model, tc):
        self.optimizer = build_optimizer(model, tc)
        return self.optimizer

    def shard_batch(self, np_batch: dict) -> dict:
        return np_batch

    def objective(self, parts, labels, model_cfg):
        return parts.total, _loss_values(parts)

    def reduce_gradients(self, model) -> None:
        pass

    def clip(self, model, max_norm: float) -> float:
        return clip_by_global_norm(model.parameters(), max_norm, self.optimizer)

    def grad_sq_norms(self, named) -> np.ndarray:
        """Squared gradient norm of each (name, parameter) of the full model (per-tensor
        clipping)."""
        return tensor_sq_norms([p for _, p in named], is_fused(self.optimizer))

    def sum_over_data(self, values: np.ndarray) -> np.ndarray:
        """Sum of a small array over the data-parallel ranks (the identity on one process)."""
        return values

    def optimizer_step(self, model, optimizer) -> None:
        optimizer.step()

    def reduce_loads(self, loads: dict) -> dict:
        return loads

    def full_states(self, model, optimizer):
        return (
            {k: v.numpy() for k, v in model.state_dict().items()},
            optimizer_state(model, optimizer),
        )

    def local_state(self, state: dict) -> dict:
        """This rank's share of a full (checkpoint) state: the identity on one process."""
        return state

    def load_states(self, model, optimizer, model_state, optim_state) -> None:
        model.set_state_dict(
            {k: paddle.to_tensor(v) for k, v in self.local_state(model_state).items()}
        )
        load_optimizer_state(model, optimizer, self.local_state(optim_state))

    def barrier(self) -> None:
        pass


class Distributed(SingleProcess):
    """One rank of a dp x ep x sharding run (mp = 1; pp > 1 is parallel/pipeline_runtime.py)."""

    def __init__(self, cfg: Config, rank: int, groups: dict, cuda: bool):
        pcfg = cfg.parallel
        self.cfg, self.rank = cfg, rank
        self.world_size = topology.Layout.from_config(pcfg).world_size
        self.is_main = rank == 0
        self.groups = groups  # role -> (Group or None, ranks)
        self.ep = pcfg.ep
        self.ep_rank = groups["ep"][1].index(rank)
        self.data_ranks = groups["data"][1]
        self.data_index = self.data_ranks.index(rank)
        self.dispatcher_kind = expert.resolve_dispatcher(pcfg.dispatcher, pcfg.ep, cuda)
        self.sharding_ranks = groups["sharding"][1]
        self.expert_names: list[str] = []
        # stage 1: parameter -> index of its owner in the sharding group
        self.owner: dict[str, int] = {}
        self.dp_model = None  # Fleet's data-parallel wrapper, when data parallel runs through it

    def group(self, role: str):
        return self.groups[role][0]

    # ------------------------------------------------------------------ model and optimizer
    def wrap_model(self, model):
        if self.ep > 1:
            dispatcher = expert.make_dispatcher(
                self.dispatcher_kind,
                self.group("ep"),
                self.ep_rank,
                self.ep,
                self.cfg.model.moe.capacity_factor,
            )
            expert.shard_experts(model, self.ep_rank, self.ep, dispatcher)
            self.expert_names = expert.expert_param_names(model)
        for name, p in model.named_parameters():
            # Expert rows differ between EP ranks: Fleet's data-parallel wrapper neither broadcasts
            # nor reduces them (they are reduced over expert_data below).
            p.no_sync = name in self.expert_names
        if self.cfg.parallel.pp == 1 and len(self.groups["sharding"][1]) == 1:
            from paddle.distributed import fleet

            # Data parallel through Fleet: the wrapper broadcasts the dense weights from the
            # first data rank; gradients are reduced once per step (reduce_gradients), so every
            # forward runs under no_sync (accumulation and elastic views run several backwards).
            self.dp_model = fleet.distributed_model(model)
        return model

    def train_forward(self, model):
        if self.dp_model is None:
            return model

        def forward(*args, **kwargs):
            with self.dp_model.no_sync():
                return self.dp_model(*args, **kwargs)

        return forward

    def build_optimizer(self, model, tc):
        """Stage 1 through Paddle's sharding optimizer: the sharding ranks split the parameters;
        each keeps Adam moments only for its own, updates them and broadcasts them. Gradients are
        already summed over every data rank (reduce_gradients) when it steps, so its own gradient
        reduction is not used."""
        if len(self.sharding_ranks) == 1:
            self.optimizer = build_optimizer(model, tc)
            return self.optimizer
        from paddle.distributed import fleet
        from paddle.distributed.fleet.meta_optimizers.dygraph_optimizer import (
            DygraphShardingOptimizer,
        )

        hcg = fleet.get_hybrid_communicate_group()
        # Paddle's sharding optimizer drives Paddle's AdamW (its accumulators and parameter
        # lists), so the fused AdamW is not used under it.
        opt = DygraphShardingOptimizer(build_optimizer(model, tc, allow_fused=False), hcg)
        named = list(model.named_parameters())
        mine = {p.name for p in opt.filter_parameters([p for _, p in named], hcg)}
        owned: list = []
        paddle.distributed.all_gather_object(
            owned, [n for n, p in named if p.name in mine], group=self.group("sharding")
        )
        self.owner = {name: i for i, names in enumerate(owned) for name in names}
        self.optimizer = opt
        return opt

    # ------------------------------------------------------------------ data and objective
    def shard_batch(self, np_batch: dict) -> dict:
        n = len(self.data_ranks)
        rows = len(next(iter(np_batch.values()))) // n
        return {
            k: v[self.data_index * rows : (self.data_index + 1) * rows] for k, v in np_batch.items()
        }

    def objective(self, parts, labels, model_cfg):
        """This rank's share of the global-batch loss: each mean is re-weighted by its local count
        over the global count, so the shares sum to the loss of one process over the whole batch
        (terms and weights as in model/losses.compute_loss)."""
        n = len(self.data_ranks)
        names = sorted(parts.heads)
        counts = np.array(
            [float(parts.num_targets), float((mtp_labels(labels) != IGNORE).sum())]
            + [float(parts.heads[k][1]) for k in names]
        )
        totals = np.maximum(comm.all_reduce_numpy(counts, self.group("data")), 1.0)
        text = parts.text * (counts[0] / totals[0])
        total = text
        heads = []
        for j, name in enumerate(names):
            loss, _, weight = parts.heads[name]
            heads.append(loss * (counts[2 + j] / totals[2 + j]))
            total = total + weight * heads[-1]
        mtp = paddle.zeros([], dtype="float32")
        if parts.mtp is not None:
            mtp = parts.mtp * (counts[1] / totals[1])
            total = total + model_cfg.mtp_loss_weight * mtp
        aux, z = parts.aux / n, parts.z / n
        if model_cfg.moe.aux_loss_weight > 0:
            total = total + model_cfg.moe.aux_loss_weight * aux
        if model_cfg.moe.z_loss_weight > 0:
            total = total + model_cfg.moe.z_loss_weight * z
        shares = np.array([float(v) for v in (total, text, mtp, aux, z, *heads)])
        values = comm.all_reduce_numpy(shares, self.group("data"))
        keys = (
            "loss",
            "loss/text",
            "loss/mtp",
            "loss/aux",
            "loss/z",
            *(f"loss/{k}" for k in names),
        )
        return total, dict(zip(keys, values.tolist()))

    # ------------------------------------------------------------------ gradients
    @paddle.no_grad()
    def reduce_gradients(self, model) -> None:
        dense, experts = [], []
        for name, p in model.named_parameters():
            # Layers an elastic view skipped have no gradient; every rank draws the same views (same
            # seed), so the same parameters are skipped everywhere and the flat buffers agree.
            if p.grad is not None:
                (experts if name in self.expert_names else dense).append(p)
        _all_reduce_grads(dense, self.group("data"))
        _all_reduce_grads(experts, self.group("expert_data"))

    @paddle.no_grad()
    def grad_sq_norms(self, named) -> np.ndarray:
        """Expert tensors hold 1/ep of their rows on each rank: their squares are summed over EP."""
        sq = tensor_sq_norms([p for _, p in named], is_fused(self.optimizer))
        rows = [i for i, (n, _) in enumerate(named) if n in self.expert_names]
        if rows and self.ep > 1:
            sq[rows] = comm.all_reduce_numpy(sq[rows], self.group("ep"))
        return sq

    def sum_over_data(self, values: np.ndarray) -> np.ndarray:
        return comm.all_reduce_numpy(values, self.group("data"))

    @paddle.no_grad()
    def clip(self, model, max_norm: float) -> float:
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        dense = [p for n, p in named if n not in self.expert_names]
        experts = [p for n, p in named if n in self.expert_names]
        fused = is_fused(self.optimizer)
        sq = global_grad_norm(dense, fused) ** 2
        if experts:
            expert_sq = np.array([global_grad_norm(experts, fused) ** 2])
            sq += float(comm.all_reduce_numpy(expert_sq, self.group("ep"))[0])
        norm = float(np.sqrt(sq))
        if max_norm > 0 and norm > max_norm:
            scale_grads([p for _, p in named], max_norm / (norm + 1e-6), self.optimizer)
        return norm

    def reduce_loads(self, loads: dict) -> dict:
        layers = sorted(loads)
        if not layers:
            return loads
        total = comm.all_reduce_numpy(
            np.stack([loads[i] for i in layers]).astype(np.int64), self.group("data")
        )
        return dict(zip(layers, total))

    # ------------------------------------------------------------------ checkpoints
    def full_states(self, model, optimizer):
        model_state = {k: v.numpy() for k, v in model.state_dict().items()}
        optim_state = optimizer_state(model, _inner(optimizer))
        if self.owner:  # stage 1: every owner's moments, joined
            parts: list = []
            paddle.distributed.all_gather_object(parts, optim_state, group=self.group("sharding"))
            optim_state = {k: v for part in parts for k, v in part.items()}
        if self.ep > 1:
            shapes = {n: tuple(model_state[n].shape) for n in self.expert_names}
            model_state = expert.gather_expert_rows(
                model_state, self.expert_names, self.group("ep"), shapes
            )
            optim_state = expert.gather_expert_rows(
                optim_state, self.expert_names, self.group("ep"), shapes
            )
        return model_state, optim_state

    def local_state(self, state: dict) -> dict:
        """This rank's rows of the expert entries of a full state (model or optimizer)."""
        if self.ep == 1:
            return state
        return expert.slice_expert_rows(
            state, self.expert_names, self.ep_rank, self.ep, self.cfg.model.moe.num_experts
        )

    def load_states(self, model, optimizer, model_state, optim_state) -> None:
        model_state, optim_state = self.local_state(model_state), self.local_state(optim_state)
        model.set_state_dict({k: paddle.to_tensor(v) for k, v in model_state.items()})
        if self.owner:  # stage 1: only the moments of the parameters this rank owns
            mine = self.sharding_ranks.index(self.rank)
            optim_state = {
                k: v for k, v in optim_state.items() if self.owner[k.partition("::")[0]] == mine
            }
        load_optimizer_state(model, _inner(optimizer), optim_state)

    def barrier(self) -> None:
        paddle.distributed.barrier()


def _inner(optimizer):
    """The Paddle optimizer holding the moments (inside Paddle's sharding optimizer, if any)."""
    return getattr(optimizer, "_inner_opt", optimizer)


def _all_reduce_grads(params, group) -> None:
    """Sum the gradients of `params` over `group` (Fleet's fused, bucketed all-reduce; scale 1:
    each rank's loss is already its share of the global mean)."""
    if comm.group_size(group) == 1 or not params:
        return
    from paddle.distributed.fleet.utils.hybrid_parallel_util import (
        fused_allreduce_gradients_with_group,
    )

    fused_allreduce_gradients_with_group(params, group, scale=1.0)


def init_runtime(cfg: Config, world_size: int, rank: int):
    """SingleProcess for one process; otherwise check the degrees, fleet.init and build the
    groups."""
    cuda = paddle.is_compiled_with_cuda()
    topology.check_degrees(cfg.parallel, world_size, cfg.model.moe.num_experts, cuda)
    if world_size == 1:
        return SingleProcess()
    groups = topology.init_groups(cfg.parallel, rank, cuda=cuda)
    if cfg.parallel.pp > 1:
        from .pipeline_runtime import Pipelined

        return Pipelined(cfg, rank, groups, Distributed(cfg, rank, groups, cuda))
    return Distributed(cfg, rank, groups, cuda)
