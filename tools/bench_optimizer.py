"""Optimizer step + global-norm clip over a recipe's parameters: the fused AdamW (one C++ call for
the sums of squares, one for the step, the clip factor applied inside it) vs paddle.optimizer.AdamW
with the clip as Paddle ops (train.fused_optimizer=false: float64 squares and sums), and vs Paddle's
AdamW with the clip this project used before the fused optimizer (float32 `g ** 2` per tensor,
Paddle's slow CPU pow).

    python tools/bench_optimizer.py --recipe recipes/pretrain_tiny.yaml --repeats 15

The model is built from the recipe, and every parameter gets random gradients (fixed seed). Both
optimizers run in this one process with the same threads, in interleaved rounds (each round runs
each once, so load from other processes spreads over both); a time is the median over --repeats
rounds after two warm-up rounds. Every round clips (the threshold is below the gradients' norm),
so all pay for scaling. Rows: the clip (norm + scaling) alone, the step alone, and both; ratios are
against the fused optimizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="recipes/pretrain_tiny.yaml")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())

    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import paddle

    from paddle_ernie5.config import load_config
    from paddle_ernie5.model.model import Ernie5Model
    from paddle_ernie5.optim.optimizer import build_optimizer, clip_by_global_norm

    cfg = load_config(args.recipe, [])

    @paddle.no_grad()
    def clip_float32_pow(params, max_norm: float) -> float:
        squares = [paddle.sum(p.grad.astype("float32") ** 2) for p in params if p.grad is not None]
        norm = float(paddle.sqrt(paddle.add_n(squares)))
        if norm > max_norm:
            for p in params:
                p.grad.scale_(max_norm / (norm + 1e-6))
        return norm

    variants = {  # name: (fused optimizer, clip)
        "before": (False, lambda params, opt: clip_float32_pow(params, 1.0)),
        "paddle": (False, lambda params, opt: clip_by_global_norm(params, 1.0, opt)),
        "fused": (True, lambda params, opt: clip_by_global_norm(params, 1.0, opt)),
    }
    runs = {}
    for name, (fused, clip) in variants.items():
        paddle.seed(cfg.train.seed)
        model = Ernie5Model(cfg.model)
        opt = build_optimizer(model, dataclasses.replace(cfg.train, fused_optimizer=fused))
        runs[name] = (model, opt, clip)
    params = runs["fused"][0].parameters()
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(p.shape).astype(np.float32) for p in params]

    def one_round(model, opt, clip) -> tuple[float, float]:
        # Fresh gradients each round (the unfused clips scale them in place).
        for p, g in zip(model.parameters(), grads):
            p._set_grad_ivar(paddle.to_tensor(g))
        t0 = time.perf_counter()
        clip(model.parameters(), opt)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        opt.clear_grad(set_to_zero=False)
        return t1 - t0, t2 - t1

    times = {name: [] for name in runs}
    for r in range(args.repeats + 2):
        for name, run in runs.items():
            clip_s, step_s = one_round(*run)
            if r >= 2:
                times[name].append((clip_s, step_s, clip_s + step_s))

    def med(name: str, k: int) -> float:
        return statistics.median(t[k] for t in times[name]) * 1e3

    numel = sum(int(np.prod(p.shape)) for p in params)
    print(
        f"{cfg.name}: {len(params)} parameter tensors, {numel / 1e6:.2f}M values; "
        f"{os.environ['OMP_NUM_THREADS']} threads; median of {args.repeats} rounds"
    )
    print("before: Paddle's AdamW + float32 pow clip; paddle: Paddle's AdamW + float64 clip")
    print(
        f"{'part':<13}{'before ms':>11}{'paddle ms':>11}{'fused ms':>10}"
        f"{'before/fused':>14}{'paddle/fused':>14}"
    )
    for k, part in enumerate(("clip", "step", "clip + step")):
        before, base, fast = med("before", k), med("paddle", k), med("fused", k)
        print(
            f"{part:<13}{before:>11.2f}{base:>11.2f}{fast:>10.2f}"
            f"{before / fast:>13.1f}x{base / fast:>13.1f}x"
        )
    return 0


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    sys.exit(main())
