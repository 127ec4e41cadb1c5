"""Resuming safely through `ernie5 train`: nothing in the run directory is written before the
resume decision, a refused resume exits 2 and leaves every file as it was, changed settings are
refused or listed (train.on_config_change), shape changes always refused, damaged meta.json falls
back, crafted checkpoints and merger files are refused without running anything, and `ernie5 eval`
refuses weights that do not fit the config it reads."""

import base64
import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
from support import RECIPES
from vision_support import VISION, tiny_tokenizer

from paddle_ernie5 import cli
from paddle_ernie5.train.trainer import Trainer, read_metrics

DEBUG = os.path.join(RECIPES, "debug.yaml")


class RunsCommand:
    """What a crafted pickle would do when loaded: create a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def rewrite_meta(ckpt, change):
    """Edit meta.json of a checkpoint and re-sign it in manifest.json (when there is one)."""
    path = os.path.join(ckpt, "meta.json")
    meta = json.load(open(path))
    change(meta)
    data = json.dumps(meta).encode()
    open(path, "wb").write(data)
    manifest = os.path.join(ckpt, "manifest.json")
    if os.path.exists(manifest):
        m = json.load(open(manifest))
        m["files"]["meta.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        json.dump(m, open(manifest, "w"))


def snapshot(run_dir):
    """{relative path: (mtime_ns, content)} of every file in a run directory."""
    out = {}
    for folder, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, run_dir)] = (
                os.stat(path).st_mtime_ns,
                open(path, "rb").read(),
            )
    return out


@pytest.fixture
def ernie5(capsys, monkeypatch, data_cache):
    """`ernie5 <args>` in this process: (exit code, what it printed: stdout then stderr)."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    monkeypatch.setenv("MKL_NUM_THREADS", os.environ.get("MKL_NUM_THREADS", "1"))

    def run(*args):
        capsys.readouterr()
        code = cli.main([str(a) for a in args])
        printed = capsys.readouterr()
        return code, printed.out + printed.err

    return run


@pytest.fixture
def trained(ernie5, data_cache, tmp_path):
    """A finished 2-step debug run: (its train arguments, run dir)."""
    run_dir = tmp_path / "run"
    args = [
        "train",
        DEBUG,
        f"data.cache_dir={data_cache}",
        f"train.run_dir={run_dir}",
        "train.visualdl=false",
        "train.max_steps=2",
        "train.save_every=2",
    ]
    code, err = ernie5(*args)
    assert code == 0, err
    return args, run_dir


def test_a_shape_change_is_refused_and_the_run_directory_is_left_as_it_was(ernie5, trained):
    args, run_dir = trained
    before = snapshot(run_dir)
    for policy in ([], ["train.on_config_change=warn"]):  # shapes are never a matter of policy
        code, err = ernie5(*args, "model.moe.expert_hidden=16", *policy, "--eval")
        assert code == 2
        assert "other shapes than this model" in err and "expert" in err
        assert "model.moe.expert_hidden: 32 -> 16" in err
        assert snapshot(run_dir) == before


def test_changed_settings_are_refused_by_default_and_listed_with_warn(ernie5, trained):
    args, run_dir = trained
    before = snapshot(run_dir)
    code, err = ernie5(*args[:-2], "train.max_steps=4", "train.lr=0.002")
    assert code == 2
    assert "train.lr: 0.003 -> 0.002; train.max_steps: 2 -> 4" in err
    assert "train.on_config_change=warn" in err
    assert snapshot(run_dir) == before
    code, err = ernie5(*args[:-2], "train.max_steps=4", "train.on_config_change=warn")
    assert code == 0, err
    assert "warning: resuming" in err and "train.max_steps: 2 -> 4" in err
    assert [m["step"] for m in read_metrics(str(run_dir)) if "loss" in m] == [1, 2, 3, 4]


def test_bookkeeping_settings_may_change_without_a_word(ernie5, trained, capsys):
    args, run_dir = trained
    code, err = ernie5(
        *args[:-2],
        "train.max_steps=2",
        "train.save_every=1",
        "train.keep_last=5",
        "train.log_every=2",
        "train.threads=1",
        "train.progress=false",
    )
    assert code == 0 and "warning" not in err, err


def test_a_second_run_on_a_locked_run_directory_exits_2_naming_the_other(ernie5, trained):
    args, run_dir = trained
    other = subprocess.Popen(["sleep", "60"])
    try:
        with open(run_dir / "run.lock", "w") as f:
            json.dump({"pid": other.pid, "host": socket.gethostname()}, f)
        before = snapshot(run_dir)
        code, err = ernie5(*args)
        assert code == 2
        assert f"in use by another run (pid {other.pid} on host {socket.gethostname()}" in err
        assert snapshot(run_dir) == before
    finally:
        other.kill()
        other.wait()
    code, err = ernie5(*args)  # its process gone: the stale lock is taken over
    assert code == 0 and f"taking over the stale lock {run_dir / 'run.lock'}" in err
    assert not (run_dir / "run.lock").exists()


def test_a_crafted_pickle_in_meta_json_is_refused_and_never_run(ernie5, trained, tmp_path):
    args, run_dir = trained
    marker = tmp_path / "pwned"
    ckpt = run_dir / "checkpoints" / "step_00000002"
    payload = base64.b64encode(pickle.dumps(RunsCommand(marker))).decode()
    rewrite_meta(ckpt, lambda m: m.update(paddle_rng=payload))
    before = snapshot(run_dir)
    code, err = ernie5(*args, "train.resume=auto")
    assert code == 2
    assert f"no usable checkpoint in {run_dir / 'checkpoints'}: step_00000002 is damaged" in err
    assert "meta.json: paddle_rng is a string, not a list" in err
    assert not marker.exists()
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("name", ["merger.pdparams", "merger.safetensors"])
def test_a_pickle_as_merger_file_is_refused_and_never_run(ernie5, data_cache, tmp_path, name):
    marker = tmp_path / "pwned"
    merger_run = tmp_path / "merger_run"
    merger_run.mkdir()
    (merger_run / name).write_bytes(pickle.dumps(RunsCommand(marker)))
    tok_dir = tiny_tokenizer(str(tmp_path))
    vision = [
        *VISION,
        "model.modalities=[text,image,video]",
        f"model.vision.tokenizer_dir={tok_dir}",
        "model.vision.judge=",
    ]
    code, err = ernie5(
        "train",
        DEBUG,
        *vision,
        f"data.cache_dir={data_cache}",
        f"train.run_dir={tmp_path / 'mm'}",
        "train.visualdl=false",
        "train.max_steps=1",
        "train.warmup_steps=0",
        f"model.vision.merger_init={merger_run}",
    )
    assert code == 2
    assert str(merger_run / name) in err
    assert ("re-run the merger pre-training" in err) and (
        name == "merger.pdparams" or "not a safetensors file" in err
    )
    assert not marker.exists()
    assert os.listdir(tmp_path / "mm") == []  # the refused start wrote nothing


@pytest.mark.parametrize(
    "field, damage, why",
    [
        ("data", lambda m: m["data"].update(epoch="1"), "data.epoch is a string, not an integer"),
        ("data", lambda m: m["data"].pop("index"), "data lacks index"),
        ("data", lambda m: m["data"].update(index=-1), "data.index=-1 is below 0"),
        (
            "paddle_rng",
            lambda m: m["paddle_rng"][0].update(engine="1 2 3"),
            "paddle_rng[0].engine is not an mt19937_64 state",
        ),
        ("paddle_rng", lambda m: m.update(paddle_rng={}), "paddle_rng is an object, not a list"),
        (
            "elastic",
            lambda m: m["elastic"]["state"].update(state=1.5),
            "elastic.state.state is a number, not an integer",
        ),
        ("elastic", lambda m: m.update(elastic=None), "elastic is null, not an object"),
        ("format", lambda m: m.update(format="2"), "format '2'; this version reads 2"),
    ],
)
def test_a_damaged_meta_json_falls_back_to_the_previous_checkpoint(
    debug_config, field, damage, why
):
    cfg = debug_config("train.save_every=2", "train.max_steps=4", "train.keep_last=3")
    Trainer(cfg, log=lambda *_: None).fit()
    root = os.path.join(cfg.train.run_dir, "checkpoints")
    rewrite_meta(os.path.join(root, "step_00000004"), damage)
    logs = []
    trainer = Trainer(cfg, log=logs.append)
    assert trainer.try_resume() and trainer.step == 2
    assert (
        f"warning: checkpoint step_00000004 is damaged (meta.json: {why}); using step_00000002"
        in logs
    )


def test_eval_refuses_weights_that_do_not_fit_the_config_it_reads(ernie5, trained):
    args, run_dir = trained
    text = (run_dir / "config.yaml").read_text()
    assert "expert_hidden: 32" in text
    (run_dir / "config.yaml").write_text(text.replace("expert_hidden: 32", "expert_hidden: 16"))
    code, err = ernie5("eval", "--checkpoint", run_dir, "--max-batches", 1, "--threads", 1)
    assert code == 2 and "does not match the model config" in err and "expert" in err


def test_init_from_a_model_of_other_shapes_names_the_settings_that_differ(ernie5, trained):
    args, run_dir = trained
    code, err = ernie5(
        *[a for a in args if not a.startswith("train.run_dir=")],
        f"train.run_dir={run_dir.parent / 'next'}",
        f"train.init_from={run_dir}",
        "model.moe.expert_hidden=16",
    )
    assert code == 2 and "does not match the model config" in err
    assert "model settings that differ from the ones it was trained with: " in err
    assert "model.moe.expert_hidden: 32 -> 16." in err
    assert not (run_dir.parent / "next" / "checkpoints").exists()


KILL_DURING_SAVE = r"""
import os, signal, sys
from paddle_ernie5 import config as C
from paddle_ernie5.io import checkpoint
from paddle_ernie5.train.trainer import Trainer

recipe, where, *overrides = sys.argv[1:]
real_save_file, real_delete = checkpoint.save_file, checkpoint._delete

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_file(tensors, path):  # the step-4 checkpoint's model file written, nothing else
    real_save_file(tensors, path)
    if where == "writing" and "step_00000004" in path:
        die()

def delete(path, manifest):  # step 4 in place; step 2 half deleted
    os.remove(os.path.join(path, "manifest.json"))
    if where == "pruning":
        die()
    real_delete(path, manifest)

checkpoint.save_file, checkpoint._delete = save_file, delete
Trainer(C.load_config(recipe, overrides), log=lambda *_: None).fit()
"""


@pytest.mark.parametrize("where, resumed_at", [("writing", 2), ("pruning", 4)])
def test_kill_9_during_a_save_then_resume_is_bit_exact(debug_config, tmp_path, where, resumed_at):
    common = ["train.max_steps=6", "train.save_every=2", "train.keep_last=1", "train.eval_every=6"]
    straight = debug_config(*common, f"train.run_dir={tmp_path / 'straight'}")
    Trainer(straight, log=lambda *_: None).fit()
    killed = debug_config(*common, f"train.run_dir={tmp_path / 'killed'}")
    overrides = [
        f"data.cache_dir={killed.data.cache_dir}",
        f"train.run_dir={killed.train.run_dir}",
        "train.visualdl=false",
        *common,
    ]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, DEBUG, where, *overrides],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    logs = []
    Trainer(killed, log=logs.append).fit()  # the kill -9 left a stale lock: taken over
    assert any("resumed from" in l and f"step_{resumed_at:08d}" in l for l in logs), logs
    assert any("taking over the stale lock" in l for l in logs)
    keys = ("loss", "loss/text", "loss/mtp", "train/grad_norm")

    def losses(run_dir):
        return {m["step"]: [m[k] for k in keys] for m in read_metrics(run_dir) if "loss" in m}

    assert losses(straight.train.run_dir) == losses(killed.train.run_dir)
    assert sorted(losses(killed.train.run_dir)) == list(range(1, 7))


def test_a_bad_on_config_change_is_a_one_line_config_error(ernie5, tmp_path):
    code, err = ernie5(
        "train", DEBUG, f"train.run_dir={tmp_path / 'r'}", "train.on_config_change=x"
    )
    assert code == 2
    assert err.strip().splitlines() == [
        "ernie5: config error: train.on_config_change='x' is invalid: allowed refuse or warn"
    ]
    assert not (tmp_path / "r").exists()
