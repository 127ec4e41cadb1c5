"""Decode speed of elastic top-k views: greedy KV-cached decoding of one model in the full view and
with a smaller top-k (and, optionally, fewer layers and experts), at several batch sizes.

    python tools/bench_elastic_decode.py --checkpoint runs/pretrain_tiny          # a trained model
    python tools/bench_elastic_decode.py --recipe recipes/pretrain_tiny.yaml \\
        --set model.hidden_size=512 --set model.moe.expert_hidden=512 --set model.moe.top_k=8 ...

Every view decodes the same prompts in this one process with the same threads, in interleaved rounds
(each round runs every view once, so load from other processes spreads over all of them); a speed is
the median over --repeats rounds after a warm-up. Weights do not change the amount of work, so a
recipe shape can be measured untrained. The table gives tokens/s and the ratio to the full view, and
the share of the full view's activated parameters that are routed experts: the part of the per-token
work that top-k scales.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchlib import load_eval_model


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a run dir or checkpoint (trained weights)")
    src.add_argument("--recipe", help="a recipe whose model is built untrained (see --set)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override"
    )
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 16)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per decode")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--top-k", type=int, action="append", help="top-k views (default k/2 and k/4)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())

    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np

    from paddle_ernie5.model.generation import generate
    from paddle_ernie5.model.params import count_params
    from paddle_ernie5.model.view import FULL_VIEW, ElasticView

    model_cfg, model = load_eval_model(args.checkpoint, args.recipe, args.set)
    k = model_cfg.moe.top_k
    ks = args.top_k or sorted({max(1, k // 2), max(1, k // 4)}, reverse=True)
    views = {
        f"full (k={k})": FULL_VIEW,
        **{f"top-k {100 * j // k}% (k={j})": ElasticView(top_k=j) for j in ks if j < k},
    }
    counts = count_params(model_cfg)
    m = model_cfg
    routed = (m.num_layers - m.moe.first_dense_layers) * k * 3 * m.hidden_size * m.moe.expert_hidden
    print(
        f"model: hidden {m.hidden_size}, {m.num_layers} layers, {m.moe.num_experts} experts x "
        f"{m.moe.expert_hidden}, top-k {k}; {counts['total'] / 1e6:.2f}M total, "
        f"{counts['activated'] / 1e6:.2f}M activated per token, of which routed experts "
        f"{routed / counts['activated']:.0%}; threads {os.environ['OMP_NUM_THREADS']}"
    )
    rng = np.random.default_rng(0)
    rows = []
    for b in args.batch or [1, 16]:
        prompt = rng.integers(3, m.vocab_size, size=(b, args.prompt))
        for view in views.values():  # warm-up
            generate(model, prompt, 4, temperature=0.0, view=view)
        times = {name: [] for name in views}
        for _ in range(args.repeats):
            for name, view in views.items():
                t0 = time.perf_counter()
                generate(model, prompt, args.tokens, temperature=0.0, view=view)
                times[name].append(time.perf_counter() - t0)
        full = None
        for name in views:
            speed = b * args.tokens / statistics.median(times[name])
            full = full or speed
            rows.append((b, name, speed, speed / full))
    print("\n| batch | view | decode tok/s | speed / full |\n|---:|---|---:|---:|")
    for b, name, speed, ratio in rows:
        print(f"| {b} | {name} | {speed:.0f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    sys.exit(main())
