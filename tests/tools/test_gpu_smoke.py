import os
import subprocess
import sys

import paddle
import pytest
from support import ROOT


@pytest.mark.skipif(paddle.is_compiled_with_cuda(), reason="checks the CPU-build refusal")
def test_gpu_smoke_exits_2_with_a_clear_message_on_a_cpu_build():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "gpu_smoke.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "gpu_smoke needs a GPU build of Paddle" in proc.stderr
    assert proc.stdout == ""
