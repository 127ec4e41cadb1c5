"""Rank layout from ParallelConfig, checked before any work, and Fleet's hybrid topology.

Expert-parallel ranks are dense data-parallel ranks (each sees its own slice of the batch); they
differ only in which experts they hold. So for Fleet the data axis has degree dp * ep, and `ep` sits
directly after `dp` in `parallel.order`: rank = ((d * ep + e) * ... ) with the remaining axes in
order.

Groups (ranks that differ only in the named axes):
    ep          the experts of one MoE layer are split over these ranks (dispatch traffic)
    data        dp x ep x sharding: every rank that sees different tokens (dense gradients, loads)
    expert_data dp x sharding: ranks holding the same experts (expert gradients)
    sharding    optimizer-state owners (stage 1)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..config import ConfigError, ParallelConfig

AXES = ("dp", "ep", "pp", "sharding", "mp")


def world_size_from_env() -> int:
    """Number of processes `paddle.distributed.launch` started (1 when run directly)."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def rank_from_env() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def check_degrees(pcfg: ParallelConfig, world_size: int, num_experts: int, cuda: bool) -> None:
    """Raise ConfigError for degrees this world or this build cannot run."""
    degrees = {a: getattr(pcfg, a) for a in AXES}
    product = math.prod(degrees.values())
    if product != world_size:
        shown = " * ".join(f"{a}={d}" for a, d in degrees.items())
        raise ConfigError(
            f"parallel degrees {shown} = {product} is invalid: allowed a product equal to "
            f"the number of processes ({world_size}); launch with "
            f"`python -m paddle.distributed.launch --nproc_per_node {product}` or change them"
        )
    if num_experts % pcfg.ep:
        raise ConfigError(
            f"parallel.ep={pcfg.ep} is invalid: allowed a divisor of "
            f"model.moe.num_experts={num_experts}"
        )
    if degrees["mp"] > 1 and not cuda:
        raise ConfigError(
            f"parallel.mp={degrees['mp']} is invalid on a CPU build of Paddle: allowed 1 (tensor "
            "parallel uses Fleet's ColumnParallelLinear, which refuses the CPU: 'Only support xpu, "
            "gpu and custom_device')"
        )
    if degrees["mp"] > 1:
        # The trainer wraps data, sharding, expert and pipeline parallel (parallel/pipeline.py);
        # tensor parallel is sized by the planner but not driven by this trainer.
        raise ConfigError(
            f"parallel.mp={pcfg.mp} is invalid for `ernie5 train`: allowed 1 (tensor parallel is "
            "a GPU path sized by `ernie5 plan`)"
        )
    if pcfg.sharding > 1 and pcfg.sharding_stage != 1:
        raise ConfigError(
            f"parallel.sharding_stage={pcfg.sharding_stage} is invalid for `ernie5 train`: "
            "allowed 1 (optimizer-state sharding)"
        )


@dataclass(frozen=True)
class Layout:
    """Coordinates of every rank along the five axes, in `order` (last axis varies fastest)."""

    order: tuple[str, ...]
    degrees: dict

    @classmethod
    def from_config(cls, pcfg: ParallelConfig) -> Layout:
        return cls(tuple(pcfg.order), {a: getattr(pcfg, a) for a in AXES})

    @property
    def world_size(self) -> int:
        return math.prod(self.degrees.values())

    def coords(self, rank: int) -> dict[str, int]:
        out = {}
        for axis in reversed(self.order):
            rank, out[axis] = divmod(rank, self.degrees[axis])
        return out

    def groups(self, axes: tuple[str, ...]) -> list[list[int]]:
        """Partition of all ranks into groups that differ only along `axes` (sorted,
        deterministic)."""
        fixed = [a for a in self.order if a not in axes]
        by_key: dict[tuple, list[int]] = {}
        for r in range(self.world_size):
            c = self.coords(r)
            by_key.setdefault(tuple(c[a] for a in fixed), []).append(r)
        return [by_key[k] for k in sorted(by_key)]


GROUP_AXES = {
    "ep": ("ep",),
    "data": ("dp", "ep", "sharding"),
    "expert_data": ("dp", "sharding"),
    "sharding": ("sharding",),
    "pp": ("pp",),
}


def fleet_strategy(pcfg: ParallelConfig):
    """Fleet's DistributedStrategy for these degrees: the data axis carries dp * ep ranks."""
    from paddle.distributed import fleet

    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {
        "dp_degree": pcfg.dp * pcfg.ep,
        "mp_degree": pcfg.mp,
        "pp_degree": pcfg.pp,
        "sharding_degree": pcfg.sharding,
        "order": _fleet_order(pcfg.order),
    }
    return strategy


def _fleet_order(order: tuple[str, ...]) -> list[str]:
    """Fleet's axis names in our order: ep folded into dp, then Fleet's axes we do not use (sep, cp;
    degree 1, so where they sit moves no rank)."""
    return [a for a in order if a != "ep"] + ["sep", "cp"]


def init_groups(pcfg: ParallelConfig, rank: int, fleet_init: bool = True, cuda: bool = False):
    """fleet.init with the hybrid topology, then role -> (Group, ranks) for this rank (a role this
    rank holds alone gets `comm.Solo`).

    Fleet's HybridCommunicateGroup forms the sharding and pipeline groups and the data group (our
    dp x ep; fused with sharding when sharding > 1). Fleet 3.3.1's expert-parallel topology
    (`EPHybridCommunicateGroup`) requires dp_degree 1 and expresses data parallel as sharding, which
    is not this trainer's layout, so the ep and expert_data groups are made here from the ranks of
    Fleet's own topology (ep splits Fleet's data axis into consecutive runs of `ep` ranks). Every
    role's ranks are checked against `Layout`, which the planner and the tests use.

    Every rank creates every group in the same order (group creation is collective). Fleet is
    initialised once per process; `fleet_init=False` builds the groups of another layout in the
    same process (tests only) from `Layout` with plain new_group calls."""
    from paddle.distributed import fleet

    from . import comm, fleet_compat

    layout = Layout.from_config(pcfg)
    if not fleet_init:
        return _groups_from_ranks(
            {role: layout.groups(axes) for role, axes in GROUP_AXES.items()}, rank
        )
    fleet_compat.apply("nccl" if cuda else "gloo", pcfg.pp, cuda)
    fleet.init(is_collective=True, strategy=fleet_strategy(pcfg))
    hcg = fleet.get_hybrid_communicate_group()
    mine = {}
    for role, group in (
        ("sharding", hcg.get_sharding_parallel_group()),
        ("pp", hcg.get_pipe_parallel_group()),
    ):
        mine[role] = (group if group.nranks > 1 else comm.Solo(rank), sorted(group.ranks))
    if pcfg.sharding == 1:
        group = hcg.get_data_parallel_group()
        mine["data"] = (group if group.nranks > 1 else comm.Solo(rank), sorted(group.ranks))
    else:
        ranks, group = hcg.create_fuse_group(["data", "sharding"])
        mine["data"] = (group, sorted(ranks))
    topo = hcg.topology()
    coords = [topo.get_coord(r)._asdict() for r in range(topo.world_size())]

    def partition(key) -> list[list[int]]:
        by_key: dict = {}
        for r, c in enumerate(coords):
            by_key.setdefault(key(c), []).append(r)
        return sorted(sorted(g) for g in by_key.values())

    others = [a for a in coords[0] if a not in ("data", "sharding")]
    made = _groups_from_ranks(
        {
            "ep": partition(
                lambda c: (c["data"] // pcfg.ep, c["sharding"], *(c[a] for a in others))
            ),
            "expert_data": partition(lambda c: (c["data"] % pcfg.ep, *(c[a] for a in others))),
        },
        rank,
    )
    mine.update(made)
    for role, axes in GROUP_AXES.items():
        expected = next(g for g in layout.groups(axes) if rank in g)
        if mine[role][1] != expected:
            raise AssertionError(
                f"Fleet's {role} group {mine[role][1]} differs from the layout's {expected}"
            )
    return mine


def _groups_from_ranks(partitions: dict[str, list[list[int]]], rank: int) -> dict:
    """role -> (Group, ranks) of this rank from every role's partition of the ranks; each group is
    created on every rank in the same order."""
    import paddle.distributed as dist

    from . import comm

    mine = {}
    for role, groups in partitions.items():
        for ranks in groups:
            group = dist.new_group(ranks) if len(ranks) > 1 else comm.Solo(ranks[0])
            if rank in ranks:
                mine[role] = (group, ranks)
    return mine
