"""Training throughput: tokens/s and MFU of the tiny recipes with every fused CPU op on vs off.

    python tools/bench_train_step.py [--recipe pretrain_tiny --recipe multimodal_tiny]
        [--steps 6] [--rounds 3] [--baseline-tree DIR] [--profile] [--threads N]

"fused" is the default configuration (model.fused_ops and train.fused_optimizer on: the C++ CPU
ops of custom_ops/fused, linear_ce and adamw); "reference" turns both off (pure-Paddle ops, Paddle's
AdamW). Both trainers live in this one process, start from the same seed and see the same batches;
they run in interleaved rounds (each round times --steps optimizer steps of every variant), and a
speed is the median over the rounds. The losses of the two variants at every timed step are
compared (largest relative difference printed).

MFU = model FLOP/s / the matmul peak measured in this process (Paddle float32 matmul 2048^3 with
the same threads; numpy's beside it). Model FLOPs per token = 3 x the forward's matrix products:
2 x every activated weight the token multiplies (backbone with top-k experts, text head, the MTP
block and its second text-head product) plus causal attention, 2 x 2 x H x D x (S + 1) / 2 per
layer. Element-wise work is not counted: MFU here measures how much of the step is useful matmul.

multimodal_tiny is measured with an untrained visual tokenizer and merger written to a temporary
directory (weights do not change the work of a step).

--baseline-tree DIR: also time pretrain_tiny with the code of another checkout (e.g. a git
worktree of an older commit, its custom ops built) in a subprocess, after the in-process rounds;
its trainer API must match (Trainer(cfg, log).train_step() returning "_tokens").

--profile: the ten operators with the largest total CPU time over 3 steps of each fused recipe
(paddle.profiler, forward and backward nodes listed separately).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "fused": ["model.fused_ops=true", "train.fused_optimizer=true"],
    "reference": ["model.fused_ops=false", "train.fused_optimizer=false"],
}


def model_flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token: 3 x the forward's matrix products (see the module docstring)."""
    from paddle_ernie5.model.params import count_params

    m, a = model_cfg.hidden_size, model_cfg.attention
    v = model_cfg.text_vocab
    forward = 2.0 * count_params(model_cfg)["activated"]
    layers = model_cfg.num_layers
    if model_cfg.num_mtp_modules:
        attn = m * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + a.num_heads * a.head_dim * m
        forward += 2.0 * (2 * m * m + attn + 3 * m * model_cfg.moe.dense_width() + v * m)
        layers += 1
    forward += layers * 4.0 * a.num_heads * a.head_dim * (seq_len + 1) / 2
    return 3.0 * forward


def matmul_peak(repeats: int = 5, n: int = 2048) -> dict[str, float]:
    """GFLOP/s of one float32 n^3 matmul: Paddle and numpy, median of `repeats`."""
    import numpy as np
    import paddle

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    pa = paddle.to_tensor(a)
    out = {}
    for name, fn in (("paddle", lambda: paddle.matmul(pa, pa).numpy()), ("numpy", lambda: a @ a)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 2.0 * n**3 / statistics.median(times) / 1e9
    return out


def _vision_overrides(tmp: str) -> list[str]:
    """An untrained visual tokenizer (the recipe's shape) saved under tmp; no pre-trained merger."""
    import paddle

    from paddle_ernie5.config import load_config
    from paddle_ernie5.tokenizers.visual import VisualTokenizer

    tok_cfg = load_config(os.path.join(ROOT, "recipes", "visual_tokenizer.yaml")).visual_tokenizer
    path = os.path.join(tmp, "visual_tokenizer")
    paddle.seed(0)
    tok = VisualTokenizer(tok_cfg)
    tok.eval()
    tok.save(path)
    return [
        f"model.vision.tokenizer_dir={path}",
        "model.vision.merger_init=",
        "model.vision.freeze_merger=[]",
        "model.vision.judge=",
    ]


def build_trainers(recipe: str, tmp: str, extra: list[str]):
    from paddle_ernie5.config import load_config
    from paddle_ernie5.train.trainer import Trainer

    path = os.path.join(ROOT, "recipes", f"{recipe}.yaml")
    trainers = {}
    for name, switches in VARIANTS.items():
        cfg = load_config(
            path,
            [
                f"train.run_dir={tmp}/{recipe}_{name}",
                f"data.cache_dir={tmp}/cache",
                "train.visualdl=false",
                "train.progress=false",
                *extra,
                *switches,
            ],
        )
        trainers[name] = Trainer(cfg, log=lambda *_: None)
    return trainers


def time_rounds(trainers: dict, steps: int, rounds: int) -> tuple[dict, float]:
    """Median tokens/s per variant over interleaved rounds, and the largest relative difference
    between the variants' losses at the same step."""
    speeds = {name: [] for name in trainers}
    losses = {name: [] for name in trainers}
    for t in trainers.values():  # warm-up: op loading, allocator, first-call caches
        for _ in range(2):
            t.train_step()
    for _ in range(rounds):
        for name, t in trainers.items():
            tokens = 0
            t0 = time.perf_counter()
            for _ in range(steps):
                metrics = t.train_step()
                tokens += metrics["_tokens"]
                losses[name].append(metrics["loss"])
            speeds[name].append(tokens / (time.perf_counter() - t0))
    first, *others = losses.values()
    worst = 0.0
    for other in others:
        for a, b in zip(first, other, strict=True):
            worst = max(worst, abs(a - b) / max(abs(b), 1e-12))
    return {name: statistics.median(s) for name, s in speeds.items()}, worst


def profile_top(trainer, count: int = 10) -> list[tuple[str, float, int]]:
    """(operator, total ms over 3 steps, calls), the `count` largest."""
    import paddle.profiler as profiler

    rows: dict[str, list] = {}
    prof = profiler.Profiler(
        targets=[profiler.ProfilerTarget.CPU], on_trace_ready=lambda _: None
    )  # no trace file
    prof.start()
    for _ in range(3):
        trainer.train_step()
        prof.step()
    prof.stop()
    tree = prof.profiler_result.get_data()
    for nodes in tree.values():
        stack = list(nodes.children_node) if hasattr(nodes, "children_node") else list(nodes)
        while stack:
            node = stack.pop()
            kind = str(node.type)
            if kind.endswith(("Operator", "OperatorInner")) or "GradNode" in node.name:
                entry = rows.setdefault(node.name, [0.0, 0])
                entry[0] += (node.end_ns - node.start_ns) / 1e6
                entry[1] += 1
            else:
                stack.extend(node.children_node)
    top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:count]
    return [(name, ms, calls) for name, (ms, calls) in top]


_BASELINE = r"""
import json, os, statistics, sys, time
from paddle_ernie5.config import load_config
from paddle_ernie5.train.trainer import Trainer
root, tmp, steps, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cfg = load_config(os.path.join(root, "recipes", "pretrain_tiny.yaml"),
                  [f"train.run_dir={tmp}/baseline", f"data.cache_dir={tmp}/cache_baseline",
                   "train.visualdl=false", "train.progress=false"])
t = Trainer(cfg, log=lambda *_: None)
for _ in range(2):
    t.train_step()
speeds = []
for _ in range(rounds):
    tokens, t0 = 0, time.perf_counter()
    for _ in range(steps):
        tokens += t.train_step()["_tokens"]
    speeds.append(tokens / (time.perf_counter() - t0))
print(json.dumps({"tokens_per_s": statistics.median(speeds)}))
"""


def run_baseline(tree: str, tmp: str, steps: int, rounds: int) -> float:
    from benchlib import run_in_tree

    return run_in_tree(tree, _BASELINE, tree, tmp, str(steps), str(rounds))["tokens_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", action="append", help="recipe name (default both tiny recipes)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-tree", help="another checkout to time pretrain_tiny with")
    ap.add_argument("--profile", action="store_true", help="top-10 operators of the fused path")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args()
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("bench_train_step: --steps and --rounds must be >= 1")
    if args.baseline_tree and not os.path.isfile(
        os.path.join(args.baseline_tree, "paddle_ernie5", "train", "trainer.py")
    ):
        raise SystemExit(f"--baseline-tree {args.baseline_tree}: not a paddle_ernie5 checkout")
    threads = args.threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import warnings

    warnings.filterwarnings("ignore")
    import paddle  # noqa: F401  (after OMP_NUM_THREADS)

    from paddle_ernie5.cpu import cpu_vendor

    recipes = args.recipe or ["pretrain_tiny", "multimodal_tiny"]
    peak = matmul_peak()
    print(
        f"CPU {cpu_vendor()}, {threads} threads; matmul 2048^3 float32: Paddle "
        f"{peak['paddle']:.1f} GFLOP/s, numpy {peak['numpy']:.1f} GFLOP/s"
    )
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in recipes:
            extra = _vision_overrides(tmp) if recipe == "multimodal_tiny" else []
            trainers = build_trainers(recipe, tmp, extra)
            speeds, worst = time_rounds(trainers, args.steps, args.rounds)
            cfg = trainers["fused"].cfg
            flops = model_flops_per_token(cfg.model, cfg.data.seq_len)
            for name, tok_s in speeds.items():
                mfu = tok_s * flops / (peak["paddle"] * 1e9)
                rows.append((recipe, name, tok_s, tok_s / speeds["reference"], mfu, worst))
            if args.profile:
                profiles[recipe] = profile_top(trainers["fused"])
            del trainers
        if args.baseline_tree:
            base = run_baseline(args.baseline_tree, tmp, args.steps, args.rounds)
            fused = next(r[2] for r in rows if r[0] == "pretrain_tiny" and r[1] == "fused")
            name = f"baseline {args.baseline_tree}"
            rows.append(("pretrain_tiny", name, base, base / fused, 0, 0))
    print()
    print("| recipe | ops | tokens/s | x reference | MFU (of Paddle's matmul peak) |")
    print("|---|---|---:|---:|---:|")
    for recipe, name, tok_s, ratio, mfu, _ in rows:
        if name.startswith("baseline"):
            print(f"| {recipe} | {name} | {tok_s:.0f} | fused = {1 / ratio:.2f} x baseline | |")
        else:
            print(f"| {recipe} | {name} | {tok_s:.0f} | {ratio:.2f} | {100 * mfu:.1f}% |")
    for recipe in recipes:
        worst = next(r[5] for r in rows if r[0] == recipe)
        print(f"{recipe}: largest relative loss difference fused vs reference: {worst:.2e}")
    for recipe, top in profiles.items():
        print(f"\n{recipe}, fused, top 10 operators over 3 steps:")
        print("| operator | ms | calls |")
        print("|---|---:|---:|")
        for name, ms, calls in top:
            print(f"| {name} | {ms:.1f} | {calls} |")
    return 0


if __name__ == "__main__":
    from paddle_ernie5.cpu import apply_mkl_fix  # before paddle loads (paddle_ernie5/cpu.py)

    print(apply_mkl_fix(), file=sys.stderr)
    sys.exit(main())
