"""bfloat16 training on the CPU, emulated: bfloat16 rounding around float32 math.

Paddle 3.3.1's CPU build cannot compute in bfloat16: `paddle.amp.auto_cast(dtype="bfloat16")` (O1
and O2) keeps float32 outputs, and the CPU matmul kernel has no bfloat16 registration. So
`train.precision: bf16` on the CPU runs this emulation instead. Every value listed below is rounded
to the nearest bfloat16 (round-to-nearest-even of its float32 value: exactly the value a bfloat16
tensor would hold, kept in a float32 tensor); the math between those points runs in float32, as a
bfloat16 kernel that accumulates in float32 does.

Rounded, inside `bf16_emulation(model)` only:

  weights      every parameter except those of the normalisation layers (RMSNorm, LayerNorm) and
               of the router (its logits are float32 by design): linear projections and their
               biases, embedding tables, the expert pool, modality tables. They are rounded in place
               on entry and their float32 masters are put back, bit for bit, on exit. Forward and
               backward in between see the bfloat16 values; each gradient is accumulated in float32
               into the parameter (a straight-through gradient), so the optimizer updates the
               float32 master weights with float32 Adam state, as mixed-precision training does.
  activations  the input and output of every linear projection (nn.Linear), of the text head
               (logits included), of each block (the residual stream between blocks) and of each
               MoE layer (the fused expert op reads rounded tokens with rounded weights; its output
               is rounded once, after the combine and the shared expert). Forward pre/post hooks;
               the rounding's gradient is the identity.

Not rounded: q and k after RoPE and the attention internals (the CPU FlashMask op works in
float32, like a flash kernel accumulating in float32), the SwiGLU hidden inside the fused expert op,
normalisation statistics, losses, gradients and optimizer state (float32 throughout).

The model code is unchanged: the rounding is applied by wrapping, and outside the context manager
the model is the plain float32 model (hooks removed, masters in place).
"""

from __future__ import annotations

import contextlib

import paddle
from paddle import nn
from paddle.autograd import PyLayer

from .block import Block
from .heads import TextHead
from .moe import MoE
from .norm import RMSNorm
from .router import Router

# Layers whose own parameters stay float32; layers whose input and output are rounded.
_FLOAT32_WEIGHTS = (RMSNorm, nn.LayerNorm, Router)
_ROUNDED_IO = (nn.Linear, TextHead, Block, MoE)


class _RoundToBF16(PyLayer):
    @staticmethod
    def forward(ctx, x):
        # Paddle's float32 -> bfloat16 cast rounds to nearest even; tests/model/
        # test_bf16_emulation.py checks it bit for bit against an integer reference (ties,
        # subnormals, inf and NaN included).
        return x.astype("bfloat16").astype("float32")

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_to_bf16(x):
    """float32 `x` rounded to the nearest bfloat16 value (ties to even), still float32; the gradient
    passes straight through. Tensors of other dtypes are returned unchanged."""
    if x.dtype != paddle.float32:
        return x
    return _RoundToBF16.apply(x)


def rounded_parameters(model: nn.Layer) -> list:
    """The float32 parameters the emulation rounds: all but the norms' and the router's (each
    parameter once, tied ones included)."""
    seen, params = set(), []
    for _, layer in model.named_sublayers(include_self=True):
        if isinstance(layer, _FLOAT32_WEIGHTS):
            continue
        for p in layer.parameters(include_sublayers=False):
            if p.dtype == paddle.float32 and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def _round_input(layer, inputs):
    return (round_to_bf16(inputs[0]), *inputs[1:])


def _round_output(layer, inputs, output):
    if isinstance(output, tuple):  # Block and MoE return (x, router stats)
        return (round_to_bf16(output[0]), *output[1:])
    return round_to_bf16(output)


@contextlib.contextmanager
def bf16_emulation(model: nn.Layer):
    """Run `model` with bfloat16-rounded weights and activations (see the module docstring) until
    the block ends; a backward inside the block accumulates float32 gradients into the float32
    parameters, whose values are restored exactly on exit."""
    handles = []
    masters = []
    try:
        for _, layer in model.named_sublayers(include_self=True):
            if isinstance(layer, _ROUNDED_IO):
                handles.append(layer.register_forward_pre_hook(_round_input))
                handles.append(layer.register_forward_post_hook(_round_output))
        with paddle.no_grad():
            for p in rounded_parameters(model):
                masters.append((p, p.clone()))
                p.set_value(p.astype("bfloat16").astype("float32"))
        yield model
    finally:
        with paddle.no_grad():
            for p, master in masters:
                p.set_value(master)
        for handle in handles:
            handle.remove()
