"""One run per run directory: io/checkpoint.RunLock, and every trainer holding it (the backbone
trainer, the component loop, the RL trainer)."""

import json
import os
import socket
import subprocess

import pytest

from paddle_ernie5 import config as C
from paddle_ernie5.io.checkpoint import RunDirBusy, RunLock


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def write_lock(run_dir, pid, host=None):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "run.lock"), "w") as f:
        json.dump({"pid": pid, "host": host or socket.gethostname()}, f)


def test_a_live_run_stops_a_second_one_naming_its_pid_and_host(tmp_path, live_pid):
    write_lock(tmp_path, live_pid)
    with pytest.raises(RunDirBusy) as e:
        RunLock(str(tmp_path)).acquire()
    assert f"pid {live_pid} on host {socket.gethostname()}" in str(e.value)
    assert json.load(open(tmp_path / "run.lock"))["pid"] == live_pid  # left alone


def test_a_lock_held_in_this_process_is_busy_too(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(RunDirBusy, match=f"pid {os.getpid()} on host"):
            RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / "run.lock").exists()  # released and removed
    with RunLock(str(tmp_path)):  # free again
        pass


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    notes = []
    with RunLock(str(tmp_path), warn=notes.append):
        assert json.load(open(tmp_path / "run.lock"))["pid"] == os.getpid()
    assert len(notes) == 1 and f"stale lock {tmp_path / 'run.lock'} of pid {pid}" in notes[0]
    assert not (tmp_path / "run.lock").exists()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    write_lock(tmp_path, dead_pid(), host="elsewhere.example")
    with pytest.raises(RunDirBusy, match="on host elsewhere.example.*delete"):
        RunLock(str(tmp_path)).acquire()


def test_the_component_loop_holds_the_lock(tmp_path, live_pid):
    from paddle_ernie5.train.loop import Component, Loop

    tr = C.LoopConfig(run_dir=str(tmp_path), max_steps=1, visualdl=False, progress=False)
    write_lock(tmp_path, live_pid)
    with pytest.raises(RunDirBusy, match=f"pid {live_pid}"):
        Loop(tr, C.ComponentConfig(train=tr)).fit(Component())
    assert os.listdir(tmp_path) == ["run.lock"]


def test_the_rl_trainer_holds_the_lock(debug_config, tmp_path, live_pid):
    from paddle_ernie5.rl.trainer import RLTrainer

    cfg = debug_config(
        "component=rl",
        "rl.train_problems=40",
        "rl.eval_problems=2",
        "rl.prompts_per_step=2",
        "rl.group_size=2",
        "rl.max_new_tokens=3",
        "train.max_steps=1",
        "train.warmup_steps=0",
    )
    write_lock(cfg.train.run_dir, live_pid)
    trainer = RLTrainer(cfg, log=lambda *_: None)
    with pytest.raises(RunDirBusy, match=f"pid {live_pid}"):
        trainer.fit()
    trainer.buffer.close()
    assert os.listdir(cfg.train.run_dir) == ["run.lock"]
