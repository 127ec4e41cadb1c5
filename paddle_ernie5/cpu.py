"""The CPU vendor fix, chosen before paddle is imported.

Paddle's bundled MKL takes a slow generic code path on AMD CPUs (measured on this project's
machines: a float32 2048^3 matmul at 17.8 GFLOP/s on one Zen 2/3 thread, 67.9 with the fix; the
tiny recipe's step 1.25x to 2.6x faster depending on the CPU). `MKL_DEBUG_CPU_TYPE=5` makes MKL
use its AVX2 path. It only works when set before MKL is loaded, so the entry points (`ernie5`,
tools/train.py, the benchmarks) call `apply_mkl_fix` before they import paddle.

The user's own MKL_DEBUG_CPU_TYPE is never changed; `ERNIE5_MKL_AMD_FIX=0` turns the fix off.
"""

from __future__ import annotations

import os

SWITCH = "ERNIE5_MKL_AMD_FIX"
MKL_VAR = "MKL_DEBUG_CPU_TYPE"


def _cpuinfo_field(key: str, cpuinfo: str) -> str:
    """The value of the first `key` line of /proc/cpuinfo, '' when missing or unreadable."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The vendor id of the first CPU ('AuthenticAMD', 'GenuineIntel', ...), '' when unknown."""
    return _cpuinfo_field("vendor_id", cpuinfo)


def cpu_model_name(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The model name of the first CPU ('AMD EPYC 7B13', ...), '' when unknown."""
    return _cpuinfo_field("model name", cpuinfo)


def mkl_choice(vendor: str, env: dict) -> tuple[str | None, str]:
    """(value to set MKL_DEBUG_CPU_TYPE to, or None to leave it) and the startup line saying why."""
    if env.get(MKL_VAR):
        return None, f"cpu: {vendor or 'unknown'}; {MKL_VAR}={env[MKL_VAR]} kept (set by the user)"
    if vendor != "AuthenticAMD":
        return None, f"cpu: {vendor or 'unknown'}; MKL's default code path"
    if env.get(SWITCH, "1") == "0":
        return None, f"cpu: AMD; MKL's slow default path kept ({SWITCH}=0)"
    return "5", f"cpu: AMD; {MKL_VAR}=5 set for MKL's AVX2 path ({SWITCH}=0 turns this off)"


def apply_mkl_fix(env: dict | None = None, vendor: str | None = None) -> str:
    """Set MKL_DEBUG_CPU_TYPE in `env` (default os.environ) when `mkl_choice` says so; the line
    to print. Has an effect only if paddle has not been imported yet."""
    env = os.environ if env is None else env
    value, line = mkl_choice(cpu_vendor() if vendor is None else vendor, env)
    if value is not None:
        env[MKL_VAR] = value
    return line
