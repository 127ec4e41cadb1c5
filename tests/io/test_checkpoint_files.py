"""io/checkpoint.py on its own: what counts as a checkpoint, pruning that deletes nothing else,
damaged meta.json falling back with one warning, and kill -9 at every point of a save."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from support import ROOT

from paddle_ernie5.io import checkpoint

SETTINGS = {"train.max_steps": 8, "train.lr": 0.01}


def _save(root, step, keep_last=2, **meta):
    model = {"w": np.full((2, 3), step, np.float32)}
    optim = {"w::moment1": np.zeros((2, 3), np.float32)}
    return checkpoint.save(str(root), step, model, optim, {"config": SETTINGS, **meta}, keep_last)


def _tree(path):
    """{relative path: bytes} of every file under `path`, and every directory as None."""
    out = {}
    for folder, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(folder, d), path)] = None
        for f in files:
            p = os.path.join(folder, f)
            out[os.path.relpath(p, path)] = open(p, "rb").read()
    return out


def rewrite_meta(ckpt, change):
    """Edit a checkpoint's meta.json and re-sign it in its manifest (when it has one), as someone
    crafting a checkpoint would: only the content checks can refuse it then."""
    meta_path = os.path.join(ckpt, "meta.json")
    meta = json.load(open(meta_path))
    change(meta)
    data = json.dumps(meta).encode()
    open(meta_path, "wb").write(data)
    manifest_path = os.path.join(ckpt, "manifest.json")
    if os.path.exists(manifest_path):
        manifest = json.load(open(manifest_path))
        manifest["files"]["meta.json"] = {
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        json.dump(manifest, open(manifest_path, "w"))


def test_pruning_deletes_only_verified_checkpoints_and_nothing_else(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    # Strays named like checkpoints, older and newer than the real ones, and a foreign file.
    (root / "step_00000000").write_text("a stray file")
    (root / "step_00000099").write_text("a stray file")
    (root / "step_00000098").mkdir()  # empty
    (root / "step_00000001").mkdir()  # empty, older than every real one
    no_manifest = root / "step_00000097"
    no_manifest.mkdir()
    (no_manifest / "model.safetensors").write_bytes(b"not ours")
    (no_manifest / "meta.json").write_text("{}")
    (root / "notes.txt").write_text("mine")
    # A real checkpoint someone put a file of their own into: it is not deleted either.
    with_foreign = _save(root, 2, keep_last=10)
    open(os.path.join(with_foreign, "notes.txt"), "w").write("keep me")
    strays = {k: v for k, v in _tree(root).items() if not k.startswith("step_00000002")}
    strays["step_00000002/notes.txt"] = b"keep me"

    for step in range(3, 9):
        _save(root, step, keep_last=2)

    tree = _tree(root)
    for name, content in strays.items():
        assert name in tree and tree[name] == content, name
    real = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(root))]
    assert real == ["step_00000002", "step_00000007", "step_00000008"]  # 3..6 pruned
    assert not any(n.startswith(("step_00000003", "step_00000005")) for n in tree)
    assert not [n for n in os.listdir(root) if n.startswith(".")]  # no temporary left


def test_keep_last_counts_only_real_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step_99999999").mkdir()
    for step in (1, 2, 3):
        _save(root, step, keep_last=1)
    names = sorted(os.listdir(root))
    assert names == ["step_00000003", "step_99999999"]


def test_saving_over_a_stray_of_the_same_name_keeps_the_stray(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / "mine.txt").write_text("x")
    path = _save(root, 4)
    assert checkpoint.list_checkpoints(str(root)) == [path]
    displaced = [n for n in os.listdir(root) if n.startswith("step_00000004.displaced-")]
    assert len(displaced) == 1 and os.listdir(root / displaced[0]) == ["mine.txt"]
    _save(root, 4)  # the same step again: the previous copy is ours, so it goes
    assert len(os.listdir(root)) == 2


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda m: m.update(step="2"), "meta.json: step is a string, not an integer"),
        (lambda m: m.update(format=1), "meta.json: format 1; this version reads 2"),
        (lambda m: m.update(config=[1]), "meta.json: config is a list, not an object"),
        (lambda m: m.pop("config"), "meta.json: meta lacks config"),
        (lambda m: m.update(step=3), "meta.json: step 3 is not 2"),
    ],
)
def test_a_damaged_meta_json_falls_back_with_one_warning(tmp_path, damage, why):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep_last=5)
    newest = _save(root, 2, keep_last=5)
    rewrite_meta(newest, damage)
    warnings = []
    path, model, _, meta = checkpoint.latest_valid(str(root), warn=warnings.append)
    assert os.path.basename(path) == "step_00000001" and meta["step"] == 1
    assert warnings == [
        f"warning: checkpoint step_00000002 is damaged ({why}); using step_00000001"
    ]


def test_caller_checks_and_manifest_problems_fall_back_too(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1, keep_last=5, counter=1)
    _save(root, 2, keep_last=5, counter=-4)
    _save(root, 3, keep_last=5, counter=3)
    manifest = root / "step_00000003" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["files"]["../../escape"] = m["files"]["meta.json"]
    manifest.write_text(json.dumps(m))

    def validate(meta):
        checkpoint.check_int(meta["counter"], "counter")

    warnings = []
    path = checkpoint.latest_valid(str(root), warn=warnings.append, validate=validate)[0]
    assert path.endswith("step_00000001")
    assert warnings == [
        "warning: checkpoint step_00000003 is damaged (manifest.json lists '../../escape', "
        "which is not a file name); using step_00000001",
        "warning: checkpoint step_00000002 is damaged (meta.json: counter=-4 is below 0); "
        "using step_00000001",
    ]


def test_when_every_checkpoint_is_damaged_the_run_stops_instead_of_starting_over(tmp_path):
    root = tmp_path / "checkpoints"
    only = _save(root, 2)
    rewrite_meta(only, lambda m: m.update(step=None))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.resumable(str(root), "auto", SETTINGS)
    assert str(e.value).startswith(f"no usable checkpoint in {root}: step_00000002 is damaged")
    assert checkpoint.resumable(str(root), "never", SETTINGS) is None
    assert checkpoint.resumable(str(tmp_path / "none"), "auto", SETTINGS) is None


def test_changed_settings_refuse_or_warn_and_shape_changes_always_refuse(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 2)
    now = {**SETTINGS, "train.max_steps": 12, "train.seed": 7}
    listing = "train.max_steps: 8 -> 12; train.seed: (absent) -> 7"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape("other settings: " + listing)):
        checkpoint.resumable(str(root), "auto", now)
    warnings = []
    found = checkpoint.resumable(str(root), "auto", now, on_change="warn", warn=warnings.append)
    assert found[3]["step"] == 2 and len(warnings) == 1 and listing in warnings[0]
    assert checkpoint.resumable(str(root), "auto", SETTINGS, shapes={"w": (2, 3)})[3]["step"] == 2
    for shapes in ({"w": (2, 4)}, {"w": (2, 3), "b": (3,)}):
        with pytest.raises(checkpoint.CheckpointError, match="other shapes"):
            checkpoint.resumable(str(root), "auto", SETTINGS, on_change="warn", shapes=shapes)


KILL_SCRIPT = r"""
import os, signal, sys
import numpy as np
from paddle_ernie5.io import checkpoint

root, where = sys.argv[1], sys.argv[2]

def save(step):
    model = {"w": np.full((2, 3), step, np.float32)}
    checkpoint.save(root, step, model, {"m": model["w"] * 2}, {"config": {}}, keep_last=2)

for step in (1, 2):
    save(step)

def die(*_, **__):
    os.kill(os.getpid(), signal.SIGKILL)

real = {"save_file": checkpoint.save_file, "delete": checkpoint._delete}
calls = []
if where == "tensors":  # after the model file, before the optimizer file
    def save_file(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            die()
        real["save_file"](*a, **k)
    checkpoint.save_file = save_file
elif where == "rename":  # everything written, not yet renamed
    checkpoint._install = die
elif where == "prune":  # renamed, before pruning
    checkpoint.prune = die
elif where == "pruning":  # the old checkpoint's manifest removed, its files not yet
    def delete(path, manifest):
        os.remove(os.path.join(path, "manifest.json"))
        die()
    checkpoint._delete = delete
save(3)
"""


@pytest.mark.parametrize("where", ["tensors", "rename", "prune", "pruning"])
def test_kill_9_during_a_save_leaves_complete_checkpoints_only(tmp_path, where):
    root = tmp_path / "checkpoints"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(root), where], cwd=ROOT, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    listed = [os.path.basename(p) for p in checkpoint.list_checkpoints(str(root))]
    new = where in ("prune", "pruning")
    assert listed == (
        ["step_00000002", "step_00000003"]
        if where == "pruning"
        else ["step_00000001", "step_00000002", "step_00000003"]
        if new
        else ["step_00000001", "step_00000002"]
    )
    warnings = []
    path, model, optim, meta = checkpoint.latest_valid(str(root), warn=warnings.append)
    assert meta["step"] == (3 if new else 2) and (model["w"] == meta["step"]).all()
    # A later save goes through; what the kill left behind is never taken for a checkpoint.
    checkpoint.save(str(root), 4, model, optim, {"config": {}}, keep_last=2)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(root))][-1] == (
        "step_00000004"
    )
