"""Output projection + cross-entropy: the chunked C++ op vs the reference (the full [T, V] logits by
one matmul, then Paddle's cross-entropy), speed and memory.

    python tools/bench_linear_ce.py                       # T=2048, M=128, V=2048 and V=32768
    python tools/bench_linear_ce.py --shapes 4096x256x8192 --layouts linear,tied

Both implementations run in this one process with the same threads, in interleaved rounds (each
round runs every implementation once, so load from other processes spreads over all of them); a
time is the median of --repeats rounds after a warm-up. The loss is the mean over the rows (as the
training loss), and fwd+bwd includes the gradients of h and of the weight. Memory is Paddle's host
allocator peak during one fwd+bwd above what was allocated before it (the inputs): the reference
holds [T, V] float32 tensors (logits, the softmax its cross-entropy saves, their gradient), the op
only tiles, per-row statistics, a transposed copy of the weight and its partial gradient buffers.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchlib import interleaved_median_ms


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", default="2048x128x2048,2048x128x32768", help="TxMxV,...")
    ap.add_argument("--layouts", default="linear,tied", help="linear ([M, V]) and/or tied ([V, M])")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # other processes only: this one has not started working yet
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())

    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import paddle
    from paddle.base import core

    from paddle_ernie5.ops.linear_ce import linear_cross_entropy, linear_cross_entropy_reference

    def fused(h, w, labels, transposed):
        return linear_cross_entropy(h, w, labels, transposed, fused=True)

    impls = [("reference", linear_cross_entropy_reference), ("op", fused)]

    def peak_bytes(run) -> int:
        base = core.host_memory_stat_current_value("Allocated", 0)
        core.host_memory_stat_reset_peak_value("Allocated", 0)
        run()
        return core.host_memory_stat_peak_value("Allocated", 0) - base

    print(
        f"threads={os.environ['OMP_NUM_THREADS']} paddle={paddle.__version__} "
        f"repeats={args.repeats} (median)"
    )
    rows = []
    for shape in args.shapes.split(","):
        t, m, v = (int(x) for x in shape.lower().split("x"))
        for layout in args.layouts.split(","):
            transposed = layout == "tied"
            rng = np.random.default_rng(0)
            h = paddle.to_tensor(rng.standard_normal((t, m)).astype(np.float32))
            shape_w = (v, m) if transposed else (m, v)
            w = paddle.to_tensor((rng.standard_normal(shape_w) / np.sqrt(m)).astype(np.float32))
            labels = paddle.to_tensor(rng.integers(0, v, t).astype(np.int64))
            h.stop_gradient = w.stop_gradient = False

            def fwd(fn, h=h, w=w, labels=labels, transposed=transposed):
                def forward_only():
                    with paddle.no_grad():
                        float(fn(h, w, labels, transposed).mean())

                return forward_only

            def fwd_bwd(fn, h=h, w=w, labels=labels, transposed=transposed):
                def forward_backward():
                    fn(h, w, labels, transposed).mean().backward()
                    h.clear_gradient(set_to_zero=False)
                    w.clear_gradient(set_to_zero=False)

                return forward_backward

            runs = [run for _, fn in impls for run in (fwd(fn), fwd_bwd(fn))]
            ms = interleaved_median_ms(runs, args.repeats)
            peaks = [peak_bytes(fwd_bwd(fn)) for _, fn in impls]
            rows.append((t, m, v, layout, ms, peaks))

    mib = 1 << 20
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) before the run: {load_before:.2f}, after: {load_after:.2f}")
    print()
    print(
        "| T x M x V | weight | [T, V] fp32 logits MiB | ref fwd ms | op fwd ms | fwd speed-up "
        "| ref fwd+bwd ms | op fwd+bwd ms | fwd+bwd speed-up | ref peak MiB | op peak MiB "
        "| memory ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t, m, v, layout, ms, peaks in rows:
        ref_f, ref_fb, op_f, op_fb = ms
        print(
            f"| {t} x {m} x {v} | {layout} | {t * v * 4 / mib:.1f} | {ref_f:.1f} | {op_f:.1f} "
            f"| {ref_f / op_f:.2f}x | {ref_fb:.1f} | {op_fb:.1f} | {ref_fb / op_fb:.2f}x "
            f"| {peaks[0] / mib:.1f} | {peaks[1] / mib:.1f} | {peaks[0] / max(peaks[1], 1):.1f}x |"
        )
    return 0


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    sys.exit(main())
