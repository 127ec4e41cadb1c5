"""Fused RMSNorm / RoPE / SwiGLU CPU ops vs their pure-Paddle references (ops/fused.py).

    python tools/bench_fused_ops.py                 # pretrain_tiny shapes, all cores
    python tools/bench_fused_ops.py --threads 1 --repeats 15

Shapes are those of recipes/pretrain_tiny.yaml (batch 8 x 256 tokens, width 128, 4 query and 2
key/value heads of 32, dense FFN 384, shared expert 128). Both paths run in this process with the
same threads, in interleaved rounds (each round times every case's fused and reference path once,
so load from other processes spreads over both); a time is the median of --repeats rounds after a
warm-up round, each round --inner calls. "fwd+bwd" is the forward and a backward from a fixed
random upstream gradient into every differentiable input.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _cases(paddle, fused):
    """name -> (fn(fused: bool) -> outputs, differentiable inputs, upstream gradients)."""
    paddle.seed(0)

    def leaf(shape, scale=1.0):
        t = paddle.randn(shape) * scale
        t.stop_gradient = False
        return t

    b, s, m, h, k, d = 8, 256, 128, 4, 2, 32
    x_rms, w_rms = leaf([b, s, m]), leaf([m])
    qkv = leaf([b, s, h + 2 * k, d])
    ang = paddle.randn([b, s, 1, d // 2]) * 3.0
    ang = paddle.concat([ang, ang], axis=-1)
    cos, sin = paddle.cos(ang), paddle.sin(ang)
    x_dense, x_shared = leaf([b, s, 2 * 384]), leaf([b * s, 2 * 128])

    def grads(*shapes):
        return [paddle.randn(sh) for sh in shapes]

    return {
        f"rms_norm [{b * s}, {m}]": (
            lambda f: [fused.rms_norm(x_rms, w_rms, 1e-6, fused=f)],
            [x_rms, w_rms],
            grads([b, s, m]),
        ),
        f"rope_qkv [{b}, {s}, {h}+2x{k}, {d}]": (
            lambda f: list(fused.rope_qkv(qkv, cos, sin, h, k, fused=f)),
            [qkv],
            grads([b, s, h, d], [b, s, k, d], [b, s, k, d]),
        ),
        f"swiglu [{b * s}, 2x384] (dense FFN)": (
            lambda f: [fused.swiglu(x_dense, fused=f)],
            [x_dense],
            grads([b, s, 384]),
        ),
        f"swiglu [{b * s}, 2x128] (shared expert)": (
            lambda f: [fused.swiglu(x_shared, fused=f)],
            [x_shared],
            grads([b * s, 128]),
        ),
    }


def _time(paddle, fn, inputs, dys, fused_flag: bool, backward: bool, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        if backward:
            outs = fn(fused_flag)
            paddle.autograd.backward(outs, dys)
            for t in inputs:
                t.clear_gradient(False)
        else:
            with paddle.no_grad():
                fn(fused_flag)
    return (time.perf_counter() - start) / inner * 1e3


def bench_cases(repeats: int = 9, inner: int = 20) -> list[tuple[str, float, float, float, float]]:
    """Time every case and print a markdown table; returns (case, fused fwd ms, reference fwd ms,
    fused fwd+bwd ms, reference fwd+bwd ms) per case. OMP_NUM_THREADS must be set before paddle
    is imported for the thread count to apply to Paddle's kernels too."""
    import paddle

    from paddle_ernie5.ops import fused

    paddle.set_device("cpu")
    cases = _cases(paddle, fused)
    kinds = [(f, bwd) for bwd in (False, True) for f in (True, False)]
    times = {(name, kind): [] for name in cases for kind in kinds}
    for rnd in range(repeats + 1):
        for name, (fn, inputs, dys) in cases.items():
            for kind in kinds:
                ms = _time(paddle, fn, inputs, dys, kind[0], kind[1], inner)
                if rnd > 0:  # round 0 warms up (and builds the op library if needed)
                    times[(name, kind)].append(ms)
    rows = []
    print(
        f"threads={os.environ.get('OMP_NUM_THREADS', '1')}, median of {repeats} rounds x {inner} "
        "calls, fp32\n"
    )
    print(
        "| case | fused fwd ms | ref fwd ms | fused/ref fwd | fused fwd+bwd ms | ref fwd+bwd ms "
        "| fused/ref fwd+bwd |"
    )
    print("|---" * 7 + "|")
    for name in cases:
        ff, rf, fb, rb = (statistics.median(times[(name, kind)]) for kind in kinds)
        rows.append((name, ff, rf, fb, rb))
        cells = [
            f"{ff:.3f}",
            f"{rf:.3f}",
            f"{ff / rf:.2f}",
            f"{fb:.3f}",
            f"{rb:.3f}",
            f"{fb / rb:.2f}",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--inner", type=int, default=20, help="calls per timed round")
    args = ap.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())
    import warnings

    warnings.filterwarnings("ignore")
    bench_cases(args.repeats, args.inner)
    return 0


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    sys.exit(main())
