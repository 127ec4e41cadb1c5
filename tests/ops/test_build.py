"""The op build is cached by a fingerprint of its sources and flags."""

import shutil
import subprocess
import sys

import pytest

from paddle_ernie5.ops import build


def test_build_is_a_no_op_when_up_to_date(cpu_op):
    assert build.is_up_to_date()
    assert build.build() is False


def test_fingerprint_follows_sources_and_flags(tmp_path, monkeypatch):
    copy = tmp_path / "flashmask"
    shutil.copytree(build.SOURCE_DIR, copy)
    monkeypatch.setattr(build, "SOURCE_DIR", copy)
    flags = build.cxx_flags()
    before = build.fingerprint(flags)
    assert build.fingerprint(flags) == before
    assert build.fingerprint(flags + ["-DEXTRA"]) != before
    kernel = copy / "flashmask_fwd.cc"
    kernel.write_text(kernel.read_text() + "\n// changed\n")
    assert build.fingerprint(flags) != before


def test_missing_build_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path / "custom_ops")
    assert not build.is_up_to_date()
    with pytest.raises(RuntimeError, match="make ops"):
        build.load(auto_build=False)


def test_importing_the_package_does_not_load_the_op():
    code = (
        "import paddle_ernie5, paddle_ernie5.ops, paddle_ernie5.model.attention\n"
        "from paddle_ernie5.ops import flashmask\n"
        "print('loaded', flashmask._cpu_op.cache_info().currsize)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "loaded 0" in done.stdout


def test_a_damaged_library_is_stale(cpu_op, tmp_path, monkeypatch, capsys):
    """The stamp carries the library's sha256: a flipped byte in the built .so makes the build
    stale (one stderr line) so it is rebuilt, never loaded; so does a stamp without a checksum."""
    shutil.copytree(build.BUILD_DIR, tmp_path / "custom_ops")
    monkeypatch.setattr(build, "BUILD_DIR", tmp_path / "custom_ops")
    assert build.is_up_to_date()
    lib = build.library_dir() / f"{build.op_name()}.so"
    good = lib.read_bytes()
    lib.write_bytes(good[:1000] + bytes([good[1000] ^ 1]) + good[1001:])
    capsys.readouterr()
    assert not build.is_up_to_date()
    assert "does not match its checksum; rebuilding it" in capsys.readouterr().err
    lib.write_bytes(good)
    assert build.is_up_to_date()
    stamp = build.library_dir() / "fingerprint.txt"
    stamp.write_text(stamp.read_text().split()[0] + "\n")  # written before stamps had checksums
    assert not build.is_up_to_date()
    assert "has no checksum" in capsys.readouterr().err
