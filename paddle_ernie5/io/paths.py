"""Up-front checks of the paths a command reads and writes, before any work: each problem is one
`UserError` naming the setting, what is wrong and the fix (the CLI prints it in one line and exits
with code 2), instead of a traceback minutes later, after training.

    check_output_dir(path, what)   a directory to write into: exists and is writable, or can be
                                   created; never a file; its entries writable too
    check_input_file(path, what)   a file to read: exists, is a file, readable, not empty
"""

from __future__ import annotations

import os

from ..errors import UserError


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(path: str, what: str) -> None:
    """`path` (named `what` in messages, e.g. "train.run_dir") can hold the files a run writes."""
    if not path:
        raise UserError(f"{what} is empty; give the directory to write into")
    full = os.path.abspath(path)
    if os.path.lexists(full) and not os.path.isdir(full):
        raise UserError(
            f"{what}={path!r} is a file, not a directory; point {what} at a directory "
            "(or move the file away)"
        )
    base = _nearest_existing(full)
    if not os.path.isdir(base):
        raise UserError(
            f"{what}={path!r} cannot be created: {base!r} is a file, not a directory; point "
            f"{what} elsewhere (or move the file away)"
        )
    if not os.access(base, os.W_OK | os.X_OK):
        where = "it" if base == full else f"its parent {base!r}"
        raise UserError(
            f"{what}={path!r} is not writable ({where} is read-only for this user); make it "
            f"writable (chmod u+w) or point {what} at another directory"
        )
    if base != full:
        return
    for name in sorted(os.listdir(full)):
        entry = os.path.join(full, name)
        need = os.W_OK | os.X_OK if os.path.isdir(entry) else os.W_OK
        if not name.startswith(".") and not os.access(entry, need):
            raise UserError(
                f"{what}={path!r} holds {name!r}, which is read-only for this user; make it "
                f"writable (chmod -R u+w {path}) or point {what} at another directory"
            )


def check_input_file(path: str, what: str) -> None:
    """`path` (named `what` in messages, e.g. "--image") is a readable, non-empty file."""
    if not path:
        raise UserError(f"{what} is empty; give a file")
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r}: no such file; check the path")
    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a directory; give a file")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path!r} is not readable for this user; check its permissions")
    if os.path.getsize(path) == 0:
        raise UserError(f"{what} {path!r} is empty (0 bytes); give a complete file")
