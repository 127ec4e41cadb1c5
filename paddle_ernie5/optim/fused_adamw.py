"""AdamW whose step is one fused call over every parameter (ops/adamw.py), in place of
paddle.optimizer.AdamW's one kernel launch per parameter.

It has the part of Paddle's optimizer interface the trainers and runtimes use: `set_lr`, `get_lr`,
`step`, `clear_grad(set_to_zero)`, `state_dict` / `set_state_dict` and `_parameter_list`. The
update is Paddle's AdamW (decoupled decay, bias correction folded into step size and epsilon),
bit-identical to it on AVX-512 CPUs, and the state carries Paddle's accumulator names
(`<param>_moment1_0`, `_moment2_0`, `_beta1_pow_acc_0`, `_beta2_pow_acc_0`), so a checkpoint
written with one optimizer resumes with the other.

State per parameter, created at its first step with a gradient (as Paddle creates its
accumulators; a parameter an elastic view skipped keeps its state and its step count):

    moment1, moment2    float32 tensors shaped like the parameter
    beta1^t, beta2^t    float32 numbers on the host, multiplied by beta1, beta2 after each step in
                        float32 (Paddle keeps them in [1] tensors and forms the same products)

Gradient clipping may hand its factor to the next step (`defer_grad_scale`) instead of scaling
every gradient in a pass of its own; the factor applies once and is dropped by `clear_grad`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import paddle

from ..ops.adamw import adamw_step

_KINDS = ("moment1", "moment2", "beta1_pow_acc", "beta2_pow_acc")
# Paddle numbers accumulator names per process (`_0` for the first optimizer over a parameter);
# any number loads.
_KEY = re.compile(r"^(?P<param>.+)_(?P<kind>moment1|moment2|beta1_pow_acc|beta2_pow_acc)_\d+$")


class FusedAdamW:
    """AdamW over `parameters` (a list), one fused step per call; `apply_decay_param_fun(name)`
    chooses the decayed parameters as in paddle.optimizer.AdamW (None: all)."""

    def __init__(
        self,
        parameters,
        learning_rate: float,
        beta1: float = 0.9,
        beta2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float = 0.01,
        apply_decay_param_fun: Callable[[str], bool] | None = None,
    ):
        self._parameter_list = list(parameters)
        self._learning_rate = float(learning_rate)
        self._beta1, self._beta2 = float(beta1), float(beta2)
        self._epsilon = float(epsilon)
        self._weight_decay = float(weight_decay)
        self._betas = np.array([beta1, beta2], dtype=np.float32)
        self._decay = [
            apply_decay_param_fun is None or bool(apply_decay_param_fun(p.name))
            for p in self._parameter_list
        ]
        self._index = {p.name: i for i, p in enumerate(self._parameter_list)}
        n = len(self._parameter_list)
        self._moment1: list[paddle.Tensor | None] = [None] * n
        self._moment2: list[paddle.Tensor | None] = [None] * n
        self._pows = np.ones((n, 2), dtype=np.float32)  # beta1^t, beta2^t of the next step
        self._grad_scale = 1.0

    # ------------------------------------------------------------------ learning rate
    def set_lr(self, value: float) -> None:
        self._learning_rate = float(value)

    def get_lr(self) -> float:
        return self._learning_rate

    # ------------------------------------------------------------------ step
    def _stepped(self) -> list[tuple[int, paddle.Tensor, paddle.Tensor]]:
        """(index, parameter, gradient) of the parameters the next step updates."""
        out = []
        for i, p in enumerate(self._parameter_list):
            if not p.stop_gradient:
                g = p.grad
                if g is not None:
                    out.append((i, p, g))
        return out

    def defer_grad_scale(self, params, factor: float) -> bool:
        """Multiply the gradients of `params` by `factor` inside the next step rather than now.
        Taken only when `params` are exactly the parameters that step updates (those with a
        gradient); returns whether it was taken (if not, the caller scales the gradients)."""
        mine = {id(p) for _, p, _ in self._stepped()}
        if {id(p) for p in params if p.grad is not None} != mine:
            return False
        self._grad_scale *= float(factor)
        return True

    def _create_state(self, i: int) -> None:
        p = self._parameter_list[i]
        self._moment1[i] = paddle.zeros_like(p)
        self._moment2[i] = paddle.zeros_like(p)
        self._pows[i] = self._betas

    @paddle.no_grad()
    def step(self) -> None:
        """One AdamW update of every trainable parameter that has a gradient."""
        stepped = self._stepped()
        if stepped:
            index = [i for i, _, _ in stepped]
            for i in index:
                if self._moment1[i] is None:
                    self._create_state(i)
            adamw_step(
                [p for _, p, _ in stepped],
                [g for _, _, g in stepped],
                [self._moment1[i] for i in index],
                [self._moment2[i] for i in index],
                self._pows[index, 0].tolist(),
                self._pows[index, 1].tolist(),
                [self._decay[i] for i in index],
                self._learning_rate,
                self._beta1,
                self._beta2,
                self._epsilon,
                self._weight_decay,
                self._grad_scale,
            )
            self._pows[index] *= self._betas
        self._grad_scale = 1.0

    def clear_grad(self, set_to_zero: bool = True) -> None:
        for p in self._parameter_list:
            if not p.stop_gradient:
                p.clear_gradient(set_to_zero)
        self._grad_scale = 1.0

    clear_gradients = clear_grad

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, paddle.Tensor]:
        """Paddle's AdamW state under its names: the moments (live tensors) and the beta powers
        ([1] float32 tensors) of every parameter that has stepped."""
        have = [(i, p) for i, p in enumerate(self._parameter_list) if self._moment1[i] is not None]
        out: dict[str, paddle.Tensor] = {}
        for i, p in have:
            out[f"{p.name}_moment1_0"] = self._moment1[i]
        for i, p in have:
            out[f"{p.name}_moment2_0"] = self._moment2[i]
        for col, kind in enumerate(("beta1_pow_acc", "beta2_pow_acc")):
            for i, p in have:
                out[f"{p.name}_{kind}_0"] = paddle.to_tensor(self._pows[i, col : col + 1].copy())
        return out

    def set_state_dict(self, state: dict) -> None:
        """Load a state written by this class or by paddle.optimizer.AdamW (tensors or arrays).
        Every entry must belong to one of the parameters; a parameter's four entries come
        together."""
        found: dict[int, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            match = _KEY.match(key)
            if match is None or match["param"] not in self._index:
                raise KeyError(f"optimizer state key {key!r} belongs to no parameter of this AdamW")
            array = value.numpy() if isinstance(value, paddle.Tensor) else np.asarray(value)
            found.setdefault(self._index[match["param"]], {})[match["kind"]] = array
        for i, entries in found.items():  # everything checked before anything is replaced
            p = self._parameter_list[i]
            missing = [k for k in _KINDS if k not in entries]
            if missing:
                raise KeyError(f"optimizer state of {p.name!r} lacks {', '.join(missing)}")
            for kind in ("moment1", "moment2"):
                if entries[kind].size != int(np.prod(p.shape)):
                    raise ValueError(
                        f"optimizer state {p.name}_{kind} has {entries[kind].size} values, the "
                        f"parameter {list(p.shape)}"
                    )
        for i, entries in found.items():
            p = self._parameter_list[i]
            for kind, moments in (("moment1", self._moment1), ("moment2", self._moment2)):
                array = entries[kind].astype(np.float32).reshape(list(p.shape))
                moments[i] = paddle.to_tensor(array, place=p.place)
            self._pows[i] = [
                np.float32(entries["beta1_pow_acc"].reshape(-1)[0]),
                np.float32(entries["beta2_pow_acc"].reshape(-1)[0]),
            ]

    load_state_dict = set_state_dict
