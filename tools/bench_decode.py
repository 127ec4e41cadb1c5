"""Decode speed of `generate`: the fast loop (static KV cache, RoPE tables computed once, host-side
choice of the next token) beside the reference loop (`static_cache=False`), at several batch sizes.

    python tools/bench_decode.py                                   # pretrain_tiny, untrained
    python tools/bench_decode.py --checkpoint runs/pretrain_tiny --threads 1
    python tools/bench_decode.py --temperature 1.0 --top-k 20      # sampling instead of greedy

Both loops decode the same 16-token prompts in this one process with the same threads, in
interleaved rounds (each round runs both once, so load from other processes spreads over them); a
speed is the median over --repeats rounds after a warm-up, counting new tokens of all rows. Weights
do not change the amount of work, so an untrained model measures the recipe's shape. The table
gives tokens/s of each loop and their ratio, and whether the two loops chose the same tokens.

--baseline-tree DIR also times `generate` of another checkout (e.g. a git worktree of an older
commit, its custom ops built) in a subprocess after this process's rounds: same recipe, same seed
(so the same untrained weights), same prompts and threads; its column gives the fast loop's ratio to
it and whether its greedy tokens equal the fast loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchlib import load_eval_model, run_in_tree

# Run with PYTHONPATH=<baseline tree>: its generate() on the bench's prompts; prints JSON.
_BASELINE = r"""
import json, statistics, sys, time
import numpy as np, paddle
from paddle_ernie5.config import load_config
from paddle_ernie5.model.generation import generate
from paddle_ernie5.model.model import Ernie5Model
recipe, sets, batches, p, n, repeats = json.loads(sys.argv[1])
m = load_config(recipe, sets).model
paddle.seed(0)
model = Ernie5Model(m)
model.eval()
rng = np.random.default_rng(0)
out = {}
for b in batches:
    prompt = rng.integers(3, m.vocab_size, size=(b, p))
    generate(model, prompt, 4, temperature=0.0, seed=1)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = generate(model, prompt, n, temperature=0.0, seed=1).tokens
        times.append(time.perf_counter() - t0)
    out[b] = [b * n / statistics.median(times), tokens.tolist()]
print(json.dumps(out))
"""


def run_baseline(tree: str, args, batches: list[int]) -> dict[int, tuple[float, list]]:
    recipe = os.path.abspath(args.recipe)
    spec = json.dumps([recipe, args.set, batches, args.prompt, args.tokens, args.repeats])
    rows = run_in_tree(tree, _BASELINE, spec)
    return {int(b): (speed, tokens) for b, (speed, tokens) in rows.items()}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a run dir or checkpoint (trained weights)")
    src.add_argument("--recipe", default="recipes/pretrain_tiny.yaml", help="built untrained")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override"
    )
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1, 8, 32)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per decode")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--baseline-tree", help="another checkout whose generate() to time as well")
    args = ap.parse_args()
    if args.baseline_tree and (args.checkpoint or args.temperature > 0):
        raise SystemExit("--baseline-tree times greedy decoding of the untrained --recipe model")
    threads = args.threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from paddle_ernie5.cpu import cpu_model_name

    cpu = cpu_model_name() or "unknown CPU"
    print(f"cpu: {cpu} ({os.cpu_count()} logical cores); threads {threads}")

    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np

    from paddle_ernie5.model.generation import generate

    m, model = load_eval_model(args.checkpoint, args.recipe, args.set)
    print(
        f"model: hidden {m.hidden_size}, {m.num_layers} layers, {m.moe.num_experts} experts "
        f"top-{m.moe.top_k}, vocab {m.vocab_size}; prompt {args.prompt}, {args.tokens} new "
        f"tokens, temperature {args.temperature}, top-k {args.top_k}, median of {args.repeats}"
    )
    loops = {"reference": False, "fast": True}
    rng = np.random.default_rng(0)
    rows = []
    batches = args.batch or [1, 8, 32]
    for b in batches:
        prompt = rng.integers(3, m.vocab_size, size=(b, args.prompt))

        def run(static: bool, n: int, prompt=prompt):
            return generate(
                model,
                prompt,
                n,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=1,
                static_cache=static,
            )

        for static in loops.values():  # warm-up (op builds, allocator)
            run(static, 4)
        times = {name: [] for name in loops}
        outs = {}
        for _ in range(args.repeats):
            for name, static in loops.items():
                t0 = time.perf_counter()
                outs[name] = run(static, args.tokens)
                times[name].append(time.perf_counter() - t0)
        speed = {name: b * args.tokens / statistics.median(times[name]) for name in loops}
        same = np.array_equal(outs["reference"].tokens, outs["fast"].tokens)
        rows.append((b, speed["reference"], speed["fast"], same, outs["fast"].tokens))
    print(
        "\n| batch | reference tok/s | fast tok/s | fast / reference | same tokens |\n"
        "|---:|---:|---:|---:|---|"
    )
    for b, ref, fast, same, _ in rows:
        print(f"| {b} | {ref:.0f} | {fast:.0f} | {fast / ref:.2f}x | {'yes' if same else 'NO'} |")
    if args.baseline_tree:
        base = run_baseline(args.baseline_tree, args, batches)
        print(f"\nbaseline: generate() of {args.baseline_tree}, same prompts and threads")
        print("| batch | baseline tok/s | fast tok/s | fast / baseline | same tokens |")
        print("|---:|---:|---:|---:|---|")
        for b, _, fast, _, tokens in rows:
            speed, old_tokens = base[b]
            same = np.array_equal(np.asarray(old_tokens), tokens)
            mark = "yes" if same else "NO"
            print(f"| {b} | {speed:.0f} | {fast:.0f} | {fast / speed:.2f}x | {mark} |")
    return 0


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    sys.exit(main())
