"""RMSNorm."""

from __future__ import annotations

from paddle import nn

from ..ops.fused import rms_norm


class RMSNorm(nn.Layer):
    """y = x * rsqrt(mean(x^2) + eps) * weight, statistics in fp32 so bf16 activations normalise as
    accurately as fp32 ones. `fused` (model.fused_ops): the fused CPU op of ops/fused.py where it
    applies, else the pure-Paddle reference written there."""

    def __init__(self, dim: int, eps: float = 1e-6, fused: bool = True):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.fused)
