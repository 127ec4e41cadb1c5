"""Optimizer: AdamW with decoupled weight decay, gradient clipping (global norm or AdaGC),
portable state.

`train.fused_optimizer` (default on) selects the fused AdamW (optim/fused_adamw.py: one C++ call
per step over every parameter) wherever the parameters are float32 on the CPU; then the clip's
sums of squares are one call too (ops/adamw.py) and the clip factor is applied inside the step.
Otherwise Paddle's AdamW, with the clip as Paddle ops. Both clips sum the squares in float64 and
both updates are Paddle's AdamW arithmetic, so the two runs agree to float32 rounding (bit for bit
on AVX-512 CPUs but in rare ties of the clip factor) and save the same state.

Paddle names optimizer state after auto-generated parameter names (`linear_3.w_0_moment1_0`), which
change with creation order. Checkpoints store it under the model's structured names instead
(`blocks.0.attn.qkv.weight::moment1_0`) so a state saved in one process loads in any other, and
from either optimizer into the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import paddle

from ..config import ClipConfig, TrainConfig
from ..ops.adamw import grad_sq_norms
from ..ops.policy import fused_allowed
from .fused_adamw import FusedAdamW

_NO_DECAY_SUFFIXES = ("norm.weight", "bias")


def build_optimizer(model, cfg: TrainConfig, allow_fused: bool = True):
    """AdamW over all trainable parameters; norms and biases are not decayed.

    The fused AdamW when `train.fused_optimizer` is on, `allow_fused` (False for a wrapper that
    drives Paddle's optimizer internals, e.g. Paddle's sharding optimizer) and every parameter is
    float32 on the CPU (ops/policy.py); paddle.optimizer.AdamW otherwise. Component loops
    (config.LoopConfig has no switch) use Paddle's."""
    no_decay = {
        p.name
        for n, p in model.named_parameters()
        if n.endswith(_NO_DECAY_SUFFIXES) or "_norm." in n
    }
    params = model.parameters()
    switch = allow_fused and isinstance(cfg, TrainConfig) and cfg.fused_optimizer
    cls = FusedAdamW if fused_allowed(switch, *params) else paddle.optimizer.AdamW
    return cls(
        learning_rate=cfg.lr,
        parameters=params,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        epsilon=cfg.eps,
        weight_decay=cfg.weight_decay,
        apply_decay_param_fun=lambda name: name not in no_decay,
    )


def is_fused(optimizer) -> bool:
    """The optimizer is the fused AdamW: clipping then uses the fused sums and defers its factor."""
    return isinstance(optimizer, FusedAdamW)


@paddle.no_grad()
def global_grad_norm(params, fused: bool = False) -> float:
    """L2 norm of all gradients of `params`, from float64 per-tensor sums (`tensor_sq_norms`)."""
    with_grad = [p for p in params if p.grad is not None]
    return math.sqrt(float(np.sum(tensor_sq_norms(with_grad, fused))))


@paddle.no_grad()
def scale_grads(params, factor: float, optimizer=None) -> None:
    """Multiply the gradients of `params` by `factor`: inside the next step of a fused `optimizer`
    that updates exactly these parameters, else now."""
    if is_fused(optimizer) and optimizer.defer_grad_scale(params, factor):
        return
    for p in params:
        if p.grad is not None:
            p.grad.scale_(factor)


@paddle.no_grad()
def clip_by_global_norm(params, max_norm: float, optimizer=None) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm (0 = no clipping).
    Returns the norm before clipping. With the fused AdamW as `optimizer`: fused sums, and the
    scaling happens in its next step."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params, fused=is_fused(optimizer))
    if max_norm > 0 and norm > max_norm:
        scale_grads(params, max_norm / (norm + 1e-6), optimizer)
    return norm


@paddle.no_grad()
def tensor_sq_norms(params, fused: bool = False) -> np.ndarray:
    """Squared L2 norm of each parameter's gradient in float64, in order; `fused`: one op call
    (ops/adamw.py), else Paddle ops. One host copy either way."""
    return grad_sq_norms([p.grad for p in params], fused=fused)


@dataclass
class ClipStats:
    norm: float  # global L2 norm of the gradients before clipping
    fraction_clipped: float  # share of tensors whose clip factor was < 1
    mean_factor: float  # mean clip factor over the tensors with a gradient

    def metrics(self) -> dict[str, float]:
        return {
            "train/grad_norm": self.norm,
            "clip/fraction_clipped": self.fraction_clipped,
            "clip/mean_factor": self.mean_factor,
        }


def global_clip_stats(norm: float, max_norm: float) -> ClipStats:
    """What global-norm clipping did to every tensor at once (the factor of clip_by_global_norm)."""
    factor = max_norm / (norm + 1e-6) if max_norm > 0 and norm > max_norm else 1.0
    return ClipStats(norm, float(factor < 1.0), factor)


class AdaGC:
    """Adaptive per-tensor gradient clipping (AdaGC, arXiv 2502.11034); the formulas are in
    config.ClipConfig. State: gamma (the EMA of clipped norms) per structured parameter name and the
    number of steps clipped so far; both go into the optimizer checkpoint (`state_dict`).

    Call `clip` once per optimizer step, after gradient accumulation and the parallel reduction,
    with the norms of the full gradients (`sq_norms`; under expert parallelism the expert tensors'
    squares summed over the expert ranks). A tensor whose clipped norm is 0 (no tokens reached it)
    leaves gamma unchanged, so a silent expert is not frozen by a zero threshold; a tensor seen for
    the first time after the warm-up starts its EMA at its own norm, unclipped."""

    STEP_KEY = "adagc::step"
    GAMMA_PREFIX = "adagc::gamma::"

    def __init__(self, cfg: ClipConfig, lambda_abs: float):
        self.cfg = cfg
        self.lambda_abs = lambda_abs
        self.gamma: dict[str, float] = {}
        self.step = 0

    def factors(self, names: list[str], norms: np.ndarray) -> np.ndarray:
        """Clip factor h per tensor for gradient norms `norms`; updates gamma and the step."""
        cfg = self.cfg
        norms = np.asarray(norms, dtype=np.float64)
        if self.step < cfg.warmup_steps:
            total = math.sqrt(float(np.sum(norms**2)))
            h = min(1.0, self.lambda_abs / total) if self.lambda_abs > 0 and total > 0 else 1.0
            out = np.full(len(names), h)
            for name, n in zip(names, norms):
                if h * n > 0:
                    self.gamma[name] = min(self.gamma.get(name, math.inf), h * n)
        else:
            out = np.ones(len(names))
            for i, (name, n) in enumerate(zip(names, norms)):
                prev = self.gamma.get(name)
                if prev is not None and n > 0:
                    out[i] = min(1.0, cfg.lambda_rel * prev / n)
                clipped = out[i] * n
                if clipped > 0:
                    self.gamma[name] = (
                        clipped if prev is None else cfg.beta * prev + (1 - cfg.beta) * clipped
                    )
        self.step += 1
        return out

    @paddle.no_grad()
    def clip(self, named_params, sq_norms: np.ndarray | None = None) -> ClipStats:
        """Clip the gradients of (name, parameter) pairs in place. `sq_norms`: the squared norms of
        the full gradients of the pairs that have one, in order (default: computed here, one
        process)."""
        named = [(n, p) for n, p in named_params if p.grad is not None]
        if sq_norms is None:
            sq_norms = tensor_sq_norms([p for _, p in named])
        norms = np.sqrt(np.asarray(sq_norms, dtype=np.float64))
        h = self.factors([n for n, _ in named], norms)
        for (_, p), factor in zip(named, h):
            if factor < 1.0:
                p.grad.scale_(float(factor))
        return ClipStats(
            math.sqrt(float(np.sum(norms**2))),
            float(np.mean(h < 1.0)) if len(h) else 0.0,
            float(np.mean(h)) if len(h) else 1.0,
        )

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {self.STEP_KEY: np.array([self.step], dtype=np.int64)}
        out.update(
            {self.GAMMA_PREFIX + n: np.array([g], dtype=np.float64) for n, g in self.gamma.items()}
        )
        return out

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.step = int(state[self.STEP_KEY][0]) if self.STEP_KEY in state else 0
        self.gamma = {
            k[len(self.GAMMA_PREFIX) :]: float(v[0])
            for k, v in state.items()
            if k.startswith(self.GAMMA_PREFIX)
        }

    @classmethod
    def split_state(cls, state: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """(optimizer moments, AdaGC entries) of a checkpoint's optimizer state."""
        mine = {k: v for k, v in state.items() if k.startswith("adagc::")}
        return {k: v for k, v in state.items() if k not in mine}, mine


def apply_update(model, optimizer, step: int, cfg: TrainConfig) -> tuple[float, float]:
    """One update after backward: the scheduled learning rate, global-norm clipping
    (train.clip_norm), the optimizer step, gradients cleared. Returns (lr, gradient norm before
    clipping)."""
    from .schedules import learning_rate

    lr = learning_rate(step, cfg)
    optimizer.set_lr(lr)
    norm = clip_by_global_norm(model.parameters(), cfg.clip_norm, optimizer)
    optimizer.step()
    optimizer.clear_grad(set_to_zero=False)
    return lr, norm


def optimizer_state(model, opt) -> dict[str, np.ndarray]:
    """Optimizer tensors keyed by structured parameter name."""
    by_name = {p.name: n for n, p in model.named_parameters()}
    out = {}
    for key, value in opt.state_dict().items():
        if not isinstance(value, paddle.Tensor):
            continue
        pname, suffix = _split_key(key, by_name)
        out[f"{by_name[pname]}::{suffix}"] = value.numpy()
    return out


def load_optimizer_state(model, opt, state: dict[str, np.ndarray]) -> None:
    by_struct = {n: p.name for n, p in model.named_parameters()}
    translated = {}
    for key, value in state.items():
        struct, _, suffix = key.partition("::")
        if struct not in by_struct:
            raise KeyError(f"optimizer state for unknown parameter {struct!r}")
        translated[f"{by_struct[struct]}_{suffix}"] = paddle.to_tensor(value)
    opt.set_state_dict(translated)


def _split_key(key: str, by_name: dict[str, str]) -> tuple[str, str]:
    # Longest parameter name that prefixes the key followed by '_'.
    best = max((p for p in by_name if key.startswith(p + "_")), key=len, default=None)
    if best is None:
        raise KeyError(f"optimizer state key {key!r} matches no model parameter")
    return best, key[len(best) + 1 :]
