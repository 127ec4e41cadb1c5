"""RMSNorm."""

from __future__ import annotations

import paddle
from paddle import nn


class RMSNorm(nn.Layer):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x):
        # Statistics in fp32 so bf16 activations normalise as accurately as fp32 ones.
        x32 = x.astype("float32")
        y = x32 * paddle.rsqrt(x32.pow(2).mean(axis=-1, keepdim=True) + self.eps)
        return y.astype(x.dtype) * self.weight
