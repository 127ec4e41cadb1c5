"""Pipeline parallel on CPU (gloo): 2 processes as pp=2 under paddle.distributed.launch, against one
process of the same recipe, seed and global batch.

All checks run in ONE launch (pipeline_worker.py); each test below reads its numbers."""

import pytest
from support import launch_workers

TOL = 1e-5


def _launch(worker: str, nproc: int, out, data_cache) -> list[dict]:
    return launch_workers(worker, nproc, out, data_cache, out)


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_cache):
    return _launch("pipeline_worker.py", 2, tmp_path_factory.mktemp("pipeline"), data_cache)


def test_two_stages_hold_the_model_between_them(results):
    assert [r["stage"] for r in results] == [0, 1]
    for r in results:
        assert r["start_params"] == 0.0  # every rank starts from the one-process initialisation


def test_pp2_five_steps_match_one_process(results):
    for r in results:
        train = r["train"]
        # per step: loss, text, MTP, aux and z losses and the gradient norm
        assert len(train["losses"]) == 5 and max(train["losses"]) < TOL
        assert min(v[3] for v in train["values"]) > 1.0  # the aux and z sums crossed the stages
        assert train["owned_params"] < TOL < train["moved"]
        assert train["loads"]  # every layer's router loads, identical to one process
        assert r["all_params"] < TOL  # parameters and aux-free biases of both stages
        assert r["val_loss"] < TOL


def test_checkpoints_move_between_pp2_and_one_process(results):
    for r in results:
        assert r["pp_ckpt_to_single_logits"] < TOL
        assert r["pp_ckpt_to_single_params"] < TOL
        assert r["single_ckpt_to_pp_logits"] < TOL
        assert r["single_ckpt_to_pp_step"] == 5
        # one more step from the loaded state: optimizer moments came through too
        assert r["after_resume_loss"] < TOL and r["after_resume_params"] < TOL


@pytest.fixture(scope="module")
def results4(tmp_path_factory, data_cache):
    return _launch("pipeline4_worker.py", 4, tmp_path_factory.mktemp("pipeline4"), data_cache)


def test_dp2_x_pp2_and_ep2_x_pp2_match_one_process(results4):
    """Two pipelines of two stages: the stages pair up across pipelines for data (and experts)."""
    assert [r["dp2pp2"]["data_ranks"] for r in results4] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["ep2pp2"]["ep_ranks"] for r in results4] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    for r in results4:
        for layout in ("dp2pp2", "ep2pp2"):
            out = r[layout]
            assert len(out["losses"]) == 5 and max(out["losses"]) < TOL, layout
            assert out["params"] < TOL and out["val_loss"] < TOL, layout
        assert r["ep2pp2"]["ckpt_to_single_logits"] < TOL  # experts joined over ep, then stages
