"""File helpers shared by every component that writes to disk. Every write is atomic: the data goes
to a temporary file in the same folder, flushed to disk, then renamed over the target, so a reader
(or a crash) never sees half a file. A full disk (or quota, or file-size limit) during a write
leaves the target as it was, removes the temporary file and raises `DiskFullError`: one line naming
the file and the fix."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np

from ..errors import UserError

# Out of space: the device is full, the user's quota is spent, or a file-size limit (ulimit -f).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(UserError):
    """A write failed for lack of space; what was written before is intact."""


def no_space(exc: BaseException | None) -> str | None:
    """The reason ("No space left on device") when `exc`, or an exception it was raised from, is
    a write that failed for lack of space; None otherwise. Also recognises errors of writers
    implemented outside Python (safetensors reports "... (os error 28)")."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return os.strerror(exc.errno)
        text = str(exc)
        for code in NO_SPACE:
            if f"os error {code})" in text or os.strerror(code) in text:
                return os.strerror(code)
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_message(path: str | None, reason: str) -> str:
    """One line: which write failed for lack of space, and what to do."""
    what = f"cannot write {path}" if path else "a write failed"
    return (
        f"{what}: {reason}; free space on that device (or point train.run_dir / data.cache_dir "
        "to another one) and run the same command again; files written before, checkpoints "
        "included, are intact"
    )


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = no_space(e) if isinstance(e, Exception) else None
        if reason is not None:
            raise DiskFullError(disk_full_message(path, reason)) from e
        raise


def write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=1).encode("utf-8"))


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def save_layer(
    directory: str,
    layer,
    meta: dict,
    weights: str = "model.safetensors",
    meta_name: str = "config.json",
) -> None:
    """A layer's state as safetensors plus its JSON description, both written atomically."""
    from safetensors.numpy import save as save_bytes

    state = {k: np.ascontiguousarray(v.numpy()) for k, v in layer.state_dict().items()}
    write_bytes(os.path.join(directory, weights), save_bytes(state))
    write_json(os.path.join(directory, meta_name), meta)


def read_layer(
    directory: str,
    what: str,
    how_to_make: str,
    weights: str = "model.safetensors",
    meta_name: str = "config.json",
) -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON description, numpy state) written by `save_layer`; a clear error when absent."""
    from safetensors.numpy import load_file

    meta_path, weights_path = os.path.join(directory, meta_name), os.path.join(directory, weights)
    if not (os.path.isfile(meta_path) and os.path.isfile(weights_path)):
        raise FileNotFoundError(
            f"no {what} in {directory!r} (expected {meta_name} and {weights}); {how_to_make}"
        )
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    return meta, load_file(weights_path)
