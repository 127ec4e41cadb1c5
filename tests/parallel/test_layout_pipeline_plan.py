"""Parallel pieces that need no second process: rank layout, degree checks, dispatcher choice,
pipeline partitioning and the cluster planner."""

import itertools
import os

import pytest
from support import RECIPES

from paddle_ernie5 import cli
from paddle_ernie5 import config as C
from paddle_ernie5.model.params import count_params
from paddle_ernie5.parallel import expert
from paddle_ernie5.parallel.planner import make_plan
from paddle_ernie5.parallel.stages import layer_costs, partition, plan_stages
from paddle_ernie5.parallel.topology import Layout, check_degrees

LARGE = os.path.join(RECIPES, "ernie5_large.yaml")


def test_layout_groups_for_dp2_ep2():
    layout = Layout.from_config(C.ParallelConfig(dp=2, ep=2))
    assert [layout.coords(r)["ep"] for r in range(4)] == [0, 1, 0, 1]  # ep inside Fleet's data axis
    assert layout.groups(("ep",)) == [[0, 1], [2, 3]]
    assert layout.groups(("dp", "sharding")) == [[0, 2], [1, 3]]  # same experts
    assert layout.groups(("dp", "ep", "sharding")) == [[0, 1, 2, 3]]


def test_degree_checks_fail_before_any_work():
    with pytest.raises(
        C.ConfigError, match=r"= 4 is invalid: allowed a product equal to the number"
    ):
        check_degrees(C.ParallelConfig(dp=2, ep=2), 2, 8, cuda=False)
    with pytest.raises(C.ConfigError, match="parallel.mp=2 is invalid on a CPU build"):
        check_degrees(C.ParallelConfig(mp=2), 2, 8, cuda=False)
    with pytest.raises(C.ConfigError, match="ColumnParallelLinear, which refuses the CPU"):
        check_degrees(C.ParallelConfig(mp=2), 2, 8, cuda=False)
    check_degrees(C.ParallelConfig(pp=2), 2, 8, cuda=False)  # the pipeline runs on gloo
    with pytest.raises(C.ConfigError, match="parallel.ep=3 is invalid: allowed a divisor"):
        check_degrees(C.ParallelConfig(ep=3), 3, 8, cuda=False)
    check_degrees(C.ParallelConfig(dp=2, ep=2), 4, 8, cuda=False)


def test_config_rejects_bad_parallel_values(debug_config):
    with pytest.raises(C.ConfigError, match="parallel.order=.*ep directly after dp"):
        debug_config("parallel.order=[dp, pp, sharding, ep, mp]")
    with pytest.raises(
        C.ConfigError, match="train.batch_size=4 is invalid: allowed a multiple of .* = 8"
    ):
        debug_config("parallel.dp=8")
    with pytest.raises(C.ConfigError, match="parallel.pp_chunks=2 is invalid"):
        debug_config("parallel.pp_chunks=2")
    with pytest.raises(
        C.ConfigError, match="parallel.micro_batches=3 is invalid: allowed a divisor"
    ):
        debug_config("parallel.pp=2", "parallel.micro_batches=3")


def test_dispatcher_choice():
    assert expert.resolve_dispatcher("auto", 2, cuda=False) == "allgather"
    assert expert.resolve_dispatcher("auto", 2, cuda=True) == "alltoall"
    assert expert.resolve_dispatcher("auto", 1, cuda=True) == "local"
    with pytest.raises(RuntimeError, match="needs NCCL"):
        expert.resolve_dispatcher("alltoall", 2, cuda=False)


def test_partition_is_contiguous_and_minimises_the_largest_stage():
    for costs in ([5, 1, 1, 1, 1, 5], [3, 3, 3, 3, 3, 3, 3], [1, 9, 1, 1, 9, 1, 1, 1]):
        for parts in range(1, len(costs) + 1):
            bounds = partition(costs, parts)
            assert bounds[0] == 0 and bounds[-1] == len(costs) and len(bounds) == parts + 1
            assert all(a < b for a, b in zip(bounds, bounds[1:]))
            best = min(
                max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, len(costs))))
                for cut in itertools.combinations(range(1, len(costs)), parts - 1)
            )
            assert max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) == best


def test_pipeline_stages_of_the_debug_and_large_recipes(debug_config):
    cfg = debug_config("parallel.pp=2")
    stages = plan_stages(cfg.model, cfg.parallel)
    # Compute per token: embed 0 (a lookup), blocks 31,360 each, head 72,064 (text head + MTP), so
    # the head gets a stage of its own.
    assert [s.items for s in stages] == [("embed", "block.0", "block.1"), ("head",)]
    assert [s.params for s in stages] == [32768 + 2 * 68224, 72064]
    assert sum(s.params for s in stages) == count_params(cfg.model)["total"]

    large = C.load_config(LARGE)
    items = [it.name for it in layer_costs(large.model)]
    stages = plan_stages(large.model, large.parallel)
    assert [s.index for s in stages] == list(range(12))
    assert [name for s in stages for name in s.items] == items  # every layer once, in order
    assert sum(s.params for s in stages) == count_params(large.model)["total"]
    compute = [s.activated for s in stages]
    assert max(compute) < 1.2 * sum(compute) / len(compute)  # balanced on compute
    vpp = C.load_config(LARGE, ["parallel.pp_schedule=VPP", "parallel.pp_chunks=2"])
    chunks = plan_stages(vpp.model, vpp.parallel)
    assert [(s.index, s.chunk) for s in chunks[:13]] == [(i % 12, i // 12) for i in range(13)]


def test_plan_numbers_scale_with_the_degrees():
    base = make_plan(C.load_config(LARGE))
    p = count_params(C.load_config(LARGE).model)
    assert (base.total_params, base.activated_params) == (p["total"], p["activated"])
    assert base.tokens_per_step == 256 * 8 * 8192
    assert base.activations_recompute < base.activations
    more_ep = make_plan(C.load_config(LARGE, ["parallel.ep=128", "parallel.dp=2"]))
    assert more_ep.weights < base.weights and more_ep.devices == base.devices
    sharded = make_plan(C.load_config(LARGE, ["parallel.sharding=2", "parallel.dp=2"]))
    assert sharded.optimizer == pytest.approx(base.optimizer / 2)


def test_cli_plan_prints_a_table(capsys):
    assert cli.main(["plan", LARGE, "parallel.ep=64"]) == 0
    out = capsys.readouterr().out
    for row in (
        "parameters, total",
        "activated per token",
        "tokens per step",
        "optimizer",
        "activations, full recompute",
        "total / device, no recompute",
    ):
        assert row in out
    assert cli.main(["plan", LARGE, "parallel.ep=3"]) == cli.USAGE_ERROR
