"""One rank of tests/parallel/test_fleet_compat.py's 4-process check: Fleet's hybrid groups
(dp2 x pp2) and five overlapping subgroups created one after another on gloo, each all-reduced.

Usage: fleet_groups_worker.py <out dir>
"""

import json
import os
import sys

import paddle
import paddle.distributed as dist
from paddle.distributed import fleet

from paddle_ernie5.parallel import fleet_compat

SUBGROUPS = ([0, 1], [2, 3], [0, 2], [1, 3], [0, 3])


def rank_sum(group) -> float:
    t = paddle.to_tensor([float(dist.get_rank())])
    dist.all_reduce(t, group=group)
    return t.item()


def main():
    applied = fleet_compat.apply("gloo", pp=2, cuda=False)
    strategy = fleet.DistributedStrategy()
    strategy.hybrid_configs = {"dp_degree": 2, "mp_degree": 1, "pp_degree": 2}
    fleet.init(is_collective=True, strategy=strategy)
    hcg = fleet.get_hybrid_communicate_group()
    rank = dist.get_rank()
    out = {"applied": applied}
    for name, group in (
        ("dp", hcg.get_data_parallel_group()),
        ("pp", hcg.get_pipe_parallel_group()),
    ):
        out[name] = {"ranks": group.ranks, "sum": rank_sum(group)}
    for ranks in SUBGROUPS:
        group = dist.new_group(ranks)
        if rank in ranks:
            out[str(ranks)] = rank_sum(group)
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
