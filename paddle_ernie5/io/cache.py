"""Cached artefacts: what is built once from the built-in data and kept in data.cache_dir (the text
tokenizer, the digits, the coded vision and speech sets).

A cache file is an npz of the artefact's arrays plus two entries written here:

    __cache_format__   the format constant of the code that wrote it (bumped when the layout or the
                       building procedure changes)
    __cache_sha256__   sha256 of every other entry (name, dtype, shape and bytes)

`load` trusts nothing: a file that is empty, truncated, unreadable, damaged (checksum mismatch) or
written by another format gives one line on stderr naming the file and what is wrong, and None; the
caller rebuilds the artefact and `save`s it (atomically, over the bad file). A cache is never used
on faith, so a flipped byte cannot change what a run trains on.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from collections.abc import Callable

import numpy as np

from . import save_npz

FORMAT_KEY = "__cache_format__"
CHECKSUM_KEY = "__cache_sha256__"


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over every entry but the stamps, in name order: name, dtype, shape, bytes."""
    h = hashlib.sha256()
    for name in sorted(k for k in arrays if k not in (FORMAT_KEY, CHECKSUM_KEY)):
        a = np.ascontiguousarray(arrays[name])
        for part in (name, a.dtype.str, repr(tuple(a.shape))):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        h.update(a.tobytes())
    return h.hexdigest()


def save(path: str, arrays: dict[str, np.ndarray], version: int) -> None:
    """Write `arrays` with their format stamp and checksum, atomically."""
    bad = [k for k in arrays if k in (FORMAT_KEY, CHECKSUM_KEY)]
    if bad:
        raise ValueError(f"cache entries may not be named {bad}")
    stamped = {
        **arrays,
        FORMAT_KEY: np.array(version, np.int64),
        CHECKSUM_KEY: np.array(checksum(arrays)),
    }
    save_npz(path, stamped)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def problem(path: str, version: int) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """(what is wrong with the cache at `path` or None, its arrays when nothing is)."""
    if os.path.getsize(path) == 0:
        return "is empty", None
    if not zipfile.is_zipfile(path):
        return "is unreadable (not an npz archive: truncated or overwritten)", None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many kinds for a damaged file
        reason = f"{type(e).__name__}: {e}".replace("\n", " ")
        return f"is unreadable ({reason[:160]})", None
    if FORMAT_KEY not in arrays or arrays[FORMAT_KEY].shape != ():
        return "has no format stamp (written by an older version of this code)", None
    written = int(arrays[FORMAT_KEY])
    if written != version:
        return f"was written in format {written}; this code reads format {version}", None
    if CHECKSUM_KEY not in arrays or str(arrays[CHECKSUM_KEY]) != checksum(arrays):
        return "is damaged (checksum mismatch)", None
    return None, {k: v for k, v in arrays.items() if k not in (FORMAT_KEY, CHECKSUM_KEY)}


def load(
    path: str, version: int, what: str, warn: Callable[[str], None] = _warn
) -> dict[str, np.ndarray] | None:
    """The arrays of a verified cache file; None when it is missing or bad (a bad one is reported
    through `warn` as one line: the caller rebuilds it)."""
    if not os.path.isfile(path):
        return None
    reason, arrays = problem(path, version)
    if reason is not None:
        warn(f"ernie5: cached {what} {path} {reason}; rebuilding it")
    return arrays


def cached(
    path: str,
    version: int,
    what: str,
    build: Callable[[], dict[str, np.ndarray]],
    warn: Callable[[str], None] = _warn,
) -> dict[str, np.ndarray]:
    """The verified arrays at `path`, or `build()`'s, saved there first."""
    arrays = load(path, version, what, warn)
    if arrays is None:
        arrays = build()
        save(path, arrays, version)
    return arrays
