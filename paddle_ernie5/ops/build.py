"""Build and load the C++ custom operators (`python -m paddle_ernie5.ops.build`, `make ops`).

Each op is a directory of custom_ops/ (see `OPS`); its shared library goes to
build/custom_ops/paddle_ernie5_<op>/ at the repository root. A stamp file holds a
hash of the sources, the compiler flags, the Paddle and Python versions and the CPU's instruction
set flags; when it matches, building is a no-op and loading never recompiles. Because the CPU
flags are part of the hash, `-march=native` is safe: a build directory carried to another kind of
CPU is rebuilt instead of crashing with an illegal instruction. The stamp's second line is the
library's sha256: a damaged library is rebuilt (with one line on stderr) instead of loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE_ROOT = REPO_ROOT / "custom_ops"
SOURCE_DIR = SOURCE_ROOT / "flashmask"  # sources of the default op
BUILD_DIR = REPO_ROOT / "build" / "custom_ops"
BUILD_COMMAND = "make ops  (or: python -m paddle_ernie5.ops.build)"
# op (directory under custom_ops/) -> name in messages
OPS = {
    "flashmask": "FlashMask",
    "moe_experts": "routed-experts MoE",
    "fused": "fused RMSNorm/RoPE/SwiGLU",
    "linear_ce": "chunked output projection + cross-entropy",
    "adamw": "fused AdamW",
}
# Headers every op may include as "../common/<name>.h"; they are part of every op's build hash.
COMMON_DIR = SOURCE_ROOT / "common"
DEFAULT_OP = "flashmask"


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"unknown custom op {op!r}; known: {', '.join(OPS)}")


def source_dir(op: str = DEFAULT_OP) -> Path:
    _check_op(op)
    return SOURCE_DIR if op == DEFAULT_OP else SOURCE_ROOT / op


def op_name(op: str = DEFAULT_OP) -> str:
    """The library (and Python module) name the op is built under."""
    _check_op(op)
    return f"paddle_ernie5_{op}"


def _sources(op: str = DEFAULT_OP) -> list[Path]:
    return sorted(p for p in source_dir(op).iterdir() if p.suffix in (".cc", ".h"))


def _hashed_sources(op: str) -> list[Path]:
    common = sorted(COMMON_DIR.glob("*.h")) if COMMON_DIR.is_dir() else []
    return _sources(op) + common


def _native_supported() -> bool:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return False
    probe = subprocess.run(
        [compiler, "-march=native", "-x", "c++", "-E", "-"], input=b"", capture_output=True
    )
    return probe.returncode == 0


def cxx_flags() -> list[str]:
    # No -ffast-math: the kernels rely on -inf for masked scores.
    flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64") and _native_supported():
        flags.append("-march=native")
    return flags


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    for line in info.splitlines():
        if line.startswith(("flags", "Features")):
            return line
    return platform.processor()


def fingerprint(flags: list[str], op: str = DEFAULT_OP) -> str:
    import paddle

    h = hashlib.sha256()
    for path in _hashed_sources(op):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in (
        " ".join(flags),
        paddle.__version__,
        sys.version,
        platform.machine(),
        _cpu_signature(),
    ):
        h.update(part.encode())
    return h.hexdigest()


def library_dir(op: str = DEFAULT_OP) -> Path:
    return BUILD_DIR / op_name(op)


def _stamp(op: str) -> Path:
    return library_dir(op) / "fingerprint.txt"


def _library(op: str) -> Path:
    return library_dir(op) / f"{op_name(op)}.so"


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_up_to_date(flags: list[str] | None = None, op: str = DEFAULT_OP) -> bool:
    """The library exists, was built from these sources and flags on this kind of CPU (the stamp's
    first line) and is the file that build wrote (its sha256, the stamp's second line). A damaged
    library, or one whose stamp has no checksum, is reported in one stderr line and is stale."""
    flags = cxx_flags() if flags is None else flags
    lib, stamp = _library(op), _stamp(op)
    if not (lib.exists() and stamp.exists()):
        return False
    lines = stamp.read_text().split()
    if not lines or lines[0] != fingerprint(flags, op):
        return False
    if len(lines) != 2 or lines[1] != _file_sha256(lib):
        what = "has no checksum in its stamp" if len(lines) != 2 else "does not match its checksum"
        print(f"ernie5: the built {OPS[op]} op {lib} {what}; rebuilding it", file=sys.stderr)
        return False
    return True


@contextlib.contextmanager
def _build_lock():
    # Several processes (tests, distributed ranks) may ask for the op at once.
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet(verbose: bool = False):
    # Paddle's extension loader logs at INFO level even when asked not to be verbose.
    log = logging.getLogger("utils.cpp_extension")
    level = log.level
    if not verbose:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _compile(flags: list[str], verbose: bool, op: str):
    from paddle.utils import cpp_extension

    if library_dir(op).exists():
        shutil.rmtree(library_dir(op))
    start = time.perf_counter()
    print(f"building the {OPS[op]} CPU op into {library_dir(op)} ...", file=sys.stderr)
    with _quiet(verbose):
        module = cpp_extension.load(
            name=op_name(op),
            sources=[str(p) for p in _sources(op) if p.suffix == ".cc"],
            extra_cxx_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(BUILD_DIR),
            verbose=verbose,
        )
    _stamp(op).write_text(f"{fingerprint(flags, op)}\n{_file_sha256(_library(op))}\n")
    print(f"built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return module


def build(force: bool = False, verbose: bool = False, op: str = DEFAULT_OP) -> bool:
    """Compile one op unless it is up to date; True when a compilation ran."""
    flags = cxx_flags()
    with _build_lock():
        if not force and is_up_to_date(flags, op):
            return False
        _compile(flags, verbose, op)
        return True


def load(auto_build: bool = True, op: str = DEFAULT_OP):
    """Return the module holding the op's registered kernels, building first if allowed and needed.

    Call once per process and op (the seams cache the result): Paddle registers an op only once."""
    from paddle.utils.cpp_extension import extension_utils

    flags = cxx_flags()
    with _build_lock():
        if not is_up_to_date(flags, op):
            if not auto_build:
                raise RuntimeError(
                    f"the {OPS[op]} CPU op is not built or is stale; run {BUILD_COMMAND}"
                )
            return _compile(flags, verbose=False, op=op)
    with _quiet():
        return extension_utils._import_module_from_library(op_name(op), str(library_dir(op)), False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    parser.add_argument(
        "--op",
        choices=list(OPS),
        action="append",
        help="build only this op (repeatable); default: all",
    )
    args = parser.parse_args(argv)
    for op in args.op or OPS:
        built = build(force=args.force, verbose=args.verbose, op=op)
        print(f"{OPS[op]} CPU op {'built' if built else 'up to date'}: {library_dir(op)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
