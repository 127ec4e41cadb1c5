"""train/loop.py: the one loop of the component trainers. A stopped, killed or interrupted run
resumes bit-exactly (model, optimizer, numpy and Paddle RNG, the component's own state), for a toy
component and for the vision judge."""

import json
import os
import signal

import numpy as np
import paddle
import pytest
from paddle import nn

from paddle_ernie5 import config as C
from paddle_ernie5.io import checkpoint
from paddle_ernie5.optim.optimizer import apply_update, build_optimizer
from paddle_ernie5.train.loop import Component, Loop

STEPS = 8


class Killed(Exception):
    """What a step raises to stand for the process dying there (no checkpoint is written)."""


class Toy(Component):
    """Regression with dropout: every step draws its batch from the loop's numpy generator and its
    dropout mask from Paddle's, and counts the examples it has seen (component state)."""

    name = "toy"

    def __init__(self, tr, rng, eval_every=0, on_step=None):
        self.tr, self.rng, self.eval_every, self.on_step = tr, rng, eval_every, on_step
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))
        self.optimizer = build_optimizer(self.model, tr)
        self.config = {"hidden": 16}
        self.seen = 0

    def step(self, step):
        x = self.rng.normal(size=(8, 4)).astype(np.float32)
        loss = (
            (self.model(paddle.to_tensor(x)) - paddle.to_tensor(x.sum(1, keepdims=True))) ** 2
        ).mean()
        if self.on_step is not None:
            self.on_step(step)  # a kill or Ctrl-C in the middle of the step, before the update
        loss.backward()
        apply_update(self.model, self.optimizer, step, self.tr)
        self.seen += len(x)
        return {"train/loss": float(loss)}

    def evaluate(self):
        paddle.rand([3])  # evaluation may draw random numbers; training must not notice
        self.rng.random(3)
        x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
        return {
            "mse": float(((self.model(paddle.to_tensor(x)).numpy()[:, 0] - x.sum(1)) ** 2).mean()),
            "seen": self.seen,
        }

    def finish(self, run_dir):
        return {"finished": 1}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


def _train(run_dir, **kw):
    base = dict(
        run_dir=str(run_dir),
        max_steps=STEPS,
        batch_size=8,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=2,
        log_every=1,
        save_every=100,
        visualdl=False,
        progress=False,
    )
    return C.LoopConfig(**{**base, **kw})


def _run(tr, stop_at=None, **toy):
    loop = Loop(tr, C.ComponentConfig(train=tr))
    c = Toy(tr, loop.rng, **toy)
    return c, loop.fit(c, stop_at=stop_at)


def _weights(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every resumed one must reproduce."""
    run = tmp_path_factory.mktemp("straight")
    c, metrics = _run(_train(run))
    metrics.pop("train_seconds")
    return _weights(c.model), metrics, _losses(run)


def _check_resumed(run, straight, **toy):
    c, metrics = _run(_train(run), **toy)
    metrics.pop("train_seconds")
    weights, want_metrics, want_losses = straight
    _same(_weights(c.model), weights)
    assert metrics == want_metrics
    assert _losses(run) == want_losses


def test_a_stopped_run_resumes_bit_exactly(straight, tmp_path):
    c, out = _run(_train(tmp_path), stop_at=3)
    assert out is None and c.seen == 24
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000003"]
    _check_resumed(tmp_path, straight)
    assert json.load(open(tmp_path / "metrics.json"))["seen"] == STEPS * 8


def test_a_killed_run_resumes_from_its_last_periodic_checkpoint(straight, tmp_path):
    def kill(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        _run(_train(tmp_path, save_every=2, keep_last=2), on_step=kill)
    names = [os.path.basename(p) for p in checkpoint.list_checkpoints(tmp_path / "checkpoints")]
    assert names == ["step_00000002", "step_00000004"]  # keep_last
    _check_resumed(tmp_path, straight)


@pytest.mark.parametrize("how", ["KeyboardInterrupt inside the step", "SIGINT"])
def test_ctrl_c_checkpoints_exits_130_and_the_run_resumes(straight, tmp_path, capsys, how):
    def interrupt(step):
        if step == 4:
            if how == "SIGINT":  # the step finishes; the loop stops after it
                os.kill(os.getpid(), signal.SIGINT)
            else:  # escapes the step: the checkpoint holds the last completed step
                raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        _run(_train(tmp_path), on_step=interrupt)
    assert e.value.code == 130
    done = 5 if how == "SIGINT" else 4
    path, model, optim, meta = checkpoint.latest_valid(str(tmp_path / "checkpoints"))
    assert meta["step"] == done and meta["loop"]["component"] == {"seen": done * 8}
    assert model and optim
    err = capsys.readouterr().err
    assert f"interrupted after step {done} of {STEPS}" in err and "Resume" in err
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's own handler is gone
    _check_resumed(tmp_path, straight)


def test_evaluation_between_steps_does_not_change_training(straight, tmp_path):
    c, metrics = _run(_train(tmp_path), eval_every=3)
    metrics.pop("train_seconds")
    _same(_weights(c.model), straight[0])
    assert metrics == straight[1]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "eval/mse" in r] == [3, 6, STEPS]


def test_in_memory_runs_write_nothing_and_match(straight, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tr = _train(tmp_path / "unused")
    loop = Loop(tr)
    c = Toy(tr, loop.rng)
    metrics = loop.fit(c)
    assert os.listdir(tmp_path) == []
    _same(_weights(c.model), straight[0])
    assert "finished" not in metrics  # finish() writes artefacts: only runs with a directory


def test_a_checkpoint_of_another_component_config_is_refused(tmp_path):
    tr = _train(tmp_path)
    _run(tr, stop_at=2)
    loop = Loop(tr, C.ComponentConfig(train=tr))
    other = Toy(tr, loop.rng)
    other.config = {"hidden": 32}
    with pytest.raises(
        checkpoint.CheckpointError, match="other settings: component.hidden: 16 -> 32"
    ):
        loop.fit(other)


def test_the_vision_judge_resumes_bit_exactly_after_a_kill(tmp_path, data_cache, monkeypatch):
    """A real component through its recipe: killed at step 3 with a checkpoint at step 2, then
    started again with the same command, it ends with the weights of an uninterrupted run."""
    from safetensors.numpy import load_file
    from support import RECIPES

    from paddle_ernie5.train import vision_judge as VJ

    def run(name):
        cfg = C.load_config(
            os.path.join(RECIPES, "vision_judge.yaml"),
            [
                f"data.cache_dir={data_cache}",
                f"train.run_dir={tmp_path / name}",
                "train.visualdl=false",
                "train.progress=false",
                "train.max_steps=4",
                "train.warmup_steps=1",
                "train.batch_size=8",
                "train.save_every=2",
                "vision_judge.width=4",
                "vision_judge.video_batch_size=2",
            ],
        )
        return VJ.train_from_config(cfg)

    want = run("straight")
    step = VJ.JudgeRun.step

    def dies_at_3(self, i):
        if i == 3:
            raise Killed
        return step(self, i)

    monkeypatch.setattr(VJ.JudgeRun, "step", dies_at_3)
    with pytest.raises(Killed):
        run("killed")
    monkeypatch.setattr(VJ.JudgeRun, "step", step)
    got = run("killed")
    for m in (want, got):
        m.pop("train_seconds")
    assert got == want
    _same(
        load_file(str(tmp_path / "killed" / "judge" / "model.safetensors")),
        load_file(str(tmp_path / "straight" / "judge" / "model.safetensors")),
    )
