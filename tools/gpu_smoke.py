"""GPU smoke test: trains recipes/debug.yaml for 20 steps in bf16 with Paddle's FlashMask kernel on
1 GPU, and with data, expert and pipeline parallelism where the GPUs allow; prints one row per
feature.

    python tools/gpu_smoke.py                 # every visible GPU
    python tools/gpu_smoke.py --gpus 2 --out runs/gpu_smoke

Needs a CUDA build of Paddle 3.x (paddle.nn.functional.flashmask_attention) and at least one GPU
that computes in bfloat16; on a CPU build it exits with code 2. Each run is its own `ernie5 train`
process (tools/train.py); runs on more than one GPU go through
`python -m paddle.distributed.launch`.

    feature                    run                                            passes when
    FlashMask kernel           in this process: Paddle's kernel vs the dense  forward and input
                               reference, bf16, packed causal documents       gradients agree
    bf16 + FlashMask, 1 GPU    train.precision=bf16, attention backend paddle the log says bf16 on
    fp16 + GradScaler, 1 GPU   train.precision=fp16                           the GPU; 20 finite
    data parallel              parallel.dp=N                                  losses, the last
    expert parallel            parallel.ep=2 (dp=N/2), even N                 below the first
    pipeline parallel          parallel.pp=2 (dp=N/2), even N

Exit code 0 when nothing failed (skips allowed), 1 otherwise. Written against Paddle's documented
API; not run on the project's CPU-only machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")
RECIPE = os.path.join(ROOT, "recipes", "debug.yaml")
NEEDS_GPU = 2


def flashmask_kernel_check() -> tuple[str, str]:
    """Paddle's flashmask_attention against the dense reference on one GPU, in bfloat16."""
    import numpy as np
    import paddle

    from paddle_ernie5.ops import masks
    from paddle_ernie5.ops.flashmask import flashmask_attention

    rng = np.random.default_rng(0)
    b, s, h, hk, d = 2, 256, 4, 2, 64
    arrays = [
        rng.standard_normal(shape).astype(np.float32)
        for shape in [(b, s, h, d)] + [(b, s, hk, d)] * 2
    ]
    idx = paddle.to_tensor(masks.batched(masks.causal_document([100, 80, 76]), b))
    dout = paddle.to_tensor(rng.standard_normal((b, s, h, d)).astype(np.float32)).astype("bfloat16")
    results = {}
    for backend in ("paddle", "reference"):
        qkv = [paddle.to_tensor(a).astype("bfloat16") for a in arrays]
        for t in qkv:
            t.stop_gradient = False
        out = flashmask_attention(*qkv, idx, causal=True, backend=backend)
        grads = paddle.grad([out], qkv, grad_outputs=[dout])
        results[backend] = [t.astype("float32").numpy() for t in (out, *grads)]
    # Largest difference relative to each tensor's largest value (out, dq, dk, dv); bfloat16
    # carries 8 significant bits, so both sides round at about 0.4%.
    worst = max(
        float(np.abs(g - w).max() / (np.abs(w).max() + 1e-6))
        for g, w in zip(results["paddle"], results["reference"])
    )
    ok = worst <= 2e-2 and all(np.isfinite(g).all() for g in results["paddle"])
    return ("PASS" if ok else "FAIL"), f"out, dq, dk, dv within {worst:.2%} of the reference"


def training_check(name, gpus, overrides, expect, out, steps) -> tuple[str, str]:
    """One `ernie5 train` of the debug recipe on `gpus` GPUs; checks the log and the losses."""
    run_dir = os.path.join(out, name)
    log_dir = run_dir + "_log"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    batch = gpus * max(1, -(-4 // gpus))  # the global batch: a multiple of the data ranks
    args = [
        RECIPE,
        f"train.run_dir={run_dir}",
        f"data.cache_dir={os.path.join(out, 'cache')}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        f"train.eval_every={steps}",
        f"train.save_every={steps}",
        "train.visualdl=false",
        "train.precision=bf16",
        "model.attention.backend=paddle",
        *overrides,
    ]
    if gpus == 1:
        cmd = [sys.executable, TRAIN, *args]
    else:
        devices = ",".join(str(i) for i in range(gpus))
        launch = ["-m", "paddle.distributed.launch", "--devices", devices, "--log_dir", log_dir]
        cmd = [sys.executable, *launch, TRAIN, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "FAIL", "no result after 30 minutes"
    text = proc.stdout + proc.stderr
    rank0 = os.path.join(log_dir, "workerlog.0")
    if gpus > 1 and os.path.exists(rank0):
        with open(rank0, encoding="utf-8", errors="replace") as f:
            text += f.read()
    if proc.returncode != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        return "FAIL", f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
    said = [line for line in text.splitlines() if line.startswith("precision:")]
    if not said or expect not in said[0]:
        return "FAIL", f"expected a log line with {expect!r}, got {said[:1]}"
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        return "FAIL", f"{len(losses)} logged losses, finite: {all(map(math.isfinite, losses))}"
    if losses[-1] >= losses[0]:
        return "FAIL", f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
    return "PASS", f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=0, help="GPUs to use (0 = every visible one)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_smoke"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*ccache.*")
    import paddle

    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        print(
            f"gpu_smoke needs a GPU build of Paddle and a visible GPU; this is Paddle "
            f"{paddle.__version__} with CUDA {'yes' if paddle.is_compiled_with_cuda() else 'no'} "
            "(install paddlepaddle-gpu 3.x from Paddle's package index, see README 'GPU users')",
            file=sys.stderr,
        )
        return NEEDS_GPU
    n = args.gpus or paddle.device.cuda.device_count()
    os.makedirs(args.out, exist_ok=True)
    bf16 = "precision: bf16 (GPU"
    half = n // 2
    runs = [
        ("bf16 + FlashMask, 1 GPU", "bf16_1gpu", 1, [], bf16),
        ("fp16 + GradScaler, 1 GPU", "fp16_1gpu", 1, ["train.precision=fp16"], "precision: fp16"),
        ("data parallel", "dp", n, [f"parallel.dp={n}"], bf16),
        ("expert parallel", "ep", n, ["parallel.ep=2", f"parallel.dp={half}"], bf16),
        ("pipeline parallel", "pp", n, ["parallel.pp=2", f"parallel.dp={half}"], bf16),
    ]
    rows = []
    try:
        rows.append(("FlashMask kernel", *flashmask_kernel_check()))
    except Exception as e:  # a smoke test reports every feature, whatever one of them raises
        rows.append(("FlashMask kernel", "FAIL", f"{type(e).__name__}: {e}"))
    for feature, name, gpus, overrides, expect in runs:
        if gpus > 1 and n < 2:
            rows.append((feature, "SKIP", "needs 2 GPUs"))
        elif name in ("ep", "pp") and n % 2:
            rows.append((feature, "SKIP", f"needs an even number of GPUs, got {n}"))
        else:
            rows.append(
                (feature, *training_check(name, gpus, overrides, expect, args.out, args.steps))
            )
    width = max(len(r[0]) for r in rows)
    print(f"| {'feature'.ljust(width)} | result | detail")
    print(f"|-{'-' * width}-|--------|-------")
    for feature, result, detail in rows:
        print(f"| {feature.ljust(width)} | {result.ljust(6)} | {detail}")
    return 1 if any(r[1] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
