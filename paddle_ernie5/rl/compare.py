"""Side-by-side table of RL runs (the RL report): held-out pass@1 (greedy), pass@k and sampled
reward per task before -> after, entropy, and the training-side mismatch metrics averaged over the
run's steps (rl/diagnostics.py: |log p_train - log p_rollout|, IcePop's masked share, tokens routed
unlike the rollout with the experts used and with the router's own choice).

    python -m paddle_ernie5.rl.compare runs/rl_tiny runs/rl_tiny_noreplay
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UserError
from .diagnostics import SUMMARISED, summarise_steps


def _load(run_dir: str) -> dict:
    path = os.path.join(run_dir, "rl_summary.json")
    if not os.path.isfile(path):
        raise UserError(
            f"{run_dir}: no rl_summary.json there; pass the run directories of finished "
            "`ernie5 train recipes/rl_tiny.yaml` runs"
        )
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path} is not a readable RL summary ({e}); re-run the RL evaluation"
        ) from e
    if "training" not in summary:  # a summary written before the mismatch metrics existed
        summary["training"] = summarise_steps(os.path.join(run_dir, "metrics.jsonl"))
    return summary


def run_label(summary: dict) -> str:
    parts = [f"replay {'on' if summary['router_replay'] else 'off'}"]
    off = summary.get("off_policy", {})
    if off.get("rollout_staleness"):
        parts.append(f"stale {off['rollout_staleness']}")
    if off.get("rollout_router_noise"):
        parts.append(f"noise {off['rollout_router_noise']:g}")
    if off.get("rollout_top_k"):
        parts.append(f"k {off['rollout_top_k']}")
    return ", ".join(parts)


def table(run_dirs: list[str]) -> str:
    runs = [_load(d) for d in run_dirs]
    names = [run_label(s) for s in runs]
    rows: list[tuple[str, list[str]]] = []
    tasks = list(runs[0]["after"])
    k_key = next(key for key in runs[0]["after"][tasks[0]] if key.startswith("pass@"))
    for task in tasks:
        for key, label in (
            ("greedy_accuracy", "pass@1 (greedy)"),
            (k_key, k_key),
            ("reward", "reward"),
        ):
            rows.append(
                (
                    f"{task} {label} before -> after",
                    [_before_after(s, task, key) for s in runs],
                )
            )
        rows.append(
            (
                f"{task} entropy after / before",
                [
                    f"{s['after'][task]['entropy'] / max(s['before'][task]['entropy'], 1e-9):.2f}"
                    if task in s["after"] and task in s["before"]
                    else "n/a"
                    for s in runs
                ],
            )
        )
    for key in SUMMARISED:
        stat = "max" if key == "mismatch/dlogp_max" else "mean"
        rows.append(
            (
                f"train {stat} {key}",
                [
                    f"{s['training'][key][stat]:.4f}" if key in s["training"] else "n/a"
                    for s in runs
                ],
            )
        )
    rows.append(("steps", [str(s["steps"]) for s in runs]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    out = [" | ".join([" " * width] + [n.rjust(c) for n, c in zip(names, cols)])]
    out.append("-" * len(out[0]))
    out += [
        " | ".join([label.ljust(width)] + [v.rjust(c) for v, c in zip(vals, cols)])
        for label, vals in rows
    ]
    return "\n".join(out)


def _before_after(summary: dict, task: str, key: str) -> str:
    before, after = summary["before"].get(task, {}), summary["after"].get(task, {})
    if key not in before or key not in after:
        return "n/a"
    return f"{before[key]:.3f} -> {after[key]:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="RL run directories (each with rl_summary.json)")
    args = ap.parse_args(argv)
    try:
        print(table(args.runs))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
