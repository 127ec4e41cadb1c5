"""Optimizer: AdamW with decoupled weight decay, global-norm clipping, portable state.

Paddle names optimizer state after auto-generated parameter names (`linear_3.w_0_moment1_0`), which
change with creation order. Checkpoints store it under the model's structured names instead
(`blocks.0.attn.qkv.weight::moment1_0`) so a state saved in one process loads in any other.
"""

from __future__ import annotations

import numpy as np
import paddle

from ..config import TrainConfig

_NO_DECAY_SUFFIXES = ("norm.weight", "bias")


def build_optimizer(model, cfg: TrainConfig) -> paddle.optimizer.AdamW:
    """AdamW over all trainable parameters; norms and biases are not decayed."""
    no_decay = {p.name for n, p in model.named_parameters()
                if n.endswith(_NO_DECAY_SUFFIXES) or "_norm." in n}
    return paddle.optimizer.AdamW(
        learning_rate=cfg.lr, parameters=model.parameters(), beta1=cfg.beta1, beta2=cfg.beta2,
        epsilon=cfg.eps, weight_decay=cfg.weight_decay,
        apply_decay_param_fun=lambda name: name not in no_decay)


@paddle.no_grad()
def global_grad_norm(params) -> float:
    squares = [paddle.sum(p.grad.astype("float32") ** 2) for p in params if p.grad is not None]
    if not squares:
        return 0.0
    return float(paddle.sqrt(paddle.add_n(squares)))


@paddle.no_grad()
def clip_by_global_norm(params, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm (0 = no clipping).
    Returns the norm before clipping."""
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.scale_(scale)
    return norm


def apply_update(model, optimizer, step: int, cfg: TrainConfig) -> tuple[float, float]:
    """One update after backward: the scheduled learning rate, global-norm clipping (train.clip_norm),
    the optimizer step, gradients cleared. Returns (lr, gradient norm before clipping)."""
    from .schedules import learning_rate

    lr = learning_rate(step, cfg)
    optimizer.set_lr(lr)
    norm = clip_by_global_norm(model.parameters(), cfg.clip_norm)
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
    return best, key[len(best) + 1:]
