"""When the fused C++ CPU ops run instead of their pure-Paddle references.

One rule for every fused op (ops/fused.py, ops/linear_ce.py, optim/fused_adamw.py):

    fused  <=>  the caller's switch is on (model.fused_ops / train.fused_optimizer)
                and every tensor is float32 on the CPU
                and no `reference_kernels()` block is active

`reference_kernels()` is for code that must see the reference computation graph, e.g. the bf16
emulation (model/bf16_emulation.py), which rounds the outputs of individual layers, and tests that
compare the two paths.
"""

from __future__ import annotations

import contextlib
import threading

_state = threading.local()


def _depth() -> int:
    return getattr(_state, "reference_depth", 0)


@contextlib.contextmanager
def reference_kernels():
    """Inside this block every fused op takes its pure-Paddle reference path."""
    _state.reference_depth = _depth() + 1
    try:
        yield
    finally:
        _state.reference_depth = _depth() - 1


def fused_allowed(switch: bool, *tensors) -> bool:
    """True when the fused CPU op may replace the reference for these tensors."""
    if not switch or _depth() > 0:
        return False
    for t in tensors:
        if t is None:
            continue
        if str(t.dtype) not in ("paddle.float32", "float32") or not t.place.is_cpu_place():
            return False
    return True
