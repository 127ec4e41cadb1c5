"""MoE layer speed: the routed-experts C++ op vs grouped batched matmuls vs a dense SwiGLU of equal
activated FLOPs vs a naive loop over experts.

    python tools/bench_moe.py --tokens 8192 --experts 64 --top-k 4

Everything runs in this one process with the same threads, in interleaved rounds (each round runs
every implementation once, so load from other processes spreads over all of them); a time is the
median of --repeats rounds after a warm-up. The dense baseline is a SwiGLU whose hidden width is
top_k x the expert width, i.e. the FLOPs of the routed experts with perfect balance; the MoE layers
additionally pay for routing and grouping, and the grouped one for padding its grid to the busiest
expert (reported as max/mean load). A second baseline computes the same dense SwiGLU with the op's
own kernels (one expert, top-1, weight 1), so that its ratio shows the cost of routing, grouping and
imbalance apart from how fast Paddle's matmul is on this CPU. The last two rows split the op's MoE
layer into its parts: the router alone, and the expert op alone on a fixed routing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from benchlib import interleaved_median_ms


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--expert-hidden", type=int, default=128)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--skip-naive", action="store_true", help="skip the slow per-expert loop")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]  # other processes only: this one has not started working yet
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())

    import warnings

    warnings.filterwarnings("ignore")
    import paddle

    from paddle_ernie5.config import MoEConfig
    from paddle_ernie5.model.experts import SwiGLU
    from paddle_ernie5.model.moe import MoE
    from paddle_ernie5.model.view import FULL_VIEW
    from paddle_ernie5.ops.moe_experts import moe_experts
    from paddle_ernie5.train.logging import load_balance

    paddle.seed(0)
    cfg = MoEConfig(
        num_experts=args.experts,
        top_k=args.top_k,
        expert_hidden=args.expert_hidden,
        num_shared_experts=0,
        expert_backend="cpu_op",
    )
    moe_op = MoE(args.hidden, cfg, init_std=0.02)
    moe_grouped = MoE(
        args.hidden, dataclasses.replace(cfg, expert_backend="grouped"), init_std=0.02
    )
    moe_grouped.set_state_dict(moe_op.state_dict())
    dense = SwiGLU(args.hidden, args.top_k * args.expert_hidden, init_std=0.02)
    x = paddle.randn([1, args.tokens, args.hidden])
    x.stop_gradient = False
    x_TM = x.reshape([args.tokens, args.hidden])
    _, stats = moe_op(x)
    _, max_mean = load_balance(stats.load_E.numpy())
    with paddle.no_grad():
        fixed = moe_op.route(x_TM.detach(), 1, FULL_VIEW)
    weights_TK = fixed.topk_weights_TK.detach()
    weights_TK.stop_gradient = False

    # The dense SwiGLU again, computed by the op's own kernels: one expert of width top_k x expert
    # width that every token uses with weight 1. Against it the op's MoE pays only for routing,
    # grouping and load imbalance, whatever the speed of Paddle's matmul on this CPU.
    dense_gate_up = dense.gate_up.weight.detach().unsqueeze(0)  # [1, M, 2F]: gate, then up
    dense_down = dense.down.weight.detach().unsqueeze(0)
    for p in (dense_gate_up, dense_down):
        p.stop_gradient = False
    ones_T1 = paddle.ones([args.tokens, 1])
    zeros_T1 = paddle.zeros([args.tokens, 1], dtype="int64")

    def dense_on_op(inp):
        return moe_experts(
            inp.reshape([args.tokens, args.hidden]),
            dense_gate_up,
            dense_down,
            zeros_T1,
            ones_T1,
            backend="cpu_op",
        )

    params = (
        list(moe_op.parameters())
        + list(moe_grouped.parameters())
        + list(dense.parameters())
        + [weights_TK, dense_gate_up, dense_down]
    )

    def router_only(inp):
        return moe_op.route(inp.reshape([args.tokens, args.hidden]), 1, FULL_VIEW).topk_weights_TK

    def op_only(inp):
        return moe_experts(
            inp.reshape([args.tokens, args.hidden]),
            moe_op.experts.w_gate_up,
            moe_op.experts.w_down,
            fixed.topk_ids_TK,
            weights_TK,
            backend="cpu_op",
        )

    def fwd_bwd(fn):
        def run():
            out = fn(x)
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()
            x.clear_gradient()
            for p in params:
                p.clear_gradient()

        return run

    def fwd(fn):
        def run():
            with paddle.no_grad():
                fn(x)

        return run

    impls = [
        ("MoE, C++ routed-experts op", moe_op),
        ("MoE, grouped batched matmuls", moe_grouped),
        ("dense SwiGLU, same activated FLOPs", dense),
        ("dense SwiGLU on the op's kernels (E=1, K=1)", dense_on_op),
    ]
    if not args.skip_naive:
        impls.append(("MoE, naive per-expert loop", moe_op.forward_reference))
    impls += [("  part: router alone", router_only), ("  part: expert op alone", op_only)]
    runs = [run for _, fn in impls for run in (fwd(fn), fwd_bwd(fn))]
    ms = interleaved_median_ms(runs, args.repeats)
    rows = [(name, ms[2 * i], ms[2 * i + 1]) for i, (name, _) in enumerate(impls)]
    flops = 3 * 2 * args.tokens * args.hidden * args.top_k * args.expert_hidden  # forward
    base_fb, base_op_fb = rows[2][2], rows[3][2]
    print(
        f"tokens={args.tokens} hidden={args.hidden} experts={args.experts} top_k={args.top_k} "
        f"expert_hidden={args.expert_hidden} threads={os.environ['OMP_NUM_THREADS']} "
        f"paddle={paddle.__version__} max/mean expert load={max_mean:.2f}"
    )
    print(
        f"load average (1 min) before the run: {load_before:.2f}, after: {os.getloadavg()[0]:.2f}"
    )
    print()
    print(
        "| implementation | fwd ms | fwd+bwd ms | fwd+bwd / dense | fwd+bwd / dense on op "
        "| fwd GFLOP/s (activated) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, f, fb in rows:
        gflops = f"{flops / f / 1e6:.0f}" if not name.startswith("  part: router") else "-"
        print(
            f"| {name} | {f:.1f} | {fb:.1f} | {fb / base_fb:.2f}x | {fb / base_op_fb:.2f}x "
            f"| {gflops} |"
        )
    return 0


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    sys.exit(main())
