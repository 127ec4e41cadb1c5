"""paddle_ernie5/cpu.py: MKL's AVX2 path is chosen on AMD CPUs unless the user decided."""

import subprocess
import sys

from paddle_ernie5.cpu import (
    MKL_VAR,
    SWITCH,
    apply_mkl_fix,
    cpu_model_name,
    cpu_vendor,
    mkl_choice,
)


def test_amd_gets_the_avx2_path_and_every_other_case_is_left_alone():
    assert mkl_choice("AuthenticAMD", {})[0] == "5"
    assert mkl_choice("GenuineIntel", {})[0] is None
    assert mkl_choice("", {})[0] is None
    assert mkl_choice("AuthenticAMD", {MKL_VAR: "4"}) == (
        None,
        f"cpu: AuthenticAMD; {MKL_VAR}=4 kept (set by the user)",
    )
    value, line = mkl_choice("AuthenticAMD", {SWITCH: "0"})
    assert value is None and f"{SWITCH}=0" in line


def test_apply_sets_only_what_the_choice_says():
    env = {}
    line = apply_mkl_fix(env, vendor="AuthenticAMD")
    assert env == {MKL_VAR: "5"} and f"{MKL_VAR}=5 set" in line
    env = {MKL_VAR: "2"}
    apply_mkl_fix(env, vendor="AuthenticAMD")
    assert env == {MKL_VAR: "2"}
    env = {}
    apply_mkl_fix(env, vendor="GenuineIntel")
    assert env == {}


def test_vendor_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel name\t: AMD EPYC 7B13\n"
    )
    assert cpu_vendor(str(info)) == "AuthenticAMD"
    assert cpu_model_name(str(info)) == "AMD EPYC 7B13"
    assert cpu_vendor(str(tmp_path / "missing")) == ""
    assert cpu_model_name(str(tmp_path / "missing")) == ""


def test_the_cli_sets_it_before_paddle_is_imported():
    code = (
        "import os, sys\n"
        "from paddle_ernie5 import cli\n"
        "assert 'paddle' not in sys.modules\n"
        "cli._set_threads(1)\n"
        "from paddle_ernie5.cpu import cpu_vendor\n"
        "amd = cpu_vendor() == 'AuthenticAMD'\n"
        "print(os.environ.get('MKL_DEBUG_CPU_TYPE') == ('5' if amd else None))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in (MKL_VAR, SWITCH)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
    assert "cpu: " in out.stderr
