"""Checkpoints and run directories: safetensors for tensors, JSON for the rest, written atomically,
verified on load, pruned without touching anything else, one run per directory.

Layout of one checkpoint (a directory under <run_dir>/checkpoints/):

    step_00000200/
      model.safetensors      model parameters and persistable buffers (router selection bias)
      optimizer.safetensors  optimizer moments keyed by structured parameter name
      meta.json              format, step, the run's settings, data position, RNG states (JSON)
      manifest.json          format, step, and the size and sha256 of each of the files above

Nothing is pickled: tensors are safetensors, everything else plain JSON.

Writing: the files go to a hidden temporary directory, are flushed, the manifest is written last,
then the directory is renamed to `step_N`. A crash (kill -9 included) at any moment leaves either
the old set of checkpoints or the new one, never a half-written checkpoint that looks complete.

What counts as a checkpoint: an entry named exactly `step_` + 8 digits that is a real directory
(not a link) holding a manifest of this format whose every file is present with its size and
sha256. Anything else (a stray file, an empty or foreign `step_*` directory, a copy without a
manifest) is never a checkpoint, and pruning (`keep_last`) never deletes it: pruning deletes only
verified checkpoints that hold nothing but their manifest's files, manifest first.

Reading: the manifest is verified, then meta.json is checked (format, step, types and ranges; each
trainer adds checks of its own fields) before anything is applied. A damaged checkpoint is reported
as "checkpoint step_N is damaged (why); using step_M" and the previous one is used; when every
`step_*` entry is damaged the run stops (exit 2) instead of silently starting over.

Resuming (`resumable`): a checkpoint whose parameter shapes differ from the model's is always
refused; other changed settings (schedule, max_steps, batch, seed, ...: everything meta.json's
"config" records) are listed and, per train.on_config_change, either refused or resumed with a
warning.

`RunLock`: <run_dir>/run.lock holds the pid and host of the run writing there, and an flock while
it runs; a second run on the same directory stops with exit 2 naming them; a lock left by a process
that is gone (kill -9) is taken over with a message.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from ..errors import UserError

FORMAT = 2  # of manifest.json and meta.json; 1 (meta.json holding the sizes) is no longer read
MANIFEST = "manifest.json"
META = "meta.json"
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_JSON_BYTES = 256 << 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the run."""


class Damaged(CheckpointError):
    """Why one checkpoint cannot be used; the message is the reason alone (the caller names the
    checkpoint)."""


class RunDirBusy(UserError, RuntimeError):
    """Another run is writing to the same run directory."""


# ------------------------------------------------------------------------------- JSON checks


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def expect(ok: bool, why: str) -> None:
    if not ok:
        raise Damaged(why)


def check_int(value: Any, at: str, lo: int | None = 0, hi: int | None = None) -> int:
    """An integer (not a boolean) in [lo, hi]."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    expect(ok, f"{at} is {_kind(value)}, not an integer")
    expect(lo is None or value >= lo, f"{at}={value} is below {lo}")
    expect(hi is None or value <= hi, f"{at}={value} is above {hi}")
    return value


def check_number(value: Any, at: str, lo: float | None = None) -> float:
    """A finite number (not a boolean), at least `lo`."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    expect(ok, f"{at} is {_kind(value)}, not a finite number")
    expect(lo is None or value >= lo, f"{at}={value} is below {lo}")
    return float(value)


def check_str(value: Any, at: str) -> str:
    expect(isinstance(value, str), f"{at} is {_kind(value)}, not a string")
    return value


def check_list(value: Any, at: str) -> list:
    expect(isinstance(value, list), f"{at} is {_kind(value)}, not a list")
    return value


def check_dict(value: Any, at: str, keys=()) -> dict:
    """An object with at least `keys`."""
    expect(isinstance(value, dict), f"{at} is {_kind(value)}, not an object")
    missing = [k for k in keys if k not in value]
    expect(not missing, f"{at} lacks {', '.join(missing)}")
    return value


def check_like(value: Any, template: Any, at: str) -> Any:
    """`value` has the JSON shape of `template` (a freshly made state of the same object): the same
    keys, the same types, integers non-negative where the template's are."""
    if isinstance(template, dict):
        check_dict(value, at, template)
        extra = sorted(set(value) - set(template))
        expect(not extra, f"{at} has unexpected keys {extra}")
        for k, v in template.items():
            check_like(value[k], v, f"{at}.{k}")
    elif isinstance(template, bool):
        expect(isinstance(value, bool), f"{at} is {_kind(value)}, not a boolean")
    elif isinstance(template, int):
        check_int(value, at, lo=0 if template >= 0 else None)
    elif isinstance(template, float):
        check_number(value, at)
    elif isinstance(template, str):
        check_str(value, at)
    elif isinstance(template, list):
        check_list(value, at)
        for i, v in enumerate(value):
            if template:
                check_like(v, template[0], f"{at}[{i}]")
    return value


def read_json(path: str, what: str | None = None) -> Any:
    """Parse a JSON file; any problem is `Damaged` naming it."""
    what = what or os.path.basename(path)
    try:
        st = os.lstat(path)
    except OSError:
        raise Damaged(f"{what} is missing") from None
    expect(stat.S_ISREG(st.st_mode), f"{what} is not a regular file")
    expect(st.st_size <= _MAX_JSON_BYTES, f"{what} is {st.st_size} bytes, too large")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise Damaged(f"{what} is not readable JSON ({e})") from None


# ------------------------------------------------------------------------------- files


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


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_synced(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _entry(path: str) -> dict:
    return {"bytes": os.path.getsize(path), "sha256": _sha256(path)}


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _plain_name(name: Any) -> bool:
    """A file name inside the checkpoint directory itself (no path, no parent, not the
    manifest)."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", MANIFEST)
        and os.path.basename(name) == name
        and not any(c in name for c in "/\\\0")
    )


def _step_of(path: str) -> int | None:
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def verify(path: str, hashes: bool = True) -> dict:
    """The manifest of the checkpoint directory `path`, after checking that every file it lists is
    there with its size (and, with `hashes`, its sha256). Raises `Damaged` with the reason."""
    expect(_is_real_dir(path), "not a directory")
    if not os.path.lexists(os.path.join(path, MANIFEST)):
        if os.path.lexists(os.path.join(path, META)):
            raise Damaged(
                f"no {MANIFEST}: written in an older checkpoint format that is no longer read; "
                "start a new train.run_dir"
            )
        raise Damaged(f"no {MANIFEST}")
    manifest = check_dict(read_json(os.path.join(path, MANIFEST)), MANIFEST, ("format", "step"))
    expect(
        manifest["format"] == FORMAT,
        f"{MANIFEST} has format {manifest['format']!r}; this version reads format {FORMAT}",
    )
    step = check_int(manifest["step"], f"{MANIFEST} step")
    named = _step_of(path)
    expect(named is None or named == step, f"{MANIFEST} says step {step}")
    files = check_dict(manifest.get("files"), f"{MANIFEST} files", (*TENSOR_FILES, META))
    for name, want in files.items():
        expect(_plain_name(name), f"{MANIFEST} lists {name!r}, which is not a file name")
        check_dict(want, f"{MANIFEST} files.{name}", ("bytes", "sha256"))
        check_int(want["bytes"], f"{MANIFEST} files.{name}.bytes")
        expect(
            isinstance(want["sha256"], str) and bool(_SHA256.match(want["sha256"])),
            f"{MANIFEST} files.{name}.sha256 is not a sha256",
        )
        fpath = os.path.join(path, name)
        expect(_is_regular_file(fpath), f"{name} is missing")
        size = os.path.getsize(fpath)
        expect(
            size == want["bytes"] and (not hashes or _sha256(fpath) == want["sha256"]),
            f"{name} is corrupt or truncated ({size} bytes, expected {want['bytes']} with a "
            "matching sha256)",
        )
    return manifest


def check_meta(meta: Any, step: int) -> dict:
    """What every meta.json holds: this format, the manifest's step, the run's settings."""
    check_dict(meta, "meta", ("format", "step", "config"))
    expect(meta["format"] == FORMAT, f"format {meta['format']!r}; this version reads {FORMAT}")
    expect(check_int(meta["step"], "step") == step, f"step {meta['step']} is not {step}")
    check_dict(meta["config"], "config")
    return meta


def _load(path: str, validate: Callable[[dict], None] | None) -> tuple[dict, dict, dict]:
    manifest = verify(path)
    meta = read_json(os.path.join(path, META))
    try:
        check_meta(meta, manifest["step"])
        if validate is not None:
            validate(meta)
    except Damaged as e:
        raise Damaged(f"{META}: {e}") from None
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError, IndexError) as e:
        raise Damaged(f"{META}: {type(e).__name__}: {e}") from None
    states = []
    for name in TENSOR_FILES:
        try:
            states.append(load_file(os.path.join(path, name)))
        except Exception as e:  # any parse failure means the same thing here
            raise Damaged(f"{name} cannot be parsed: {e}") from None
    return states[0], states[1], meta


def load(
    path: str, validate: Callable[[dict], None] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(model_state, optimizer_state, meta) of the checkpoint at `path`, verified; `validate`
    checks the caller's own fields of meta (raising `Damaged`)."""
    try:
        return _load(path, validate)
    except Damaged as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({e})") from None


def candidates(root: str) -> list[str]:
    """Every entry of `root` named like a checkpoint, by step; not all of them are checkpoints."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n))
    return [os.path.join(root, n) for n in names]


def list_checkpoints(root: str) -> list[str]:
    """The checkpoints under `root` (named step_N, complete and verified), oldest first."""
    out = []
    for path in candidates(root):
        try:
            verify(path)
        except Damaged:
            continue
        out.append(path)
    return out


def save(
    root: str,
    step: int,
    model_state: dict[str, np.ndarray],
    optim_state: dict[str, np.ndarray],
    meta: dict,
    keep_last: int,
) -> str:
    """Write checkpoint `step` atomically under `root`; keep it and the newest `keep_last`
    checkpoints. Returns its path. `meta` must hold "config" (the run's settings)."""
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root)
    try:
        os.chmod(tmp, 0o755)
        files = {}
        for fname, tensors in zip(TENSOR_FILES, (model_state, optim_state)):
            fpath = os.path.join(tmp, fname)
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, fpath)
            _fsync_file(fpath)
            files[fname] = _entry(fpath)
        _write_json_synced(os.path.join(tmp, META), {**meta, "format": FORMAT, "step": step})
        files[META] = _entry(os.path.join(tmp, META))
        _write_json_synced(
            os.path.join(tmp, MANIFEST), {"format": FORMAT, "step": step, "files": files}
        )
        _fsync_dir(tmp)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    prune(root, keep_last, keep=final)
    return final


def _install(tmp: str, final: str) -> None:
    """Rename `tmp` to `final`. What is already at `final` is deleted when it is a checkpoint of
    ours (the same step written again), else renamed to `<name>.displaced-<time>` and kept."""
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return
    manifest = _prunable(final)
    aside = f"{final}.displaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"
    os.rename(final, aside)
    os.rename(tmp, final)
    if manifest is not None:
        _delete(aside, manifest)


def _prunable(path: str, manifest: dict | None = None) -> dict | None:
    """The manifest of `path` when it is a verified checkpoint (`manifest`: already verified)
    holding nothing but its manifest's files (so deleting it deletes nothing else); None
    otherwise."""
    if manifest is None:
        try:
            manifest = verify(path)
        except Damaged:
            return None
    if set(os.listdir(path)) != {*manifest["files"], MANIFEST}:
        return None
    return manifest


def _delete(path: str, manifest: dict) -> None:
    """Delete a checkpoint: its manifest first (from then on it is no checkpoint), then its files,
    then the directory if it is empty."""
    os.remove(os.path.join(path, MANIFEST))
    for name in manifest["files"]:
        try:
            os.remove(os.path.join(path, name))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def prune(root: str, keep_last: int, keep: str | None = None) -> list[str]:
    """Delete the checkpoints under `root` older than the newest `keep_last` (never `keep`, never
    anything that is not a verified checkpoint holding only its own files). Returns those
    deleted. Every candidate is hashed once; `keep` (just written and hashed by `save`) only has
    its manifest and sizes checked."""
    ckpts = []  # (path, verified manifest), oldest first
    for path in candidates(root):
        try:
            ckpts.append((path, verify(path, hashes=path != keep)))
        except Damaged:
            continue
    kept = {p for p, _ in (ckpts[-keep_last:] if keep_last > 0 else [])} | {keep}
    deleted = []
    for path, manifest in ckpts:
        if path in kept:
            continue
        if _prunable(path, manifest) is not None:
            _delete(path, manifest)
            deleted.append(path)
    return deleted


def latest_valid(root: str, warn=print, validate: Callable[[dict], None] | None = None):
    """Newest usable checkpoint under `root`, as (path, model, optim, meta); None if `root` holds
    no `step_*` entry at all. Damaged ones are reported through `warn` and skipped (never deleted:
    they may be inspected); when every one is damaged, a `CheckpointError` lists why."""
    damaged = []
    for path in reversed(candidates(root)):
        try:
            found = (path, *_load(path, validate))
        except Damaged as e:
            damaged.append((os.path.basename(path), str(e)))
            continue
        for name, why in damaged:
            warn(f"warning: checkpoint {name} is damaged ({why}); using {os.path.basename(path)}")
        return found
    if damaged:
        raise CheckpointError(
            f"no usable checkpoint in {root}: "
            + "; ".join(f"{name} is damaged ({why})" for name, why in damaged)
            + ". Move them out of the way, or set a new train.run_dir"
        )
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
    return _model_weights_and_settings(path, warn)[0]


def _model_weights_and_settings(path: str, warn=print) -> tuple[dict[str, np.ndarray], dict]:
    """`load_model_weights` and the flat settings the checkpoint recorded (meta.json "config";
    {} for an exported model)."""
    if not os.path.exists(path):
        raise CheckpointError(
            f"{path} does not exist (expected a run, checkpoint or exported-model directory)"
        )
    if os.path.lexists(os.path.join(path, MANIFEST)) or os.path.lexists(os.path.join(path, META)):
        state, _, meta = load(path)
        return state, meta.get("config") or {}
    if os.path.isdir(os.path.join(path, "checkpoints")):
        found = latest_valid(os.path.join(path, "checkpoints"), warn=warn)
        if found is None:
            raise CheckpointError(f"run directory {path} has no complete checkpoint")
        return found[1], found[3].get("config") or {}
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights):
        try:
            return load_file(weights), {}
        except Exception as e:  # any parse failure means the same thing here
            raise CheckpointError(f"{weights} cannot be parsed ({e}); re-export it") from None
    raise CheckpointError(
        f"{path} holds no model weights (no {MANIFEST}, checkpoints/ or model.safetensors)"
    )


# ------------------------------------------------------------------------------- resuming


def shape_mismatch(shapes: dict[str, tuple], state: dict[str, np.ndarray], limit: int = 4) -> str:
    """'' when `state` has exactly the keys and shapes of `shapes`; else the first differences."""
    out = [f"{k}: not in the checkpoint" for k in sorted(set(shapes) - set(state))]
    out += [f"{k}: not in the model" for k in sorted(set(state) - set(shapes))]
    out += [
        f"{k}: {tuple(state[k].shape)} in the checkpoint, {tuple(shapes[k])} in the model"
        for k in sorted(set(shapes) & set(state))
        if tuple(state[k].shape) != tuple(shapes[k])
    ]
    more = f" and {len(out) - limit} more" if len(out) > limit else ""
    return "; ".join(out[:limit]) + more


def config_changes(saved: dict, now: dict) -> list[str]:
    """'key: old -> new' for every setting that differs between two flat settings dicts."""

    def show(d, k):
        return json.dumps(d[k]) if k in d else "(absent)"

    return [
        f"{k}: {show(saved, k)} -> {show(now, k)}"
        for k in sorted(set(saved) | set(now))
        if k not in saved or k not in now or saved[k] != now[k]
    ]


def resumable(
    root: str,
    resume: str,
    config: dict,
    *,
    on_change: str = "refuse",
    shapes: dict[str, tuple] | None = None,
    local: Callable[[dict], dict] | None = None,
    validate: Callable[[dict], None] | None = None,
    warn=print,
):
    """The checkpoint a run should continue from, as `latest_valid` gives it: None when
    train.resume is not "auto" or there is none.

    `config`: the run's flat settings (recorded in meta.json "config" at every save). `shapes`: the
    model's parameter shapes; a checkpoint with other shapes (after `local`, this process's share)
    is always refused. Other changed settings are listed and refused (`on_change` "refuse") or
    resumed with a warning ("warn")."""
    if resume != "auto":
        return None
    found = latest_valid(root, warn=warn, validate=validate)
    if found is None:
        return None
    path, model_state, _, meta = found
    changes = config_changes(meta["config"], config)
    listing = "; ".join(changes) or "no recorded setting changed"
    if shapes is not None:
        bad = shape_mismatch(shapes, (local or (lambda s: s))(model_state))
        if bad:
            raise CheckpointError(
                f"checkpoint {path} holds parameters of other shapes than this model ({bad}); "
                f"changed settings: {listing}. A shape change cannot be resumed: restore the "
                "settings, or set a new train.run_dir (or train.resume=never to start over)"
            )
    if changes and on_change == "warn":
        warn(
            f"warning: resuming {path} with changed settings (train.on_config_change=warn): "
            f"{listing}"
        )
    elif changes:
        raise CheckpointError(
            f"checkpoint {path} was written with other settings: {listing}. Restore them, set "
            "train.on_config_change=warn to continue with the new ones, or set a new "
            "train.run_dir (train.on_config_change=refuse)"
        )
    return found


def check_fits(model, state: dict[str, np.ndarray], what: str, hint: str = "", local=None) -> dict:
    """`state` (after `local`) when it has exactly the keys and shapes of `model`'s state; else a
    `CheckpointError` naming `what`."""
    state = local(state) if local is not None else state
    bad = shape_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, state)
    if bad:
        raise CheckpointError(f"{what} does not match the model config ({bad}){hint}")
    return state


def set_weights(model, state: dict[str, np.ndarray], what: str, hint: str = "", local=None):
    """Load `state` into `model` after `check_fits` (Paddle itself would skip, with a warning,
    what does not fit and leave it random)."""
    import paddle

    state = check_fits(model, state, what, hint, local)
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in state.items()})


def init_weights(
    model, path: str, warn=print, local=lambda state: state, settings: dict | None = None
) -> None:
    """`train.init_from`: load model weights from `path` into `model` (optimizer and data start
    fresh). `local` maps the full state to this process's share (expert parallelism). `settings`
    (this run's flat settings): when the shapes differ, the model.* settings that differ from
    the ones the checkpoint recorded are named in the error."""
    try:
        state, saved = _model_weights_and_settings(path, warn=warn)
    except CheckpointError as e:
        raise CheckpointError(
            f"train.init_from: {e}; train that model first or fix the path"
        ) from None
    hint = "; its config.yaml lists the model it holds"
    changes = []
    if saved and settings:
        changes = config_changes(_model_part(saved), _model_part(settings))
    if changes:
        more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
        hint = (
            f"; model settings that differ from the ones it was trained with: "
            f"{'; '.join(changes[:8])}{more}. Set them as it has them (its config.yaml lists "
            "the model it holds)"
        )
    set_weights(model, state, f"train.init_from={path}", hint, local)


def _model_part(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k.startswith("model.")}


# ------------------------------------------------------------------------------- run lock


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _this_process() -> dict:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "started": _start_time(pid)}


def _alive(holder: dict) -> bool:
    """Whether the process a lock file names (on this host) still runs."""
    pid = holder["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return False
    started = holder.get("started")
    return not started or _start_time(pid) in (None, started)


class RunLock:
    """<run_dir>/run.lock while a run writes to `run_dir` (`with RunLock(run_dir): ...`).

    The file holds the pid, host and start time of the run and an flock while it runs, and is
    removed at the end. A second run finds the flock held, or the file naming a live process, and
    stops with `RunDirBusy` naming it. A lock whose process is gone (kill -9, a crash) is taken
    over with a message through `warn`; one naming another host is never taken over (its process
    cannot be checked from here): the message says to delete the file once that run is gone."""

    NAME = "run.lock"

    def __init__(self, run_dir: str, warn=print):
        self.run_dir, self.warn = run_dir, warn
        self.path = os.path.join(run_dir, self.NAME)
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        os.makedirs(self.run_dir, exist_ok=True)
        me = _this_process()
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = self._holder(fd)
                os.close(fd)
                raise RunDirBusy(self._busy(holder, me)) from None
            if not self._current(fd):  # its holder removed it between our open and our flock
                os.close(fd)
                continue
            holder = self._holder(fd)
            if holder is not None and (holder["pid"], holder["host"]) != (me["pid"], me["host"]):
                if holder["host"] != me["host"] or _alive(holder):
                    os.close(fd)
                    raise RunDirBusy(self._busy(holder, me))
                self.warn(
                    f"taking over the stale lock {self.path} of pid {holder['pid']} on host "
                    f"{holder['host']} (that process is gone)"
                )
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunDirBusy(f"could not lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if self._current(self._fd):
                os.remove(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def _current(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(fd: int) -> dict | None:
        """The pid/host a lock file names; None when it names none (empty or unreadable)."""
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(holder, dict):
            return None
        pid, host = holder.get("pid"), holder.get("host")
        if not (isinstance(pid, int) and pid > 0 and isinstance(host, str)):
            return None
        started = holder.get("started")
        return {"pid": pid, "host": host, "started": started if isinstance(started, str) else None}

    def _busy(self, holder: dict | None, me: dict) -> str:
        who = (
            f"pid {holder['pid']} on host {holder['host']}"
            if holder is not None
            else "a process that has not written its pid yet"
        )
        msg = (
            f"run directory {self.run_dir} is in use by another run ({who}; lock file "
            f"{self.path}): wait for it to end, or set another train.run_dir"
        )
        if holder is not None and holder["host"] != me["host"]:
            msg += f"; if that run is no longer running, delete {self.path}"
        return msg
