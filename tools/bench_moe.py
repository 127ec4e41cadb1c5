"""MoE layer speed: grouped dispatch vs a dense SwiGLU of equal activated FLOPs vs a naive loop.

    python tools/bench_moe.py --tokens 8192 --experts 64 --top-k 4

All three run in this one process with the same threads; forward+backward time is the median of
--repeats runs after a warm-up. The dense baseline is a SwiGLU whose hidden width is top_k x the
expert width, i.e. the FLOPs of the routed experts with perfect balance; the MoE additionally pays for
routing, grouping and the padding of its grid to the busiest expert (reported as max/mean load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow per-expert loop")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())

    import warnings

    warnings.filterwarnings("ignore")
    import paddle

    from paddle_ernie5.config import MoEConfig
    from paddle_ernie5.model.experts import SwiGLU
    from paddle_ernie5.model.moe import MoE
    from paddle_ernie5.train.logging import load_balance

    paddle.seed(0)
    cfg = MoEConfig(num_experts=args.experts, top_k=args.top_k, expert_hidden=args.expert_hidden,
                    num_shared_experts=0)
    moe = MoE(args.hidden, cfg, init_std=0.02)
    dense = SwiGLU(args.hidden, args.top_k * args.expert_hidden, init_std=0.02)
    x = paddle.randn([1, args.tokens, args.hidden])
    x.stop_gradient = False
    _, stats = moe(x)
    _, max_mean = load_balance(stats.load_E.numpy())

    def fwd_bwd(fn):
        def run():
            out = fn(x)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
            x.clear_gradient()
            for p in list(moe.parameters()) + list(dense.parameters()):
                p.clear_gradient()
        return run

    def fwd(fn):
        def run():
            with paddle.no_grad():
                fn(x)
        return run

    def timed(run):
        run()
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples) * 1e3

    impls = [("MoE grouped (ours)", moe), ("dense SwiGLU, same activated FLOPs", dense)]
    if not args.skip_naive:
        impls.append(("MoE naive per-expert loop", moe.forward_reference))
    rows = [(name, timed(fwd(fn)), timed(fwd_bwd(fn))) for name, fn in impls]
    flops = 3 * 2 * args.tokens * args.hidden * args.top_k * args.expert_hidden  # forward
    base_fb = rows[1][2]
    print(f"tokens={args.tokens} hidden={args.hidden} experts={args.experts} top_k={args.top_k} "
          f"expert_hidden={args.expert_hidden} threads={os.environ['OMP_NUM_THREADS']} "
          f"paddle={paddle.__version__} max/mean expert load={max_mean:.2f}")
    print()
    print("| implementation | fwd ms | fwd+bwd ms | fwd+bwd / dense | fwd GFLOP/s (activated) |")
    print("|---|---:|---:|---:|---:|")
    for name, f, fb in rows:
        print(f"| {name} | {f:.1f} | {fb:.1f} | {fb / base_fb:.2f}x | {flops / f / 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
