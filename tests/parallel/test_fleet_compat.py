"""parallel/fleet_compat.py: each gap is closed only where it exists, and with it Fleet's hybrid
groups and overlapping subgroups form on 4 gloo processes."""

import subprocess
import sys

from parallel import fleet_groups_worker  # tests/parallel/, on pytest.ini's pythonpath
from support import ROOT, launch_workers

from paddle_ernie5.parallel import fleet_compat


def test_patches_are_chosen_by_backend_build_and_pipeline_degree():
    assert fleet_compat.needed("nccl", pp=1, cuda=True) == []
    assert fleet_compat.needed("nccl", pp=4, cuda=True) == []
    assert fleet_compat.needed("gloo", pp=1, cuda=False) == ["gloo_group_stores"]
    assert fleet_compat.needed("gloo", pp=2, cuda=False) == [
        "gloo_group_stores",
        "pipeline_device_id",
        "pipeline_p2p",
    ]


def test_nothing_is_patched_on_a_gpu_build():
    from paddle.distributed import ParallelEnv, collective
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication as p2p

    before = (
        collective._new_process_group_impl,
        p2p._send_on_calc_stream,
        p2p._recv_on_calc_stream,
        getattr(ParallelEnv, "_device_id", None),
    )
    assert fleet_compat.apply("nccl", pp=2, cuda=True) == []
    after = (
        collective._new_process_group_impl,
        p2p._send_on_calc_stream,
        p2p._recv_on_calc_stream,
        getattr(ParallelEnv, "_device_id", None),
    )
    assert after == before


def test_gloo_without_pipeline_patches_only_group_creation():
    code = (
        "from paddle.distributed import collective\n"
        "from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication as p2p\n"
        "from paddle_ernie5.parallel import fleet_compat\n"
        "send, impl = p2p._send_on_calc_stream, collective._new_process_group_impl\n"
        "print(fleet_compat.apply('gloo', pp=1, cuda=False))\n"
        "print(p2p._send_on_calc_stream is send, collective._new_process_group_impl is impl)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["['gloo_group_stores']", "True False"]


def test_hybrid_groups_and_overlapping_subgroups_form_on_four_gloo_processes(tmp_path):
    ranks = launch_workers("fleet_groups_worker.py", 4, tmp_path, tmp_path)
    for r, out in enumerate(ranks):
        assert out["applied"] == ["gloo_group_stores", "pipeline_device_id", "pipeline_p2p"]
        assert r in out["dp"]["ranks"] and r in out["pp"]["ranks"]
        assert out["dp"]["sum"] == sum(out["dp"]["ranks"])
        assert out["pp"]["sum"] == sum(out["pp"]["ranks"])
        for ranks_ in fleet_groups_worker.SUBGROUPS:
            if r in ranks_:
                assert out[str(ranks_)] == sum(ranks_)
    # dp2 x pp2: two pipelines of two stages, and the stages pair up across pipelines
    assert sorted(tuple(o["pp"]["ranks"]) for o in ranks) == [(0, 1), (0, 1), (2, 3), (2, 3)]
    assert sorted(tuple(o["dp"]["ranks"]) for o in ranks) == [(0, 2), (0, 2), (1, 3), (1, 3)]


def test_no_collective_or_group_is_created_outside_parallel():
    """Only paddle_ernie5/parallel/ imports paddle.distributed (model code and the trainers reach
    collectives through the runtime it builds)."""
    import ast
    import pathlib

    pkg = pathlib.Path(ROOT) / "paddle_ernie5"
    offenders = []
    for path in pkg.rglob("*.py"):
        if path.relative_to(pkg).parts[0] == "parallel":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "paddle.distributed" or n.startswith("paddle.distributed.") for n in names):
                offenders.append(str(path.relative_to(pkg)))
    assert offenders == []
