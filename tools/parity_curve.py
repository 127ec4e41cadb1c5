"""Loss curves of the fused path against the pure-Paddle reference, step by step, and where they
part: the table of docs/results.md section 10.

    python tools/parity_curve.py --recipe recipes/pretrain_tiny.yaml --steps 50 --seeds 1 2 3

Per seed, each arm trains the recipe for --steps optimizer steps from the same seed, one arm after
another in this process:

    reference  model.fused_ops=false train.fused_optimizer=false
    fused      the defaults (every fused CPU op on)
    control    the reference with two pure-Paddle reformulations that are identical in exact
               arithmetic (x*x for pow in RMSNorm, silu(a)*b for Paddle's swiglu kernel)
    dense      fused vs reference with every layer dense (model.moe.first_dense_layers=num_layers)
    nobias     fused vs reference with the aux-free bias update off (bias_update_rate=0)

and the table gives the largest relative loss difference to its reference, the first step above
1e-4 and, for MoE arms, the first step at which any layer's expert loads differ from the
reference's (before that step both runs route every token alike).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

ARMS = ("fused", "control", "dense", "nobias")


@contextlib.contextmanager
def _pure_paddle_control():
    import paddle
    from paddle.nn import functional as F

    from paddle_ernie5.ops import fused

    def rms_norm_xx(x, weight, eps):
        x32 = x.astype("float32")
        y = x32 * paddle.rsqrt((x32 * x32).mean(axis=-1, keepdim=True) + eps)
        return y.astype(x.dtype) * weight

    def swiglu_split(x):
        a, b = x.chunk(2, axis=-1)
        return F.silu(a) * b

    saved = fused.rms_norm_reference, fused.swiglu_reference
    fused.rms_norm_reference, fused.swiglu_reference = rms_norm_xx, swiglu_split
    try:
        yield
    finally:
        fused.rms_norm_reference, fused.swiglu_reference = saved


def _curve(recipe: str, steps: int, overrides: list[str], run_dir: str):
    """(text loss per step, expert loads per step) of one training run."""
    import numpy as np

    from paddle_ernie5.config import load_config
    from paddle_ernie5.train.trainer import Trainer

    cfg = load_config(
        recipe,
        [
            f"train.max_steps={steps}",
            "train.visualdl=false",
            f"train.run_dir={run_dir}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, log=lambda *_: None)
    losses, loads = [], []
    for _ in range(steps):
        losses.append(trainer.train_step()["loss/text"])
        loads.append({i: np.asarray(v).copy() for i, v in trainer._last_loads.items()})
    return np.array(losses), loads


def _compare(curve, ref, tol: float = 1e-4) -> tuple[str, str, str]:
    import numpy as np

    (a, la), (b, lb) = curve, ref
    rel = np.abs(a - b) / np.abs(b)
    over = next((i + 1 for i, v in enumerate(rel) if v > tol), None)
    routed = next(
        (
            i + 1
            for i, (x, y) in enumerate(zip(la, lb))
            if x.keys() != y.keys() or any(not np.array_equal(x[k], y[k]) for k in x)
        ),
        None,
    )
    has_moe = bool(la[0])
    return (
        f"{rel.max():.1e}",
        str(over) if over else f"none in {len(a)}",
        (str(routed) if routed else f"none in {len(a)}") if has_moe else "(dense)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="recipes/pretrain_tiny.yaml")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (train.threads)")
    ap.add_argument("--run-dir", default="/tmp/parity_curve", help="scratch run directories")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())
    import warnings

    warnings.filterwarnings("ignore")
    from paddle_ernie5.config import load_config

    layers = load_config(args.recipe).model.num_layers
    ref_off = ["model.fused_ops=false", "train.fused_optimizer=false"]
    variants = {
        "fused": ([], ref_off, False),
        "control": (ref_off, ref_off, True),
        "dense": ([f"model.moe.first_dense_layers={layers}"], None, False),
        "nobias": (["model.moe.bias_update_rate=0"], None, False),
    }
    rows = []
    for seed in args.seeds:
        base = [f"train.seed={seed}", f"train.threads={args.threads}"]
        refs = {}
        for arm in args.arms:
            extra, ref_extra, control = variants[arm]
            ref_key = tuple(ref_extra if ref_extra is not None else extra + ref_off)
            if ref_key not in refs:
                scratch = f"{args.run_dir}/s{seed}_ref{len(refs)}"
                refs[ref_key] = _curve(args.recipe, args.steps, base + list(ref_key), scratch)
            with _pure_paddle_control() if control else contextlib.nullcontext():
                scratch = f"{args.run_dir}/s{seed}_{arm}"
                curve = _curve(args.recipe, args.steps, base + extra, scratch)
            rows.append((seed, arm, *_compare(curve, refs[ref_key])))
            print(f"seed {seed} {arm}: done", file=sys.stderr, flush=True)
    print(f"\n{args.recipe}, {args.steps} steps, threads={args.threads}\n")
    print("| seed | arm | largest rel. difference | first step > 1e-4 | routing first differs |")
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
