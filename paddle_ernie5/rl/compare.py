"""Side-by-side table of RL runs: held-out reward before/after per family, entropy, and the
training-side mismatch metrics (IcePop mask, routing mismatch, KL to the rollout policy).

    python -m paddle_ernie5.rl.compare runs/rl_tiny runs/rl_tiny_noreplay
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def _load(run_dir: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(run_dir, "rl_summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    return summary, steps


def table(run_dirs: list[str]) -> str:
    runs = [_load(d) for d in run_dirs]
    names = [f"replay {'on' if s['router_replay'] else 'off'}" for s, _ in runs]
    rows: list[tuple[str, list[str]]] = []
    families = sorted(runs[0][0]["before"])
    for family in families:
        for key, label in (
            ("reward", "reward"),
            ("greedy_accuracy", "greedy acc"),
            ("entropy", "entropy"),
        ):
            rows.append(
                (
                    f"{family} {label} before -> after",
                    [
                        f"{s['before'][family][key]:.3f} -> {s['after'][family][key]:.3f}"
                        for s, _ in runs
                    ],
                )
            )
        rows.append(
            (
                f"{family} entropy after / before",
                [
                    f"{s['after'][family]['entropy'] / s['before'][family]['entropy']:.2f}"
                    for s, _ in runs
                ],
            )
        )
    for key in (
        "reward/mean",
        "entropy",
        "icepop/masked_frac",
        "router/mismatch",
        "kl/rollout",
        "clip/low_frac",
        "clip/high_frac",
        "wpsm/damped_frac",
        "hint/query_frac",
        "perf/step_s",
    ):
        vals = []
        for _, steps in runs:
            xs = [r[key] for r in steps if key in r and r[key] == r[key]]
            vals.append(f"{np.mean(xs):.4f}" if xs else "n/a")
        rows.append((f"train mean {key}", vals))
    rows.append(("steps", [str(s["steps"]) for s, _ in runs]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    out = [" | ".join([" " * width] + [n.rjust(c) for n, c in zip(names, cols)])]
    out.append("-" * len(out[0]))
    out += [
        " | ".join([label.ljust(width)] + [v.rjust(c) for v, c in zip(vals, cols)])
        for label, vals in rows
    ]
    return "\n".join(out)


if __name__ == "__main__":
    print(table(sys.argv[1:]))
