"""Checkpoints: safetensors for tensors, JSON for the rest, written atomically, verified on load.

Layout of one checkpoint (a directory under <run_dir>/checkpoints/):

    step_00000200/
      model.safetensors      model parameters and persistable buffers (router selection bias)
      optimizer.safetensors  optimizer moments keyed by structured parameter name
      meta.json              step, data position, RNG states, config hash, sha256 of both files

It is first written as `step_00000200.tmp`, flushed, then renamed: a crash leaves either the old set
of checkpoints or the new one, never a half-written checkpoint that looks complete. Loading checks
every file's size and sha256, so a truncated or corrupted file is refused with a clear error and
`latest_valid` falls back to the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

import numpy as np
from safetensors.numpy import load_file, save_file

from ..errors import UserError

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_FILES = ("model.safetensors", "optimizer.safetensors")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupt."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    root: str,
    step: int,
    model_state: dict[str, np.ndarray],
    optim_state: dict[str, np.ndarray],
    meta: dict,
    keep_last: int,
) -> str:
    """Write checkpoint `step` atomically under `root`; keep the newest `keep_last`. Returns its
    path."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = {}
    for name, tensors in zip(_FILES, (model_state, optim_state)):
        path = os.path.join(tmp, name)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)
        files[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n))
    return [os.path.join(root, n) for n in names]


def load(path: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(model_state, optimizer_state, meta) of the checkpoint at `path`, verified."""
    meta_path = os.path.join(path, "meta.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        files = meta["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"checkpoint {path} has no readable meta.json ({e}); "
            "delete the directory or point to another checkpoint"
        ) from None
    states = []
    for name in _FILES:
        fpath = os.path.join(path, name)
        want = files.get(name, {})
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        size = os.path.getsize(fpath)
        if size != want.get("bytes") or _sha256(fpath) != want.get("sha256"):
            raise CheckpointError(
                f"checkpoint file {fpath} is corrupt or truncated "
                f"({size} bytes, expected {want.get('bytes')} with a matching sha256)"
            )
        try:
            states.append(load_file(fpath))
        except Exception as e:  # any parse failure means the same thing here
            raise CheckpointError(f"checkpoint file {fpath} cannot be parsed: {e}") from None
    return states[0], states[1], meta


def latest_valid(root: str, warn=print):
    """Newest checkpoint under `root` that loads, as (path, model, optim, meta); None if there is
    none. Corrupt ones are reported through `warn` and skipped (never deleted: they may be
    inspected)."""
    for path in reversed(list_checkpoints(root)):
        try:
            return (path, *load(path))
        except CheckpointError as e:
            warn(f"warning: {e}; falling back to the previous checkpoint")
    return None


def find_run(path: str) -> tuple[str, str]:
    """(config.yaml, weights source) for a run directory, a checkpoint directory or an exported
    model."""
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path} does not exist; pass a run directory, a checkpoint "
            "directory (…/checkpoints/step_N) or an exported model directory"
        )
    for cfg_dir in (path, os.path.dirname(os.path.dirname(path))):
        candidate = os.path.join(cfg_dir, "config.yaml")
        if os.path.isfile(candidate):
            return candidate, path
    raise CheckpointError(
        f"no config.yaml found for {path} (looked in it and in its run directory)"
    )


def load_model_weights(path: str, warn=print) -> dict[str, np.ndarray]:
    """Model parameters from a checkpoint directory, the newest valid checkpoint of a run directory,
    or an exported model directory (model.safetensors without optimizer state)."""
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path} does not exist (expected a run, checkpoint or exported-model directory)"
        )
    if os.path.isfile(os.path.join(path, "meta.json")):
        return load(path)[0]
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = latest_valid(os.path.join(path, "checkpoints"), warn=warn)
        if found is None:
            raise CheckpointError(f"run directory {path} has no complete checkpoint")
        return found[1]
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights):
        try:
            return load_file(weights)
        except Exception as e:  # any parse failure means the same thing here
            raise CheckpointError(f"{weights} cannot be parsed ({e}); re-export it") from None
    raise CheckpointError(
        f"{path} holds no model weights (no meta.json, checkpoints/ or model.safetensors)"
    )


def resumable(root: str, resume: str, model_config: dict, warn=print):
    """The checkpoint a run should continue from: None when train.resume is not "auto" or there is
    none; refuses one written for a different model config (a new run dir is needed then)."""
    if resume != "auto":
        return None
    found = latest_valid(root, warn=warn)
    if found is not None and found[3].get("model_config") != model_config:
        raise CheckpointError(
            f"checkpoint {found[0]} was written with a different model config; set a "
            "new train.run_dir or train.resume=never to start over"
        )
    return found


def init_weights(model, path: str, warn=print, local=lambda state: state) -> None:
    """`train.init_from`: load model weights from `path` into `model` (optimizer and data start
    fresh). `local` maps the full state to this process's share (expert parallelism)."""
    try:
        state = local(load_model_weights(path, warn=warn))
    except CheckpointError as e:
        raise CheckpointError(
            f"train.init_from: {e}; train that model first or fix the path"
        ) from None
    own = model.state_dict()
    bad = (set(own) ^ set(state)) | {
        k for k in own if k in state and tuple(own[k].shape) != state[k].shape
    }
    if bad:
        raise CheckpointError(
            f"train.init_from={path} does not match the model config (differing keys: "
            f"{sorted(bad)[:5]}); its config.yaml lists the model it holds"
        )
    import paddle

    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})
