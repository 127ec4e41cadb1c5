"""`train.precision` of the backbone trainer: what the forward and backward compute in, and the loss
scaling that goes with it. Parameters, gradients and Adam state are float32 in every mode.

    precision  on a GPU                                       on the CPU
    fp32       float32                                        float32
    bf16       paddle.amp.auto_cast O1, bfloat16              emulation: bfloat16 rounding around
                                                              float32 math (model/bf16_emulation.py)
    fp16       auto_cast O1, float16, GradScaler loss scaling ConfigError
               (one process)

O1 runs Paddle's white-listed ops (matmul, linear, ...) on inputs cast to the low dtype and leaves
the parameters float32: they are the float32 master weights, and the optimizer, clipping and
checkpoints see what an fp32 run sees. `bmm` joins the white list so the grouped experts' batched
matmuls run in the low dtype too, and ops/flashmask.py casts q/k/v to the autocast dtype so Paddle's
FlashMask kernel runs. The CPU cannot do either (Paddle's CPU auto_cast keeps float32 and its matmul
has no bfloat16 kernel), hence the emulation.

GradScaler's overflow check sees one process's gradients, so fp16 is refused on more than one
process; bf16 needs no loss scaling and runs with every parallel layout.
"""

from __future__ import annotations

import contextlib

import paddle

from ..config import ConfigError
from ..model.bf16_emulation import bf16_emulation

_AMP_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}
_AMP_WHITE_LIST = {"bmm"}
_FP16_INITIAL_SCALE = 2.0**15


def plan(precision: str, on_gpu: bool, world_size: int = 1, supported: bool = True) -> str:
    """How `precision` runs: "fp32", "amp" (auto_cast on a GPU) or "emulation" (bf16 on the CPU).
    `supported`: the GPU computes in that dtype (paddle.amp.is_bfloat16_supported /
    is_float16_supported). ConfigError for what cannot run. Pure: device facts are arguments."""
    if precision == "fp32":
        return "fp32"
    if precision not in _AMP_DTYPE:
        raise ConfigError(f"train.precision={precision!r} is invalid: allowed fp32, bf16 or fp16")
    if not on_gpu:
        if precision == "fp16":
            raise ConfigError(
                "train.precision='fp16' is invalid on a CPU device: allowed fp32 or bf16 (fp16 "
                "needs a GPU build of Paddle running on a GPU; on the CPU, bf16 runs as an "
                "emulation that rounds to bfloat16 around float32 math)"
            )
        return "emulation"
    if not supported:
        raise ConfigError(
            f"train.precision={precision!r} is invalid on this GPU: allowed fp32 (Paddle reports "
            f"no {_AMP_DTYPE[precision]} support for it)"
        )
    if precision == "fp16" and world_size > 1:
        raise ConfigError(
            f"train.precision='fp16' is invalid with {world_size} processes: allowed bf16 or fp32 "
            "(GradScaler's overflow check sees one process's gradients; fp16 runs on one process)"
        )
    return "amp"


class Precision:
    """What the trainer calls around its forward, backward and optimizer step."""

    def __init__(self, precision: str, on_gpu: bool, world_size: int = 1, supported: bool = True):
        self.precision = precision
        self.mode = plan(precision, on_gpu, world_size, supported)
        self.scaler = (
            paddle.amp.GradScaler(init_loss_scaling=_FP16_INITIAL_SCALE)
            if self.mode == "amp" and precision == "fp16"
            else None
        )

    @classmethod
    def for_device(cls, precision: str, world_size: int = 1) -> Precision:
        """For the device Paddle computes on in this process."""
        on_gpu = paddle.is_compiled_with_cuda() and paddle.device.get_device().startswith("gpu")
        supported = True
        if on_gpu and precision == "bf16":
            supported = paddle.amp.is_bfloat16_supported()
        elif on_gpu and precision == "fp16":
            supported = paddle.amp.is_float16_supported()
        return cls(precision, on_gpu, world_size, supported)

    def describe(self) -> str:
        """The mode actually used, for the startup log line."""
        masters = "float32 master weights and Adam state"
        if self.mode == "emulation":
            return f"bf16 (CPU emulation: bf16 rounding around float32 math; {masters})"
        if self.mode == "amp" and self.scaler is not None:
            return (
                "fp16 (GPU: paddle.amp.auto_cast O1 in float16, GradScaler dynamic loss scaling; "
                f"{masters})"
            )
        if self.mode == "amp":
            return (
                "bf16 (GPU: paddle.amp.auto_cast O1 in bfloat16, Paddle's FlashMask kernel; "
                f"{masters})"
            )
        return "fp32"

    def compute(self, model):
        """Context for the forward passes and their backward."""
        if self.mode == "emulation":
            return bf16_emulation(model)
        if self.mode == "amp":
            return paddle.amp.auto_cast(
                level="O1",
                dtype=_AMP_DTYPE[self.precision],
                custom_white_list=_AMP_WHITE_LIST,
            )
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        if self.mode != "amp":
            loss.backward()
            return
        # Outside auto_cast, as Paddle's AMP examples run it; fp16 scales the loss first.
        with paddle.amp.auto_cast(enable=False):
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer) -> None:
        """Before clipping: fp16 gradients divided by the loss scale (a no-op otherwise)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def optimizer_step(self, par, model, optimizer) -> None:
        """The parallel runtime's step; fp16 through GradScaler, which skips a step whose gradients
        overflowed and adapts the scale."""
        if self.scaler is None:
            par.optimizer_step(model, optimizer)
            return
        self.scaler.step(optimizer)
        self.scaler.update()
