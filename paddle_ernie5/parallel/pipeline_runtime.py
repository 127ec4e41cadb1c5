"""The runtime of a pipeline-parallel run (parallel.pp > 1): Fleet's 1F1B schedule over the stages
of parallel/pipeline.py, composed with data, expert and optimizer-state sharding (runtime.py).

    global batch ──shard_batch──> this pipeline's rows ──split──> parallel.micro_batches
    PipelineParallel.forward_backward_pipeline: 1F1B, forward and backward of every micro-batch
        first stage reads the micro-batches, last stage scores them (PipelineObjective)
    loss values (last stage, summed over data ranks) and router loads (each stage's own layers,
    summed over data ranks by reduce_loads) ──all_gather over the pipeline──> every rank
    reduce_gradients (Distributed: data / expert_data groups, this stage's parameters)
    clip: global norm over every stage (squares summed over the pipeline group)
    optimizer step over this stage's parameters; aux-free bias update of every router

Every rank builds the whole Ernie5Model (the same initialisation as one process with the same seed)
and keeps it as the trainer's model: its stage's modules are the ones the pipeline runs, the others
are a copy that only evaluation and generation read, refreshed from their stages by
`refresh_model`. The optimizer, its moments and the gradients cover this stage's parameters only.
Checkpoints hold the full model under the single-device names, joined over the pipeline and
written by rank 0; any checkpoint loads into any layout.
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.distributed as dist

from ..config import Config, ConfigError
from ..model.inputs import to_model_batch
from ..optim.optimizer import optimizer_state
from . import comm, expert
from .pipeline import PipelineObjective, build_pipeline, model_names


class Pipelined:
    """One rank of a pp x (dp x ep x sharding) run. `base` is the runtime of this rank's data,
    expert and sharding groups (runtime.Distributed): what this class does not define is base's,
    and base sees only this stage's parameters where it matters (optimizer, step, checkpoints)."""

    pipelined = True

    def __init__(self, cfg: Config, rank: int, groups: dict, base):
        _check_trainer_settings(cfg)
        self.base, self.cfg = base, cfg
        self.pp_group, self.pp_ranks = groups["pp"]
        self.stage = self.pp_ranks.index(rank)
        self.is_last = self.stage == len(self.pp_ranks) - 1
        self.micro_batches = cfg.parallel.micro_batches
        self.objective = PipelineObjective(cfg.model)
        self.owned: set[str] = set()  # model names of this stage's parameters and buffers
        self._stats: list = []  # (layer, router stats) of this pass

    def __getattr__(self, name):
        if name == "base":  # not set yet
            raise AttributeError(name)
        return getattr(self.base, name)

    # ------------------------------------------------------------------ model and optimizer
    def wrap_model(self, model):
        from paddle.distributed import fleet
        from paddle.distributed.fleet.meta_parallel import PipelineParallel

        from .topology import fleet_strategy

        hcg = fleet.get_hybrid_communicate_group()
        self.pipe = build_pipeline(
            model, self.cfg.parallel, hcg.topology(), self._record, self.objective
        )
        strategy = fleet_strategy(self.cfg.parallel)
        rows = self.cfg.train.batch_size // len(self.data_ranks)
        strategy.pipeline_configs = {
            "accumulate_steps": self.micro_batches,
            "micro_batch_size": rows // self.micro_batches,
            # Shapes are sent with every micro-batch: text and multimodal batches differ.
            "p2p_cache_shape": False,
        }
        # Built before expert parallel slices the experts: Fleet broadcasts the stage's weights over
        # its data axis (dp x ep), which must still hold identical full experts then.
        self.engine = PipelineParallel(self.pipe, hcg, strategy=strategy)
        model = self.base.wrap_model(model)
        self.owned = set(model_names(self.pipe, model.cfg.num_layers).values())
        return model

    def _mine(self, model) -> _Owned:
        return _Owned(model, self.owned)

    def build_optimizer(self, model, tc):
        return self.base.build_optimizer(self._mine(model), tc)

    def optimizer_step(self, model, optimizer) -> None:
        self.base.optimizer_step(self._mine(model), optimizer)

    # ------------------------------------------------------------------ one pipeline pass
    def _record(self, layer: int, stats) -> None:
        self._stats.append((layer, stats))

    def forward_backward(self, global_batch: dict, scale: float):
        """Forward and backward of this pipeline's rows of `global_batch` (loss scaled by `scale`),
        1F1B over parallel.micro_batches. Returns (the global batch's loss values, on every rank;
        {MoE layer: (load summed over this rank's micro-batches, expert mask)} of every layer)."""
        local = self.shard_batch(global_batch)
        rows = len(local["input_ids"]) // self.micro_batches
        micro = [
            _pipeline_batch({k: v[j * rows : (j + 1) * rows] for k, v in local.items()})
            for j in range(self.micro_batches)
        ]
        data = {k: [mb[k] for mb in micro] for k in micro[0]}
        if self.is_last:
            counts = self.objective.global_counts(to_model_batch(global_batch))
            self.objective.begin(counts, self.micro_batches, len(self.data_ranks), scale)
        self._stats = []
        self.engine.forward_backward_pipeline((data, data))
        values = None
        if self.is_last:
            keys = sorted(self.objective.values)
            summed = comm.all_reduce_numpy(
                np.array([self.objective.values[k] for k in keys]), self.group("data")
            )
            values = dict(zip(keys, summed.tolist()))
        loads: dict = {}
        for layer, stats in self._stats:
            load = stats.load_E.numpy()
            prev = loads.get(layer, (0, stats.expert_mask_E))[0]
            loads[layer] = (prev + load, stats.expert_mask_E)
        self._stats = []
        parts: list = []
        dist.all_gather_object(parts, (values, loads), group=self.pp_group)
        values = next(v for v, _ in parts if v is not None)
        return values, {i: s for _, part in parts for i, s in part.items()}

    # ------------------------------------------------------------------ gradients
    @paddle.no_grad()
    def clip(self, model, max_norm: float) -> float:
        """Global norm over every stage: this stage's (experts summed over ep, by base),
        squared and summed over the pipeline group."""
        local = self.base.clip(model, 0.0)
        norm = float(np.sqrt(comm.all_reduce_numpy(np.array([local**2]), self.pp_group)[0]))
        if max_norm > 0 and norm > max_norm:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.scale_(max_norm / (norm + 1e-6))
        return norm

    # ------------------------------------------------------------------ full model and checkpoints
    def _joined(self, states: tuple) -> tuple:
        """Each stage's dicts, joined over the pipeline group (every rank gets the union)."""
        parts: list = []
        dist.all_gather_object(parts, states, group=self.pp_group)
        return tuple(
            {k: v for part in parts for k, v in part[j].items()} for j in range(len(states))
        )

    def full_states(self, model, optimizer):
        """As base.full_states over this stage's names, then joined over the pipeline."""
        mine = self._mine(model)
        model_state = {k: v.numpy() for k, v in mine.state_dict().items()}
        optim_state = optimizer_state(mine, optimizer)
        if self.owner:  # stage 1: every owner's moments, joined
            parts: list = []
            dist.all_gather_object(parts, optim_state, group=self.group("sharding"))
            optim_state = {k: v for part in parts for k, v in part.items()}
        if self.ep > 1:
            names = [n for n in self.expert_names if n in self.owned]
            shapes = {n: tuple(model_state[n].shape) for n in names}
            group = self.group("ep")
            model_state = expert.gather_expert_rows(model_state, names, group, shapes)
            optim_state = expert.gather_expert_rows(optim_state, names, group, shapes)
        return self._joined((model_state, optim_state))

    @paddle.no_grad()
    def refresh_model(self, model) -> None:
        """The other stages' parameters and buffers into this rank's copy of the model (before it
        runs whole: evaluation, generation)."""
        mine = self._mine(model).state_dict()
        (state,) = self._joined(({k: v.numpy() for k, v in mine.items()},))
        model.set_state_dict(
            {k: paddle.to_tensor(v) for k, v in state.items() if k not in self.owned}
        )

    def load_states(self, model, optimizer, model_state, optim_state) -> None:
        """The full model everywhere; optimizer moments of this stage's parameters."""
        optim_state = {k: v for k, v in optim_state.items() if k.partition("::")[0] in self.owned}
        self.base.load_states(model, optimizer, model_state, optim_state)


class _Owned:
    """A model restricted to this stage's names: parameters and state."""

    def __init__(self, model, names: set[str]):
        self.model, self.names = model, names

    def named_parameters(self):
        return [(n, p) for n, p in self.model.named_parameters() if n in self.names]

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def state_dict(self):
        return {k: v for k, v in self.model.state_dict().items() if k in self.names}


def _pipeline_batch(np_batch: dict) -> dict:
    """A micro-batch as the tensors Fleet moves: the model batch with mask_causal as a tensor."""
    batch = to_model_batch(np_batch)
    batch["mask_causal"] = paddle.to_tensor([int(batch["mask_causal"])], dtype="int32")
    return batch


def _check_trainer_settings(cfg: Config) -> None:
    """What the pretraining trainer does around the forward that a pipeline pass does not."""
    refused = {
        "elastic.enabled": cfg.elastic.enabled,
        "train.simreg.enabled": cfg.train.simreg.enabled,
        "train.clip.mode=adagc": cfg.train.clip.mode == "adagc",
    }
    on = [k for k, v in refused.items() if v]
    if on:
        raise ConfigError(
            f"{', '.join(on)} is invalid with parallel.pp > 1: allowed off (elastic views, "
            "SimReg and AdaGC need the whole model's forward or every tensor's gradient norm on "
            "one rank; the pipeline runs neither)"
        )
