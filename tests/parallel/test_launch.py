"""Two processes on CPU (gloo) under paddle.distributed.launch: parity with one process.

All checks run in ONE launch (launch_worker.py; starting processes is the slow part); each test
below reads its numbers. The worker trains the single-process reference in the same process, so
both sides see the same seed and the same global batches."""

import pytest
from support import launch_workers

TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("launch")
    return launch_workers("launch_worker.py", 2, out, data_cache, out)


@pytest.fixture(scope="module")
def sharding(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("launch_sharding")
    return launch_workers(
        "launch_worker.py", 2, out, data_cache, out, "sharding", result="sharding_rank{r}.json"
    )


def test_ep2_starts_from_the_same_weights_and_matches_forward_backward(results):
    for r in results:
        assert r["ep_start_params"] == 0.0  # this rank's experts are exactly rows of the full model
        for key in ("ep_forward_backward", "ep_alltoall_forward_backward"):
            fb = r[key]
            assert fb["logits"] < TOL and fb["loss"] < TOL
            assert fb["grads"] < 1e-6  # gradients themselves (Adam would hide a scale error)


def test_ep2_five_training_steps_match_one_process(results):
    for r in results:
        train = r["ep_train"]
        # train["losses"]: the loss and grad-norm difference per step
        assert len(train["losses"]) == 5 and max(train["losses"]) < TOL
        assert train["params"] < TOL < train["moved"]
        assert r["ep_bias"] == 0.0  # loads reduced over ranks: identical aux-free bias updates


def test_dp2_parameters_after_five_steps_match_the_concatenated_batch(results):
    for r in results:
        assert r["dp_forward_backward"]["grads"] < 1e-6
        train = r["dp_train"]
        assert max(train["losses"]) < TOL
        assert train["params"] < TOL < train["moved"]


def test_sharding2_runs_paddles_sharding_optimizer_and_matches_one_process(sharding):
    for r in sharding:
        assert r["sharding_optimizer"] == "DygraphShardingOptimizer"
        assert r["sharding_forward_backward"]["grads"] < 1e-6
        train = r["sharding_train"]
        assert max(train["losses"]) < TOL
        assert train["params"] < TOL < train["moved"]
    owned = [set(r["sharding_owned"]) for r in sharding]
    assert owned[0] and owned[1] and not owned[0] & owned[1]  # every parameter has one owner


def test_sharding2_checkpoints_hold_every_moment_and_move_both_ways(sharding):
    n_params = len(sharding[0]["sharding_owned"]) + len(sharding[1]["sharding_owned"])
    for r in sharding:
        assert r["sharding_ckpt_to_single_logits"] < TOL
        assert r["sharding_ckpt_back_logits"] < TOL
        assert r["sharding_ckpt_moments"] == n_params


def test_checkpoints_move_between_ep2_and_one_process(results):
    for r in results:
        assert r["ep_ckpt_to_single_logits"] < TOL
        assert r["single_ckpt_to_ep_logits"] < TOL
        assert r["single_ckpt_to_ep_step"] == 5


def test_every_rank_issues_the_same_collectives_over_a_whole_run(results):
    """Training, evaluation (with generated samples), checkpoints and the last step: the two ranks'
    collective sequences are identical, call by call (a mismatch kills gloo at the end of a run)."""
    runs = [r["ep_whole_run_collectives"] for r in results]
    assert [r["step"] for r in runs] == [4, 4]
    assert len(runs[0]["calls"]) > 100
    assert {c[0] for c in runs[0]["calls"]} >= {"all_gather", "all_reduce"}
    assert runs[0]["calls"] == runs[1]["calls"]


def test_data_parallel_runs_through_fleets_wrapper(results):
    for r in results:
        assert r["dp_fleet_wrapper"] == "DataParallel"  # fleet.distributed_model
