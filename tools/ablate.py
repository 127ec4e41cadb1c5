"""Stability ablation: the same recipe, seed and budget trained four ways, then one table.

    python tools/ablate.py --steps 200 --lr 0.01 --spike-at 100 --spike-factor 20 --spike-steps 3

Arms: baseline (global-norm clipping), adagc (train.clip.mode=adagc), simreg
(train.simreg.enabled) and both. `--lr` raises the learning rate and
`--spike-at/--spike-factor/--spike-steps` multiply it for a few steps, to provoke the loss spikes
the options are meant to prevent. The arms run one after another in this process; each writes its
own run directory under --out, and an arm whose run already reached --steps is read back instead of
retrained (so an interrupted ablation continues where it was).

Columns: validation loss at the last step; the first evaluation step at which an arm's validation
loss is at or below the baseline's final one; loss spikes, steps whose text loss exceeds 1.5x the
median of the previous --window steps; the highest text loss after the first --window steps; the
largest gradient norm before clipping; the mean share of tensors clipped per step (global clipping
scales every tensor at once, so there it is the share of steps clipped). Extra dotted overrides
after the options apply to every arm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ARMS = {
    "baseline": [],
    "adagc": ["train.clip.mode=adagc"],
    "simreg": ["train.simreg.enabled=true"],
    "both": ["train.clip.mode=adagc", "train.simreg.enabled=true"],
}


def spike_steps(losses: list[float], window: int, ratio: float = 1.5) -> list[int]:
    """Indices i whose loss exceeds `ratio` x the median of the (up to) `window` losses before
    it."""
    import numpy as np

    out = []
    for i in range(5, len(losses)):
        if losses[i] > ratio * float(np.median(losses[max(0, i - window) : i])):
            out.append(i)
    return out


def read_run(run_dir: str) -> tuple[dict[int, dict], dict[int, float]]:
    """(train metrics by step, validation loss by step); the last record of a step wins
    (resumes)."""
    train, val = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            if "loss" in m:
                train[m["step"]] = m
            if "val/loss" in m:
                val[m["step"]] = m["val/loss"]
    return train, val


def summarise(runs: dict[str, str], steps: int, window: int) -> list[dict]:
    data = {arm: read_run(d) for arm, d in runs.items()}
    base_final = data["baseline"][1][steps] if "baseline" in data else None
    rows = []
    for arm, (train, val) in data.items():
        ordered = [train[s] for s in sorted(train)]
        losses = [m["loss/text"] for m in ordered]
        reach = next(
            (s for s in sorted(val) if base_final is not None and val[s] <= base_final), None
        )
        spikes = spike_steps(losses, window)
        rows.append(
            {
                "arm": arm,
                "val_loss": val.get(steps),
                "steps_to_baseline": reach,
                "spikes": len(spikes),
                "spike_steps": [sorted(train)[i] for i in spikes],
                "peak_loss": max(losses[window:]),
                "max_grad_norm": max(m["train/grad_norm"] for m in ordered),
                "clipped": sum(m.get("clip/fraction_clipped", 0.0) for m in ordered) / len(ordered),
                "final_simreg": ordered[-1].get("loss/simreg"),
            }
        )
    return rows


def table(rows: list[dict], steps: int) -> str:
    lines = [
        "| arm | final val loss | steps to baseline's final val loss | loss spikes (steps) "
        "| peak text loss | max grad norm | mean share of tensors clipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = "not reached" if r["steps_to_baseline"] is None else str(r["steps_to_baseline"])
        where = f" ({', '.join(map(str, r['spike_steps']))})" if r["spike_steps"] else ""
        lines.append(
            f"| {r['arm']} | {r['val_loss']:.4f} | {reach} of {steps} | {r['spikes']}{where} "
            f"| {r['peak_loss']:.2f} | {r['max_grad_norm']:.2f} | {r['clipped']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipe", default="recipes/pretrain_tiny.yaml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.0, help="peak learning rate; 0 = the recipe's")
    ap.add_argument(
        "--spike-at", type=int, default=0, help="first step of an injected lr spike; 0 = none"
    )
    ap.add_argument("--spike-factor", type=float, default=20.0)
    ap.add_argument("--spike-steps", type=int, default=3)
    ap.add_argument(
        "--adagc-warmup",
        type=int,
        default=25,
        help="train.clip.warmup_steps of the AdaGC arms (the paper's 100 is for long runs)",
    )
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument(
        "--window", type=int, default=20, help="running-median window of the spike count"
    )
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("overrides", nargs="*", help="dotted overrides applied to every arm")
    args = ap.parse_args()
    arms = args.arms.split(",")
    if "baseline" not in arms or any(a not in ARMS for a in arms):
        ap.error(f"--arms must include baseline and name only {', '.join(ARMS)}")
    os.environ["OMP_NUM_THREADS"] = str(args.threads or os.cpu_count())
    import warnings

    warnings.filterwarnings("ignore")
    from paddle_ernie5 import config as C
    from paddle_ernie5.train.trainer import Trainer

    class SpikedTrainer(Trainer):
        def learning_rate_at(self, step: int) -> float:
            lr = super().learning_rate_at(step)
            if args.spike_at and args.spike_at <= step < args.spike_at + args.spike_steps:
                return lr * args.spike_factor
            return lr

    common = [
        f"train.max_steps={args.steps}",
        "train.log_every=1",
        f"train.eval_every={args.eval_every}",
        f"train.save_every={args.eval_every}",
        f"train.clip.warmup_steps={args.adagc_warmup}",
        "train.progress=false",
        "train.visualdl=false",
    ]
    if args.lr:
        common.append(f"train.lr={args.lr}")
    runs = {}
    for arm in arms:
        run_dir = os.path.join(args.out, arm)
        runs[arm] = run_dir
        cfg = C.load_config(
            args.recipe, [*common, *ARMS[arm], *args.overrides, f"train.run_dir={run_dir}"]
        )
        if (
            os.path.exists(os.path.join(run_dir, "metrics.jsonl"))
            and args.steps in read_run(run_dir)[1]
        ):
            print(f"{arm}: already trained, read back from {run_dir}", flush=True)
            continue
        print(f"{arm}: training {args.steps} steps into {run_dir}", flush=True)
        SpikedTrainer(cfg, log=lambda msg: print(f"  {msg}", flush=True)).fit()
    rows = summarise(runs, args.steps, args.window)
    text = table(rows, args.steps)
    print(text, end="")
    with open(os.path.join(args.out, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(f"command: python tools/ablate.py {' '.join(sys.argv[1:])}\n\n{text}")
    with open(os.path.join(args.out, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
