"""Matched comparison of two groups of evaluated runs (each run's eval.json from `ernie5 eval`).

    python -m paddle_ernie5.eval.compare --baseline runs/mm600n runs/mm600n_s1 \
        --candidate runs/omni600c runs/omni600c_s1 --bound 0.10

Runs pair up in order: the same seed in both groups (checked against each run's config.yaml). One
Markdown row per metric: each pair as candidate / baseline, then the means over the pairs, the
relative change of the means with the standard error of the mean paired difference beside it, and
whether the candidate's mean is worse than the baseline's by more than --bound (lower is better for
perplexity, higher for the rest). Metrics only the candidate has (e.g. speech with audio added)
show its mean. A single pair of a noisy metric (one greedy image per held-out caption) can move by
tens of percent between seeds, so the bound is checked on the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ..errors import UserError

# (key, label, higher is better)
METRICS = (
    ("text/ppl", "text perplexity (validation)", False),
    ("vision/image_qa", "image QA (digit / colour / background)", True),
    ("vision/video_qa_direction", "video direction QA", True),
    ("vision/video_qa_speed", "video speed QA", True),
    ("vision/t2i_all", "text->image judged, all three right (greedy)", True),
    ("vision/t2i_fg", "text->image judged: digit colour (greedy)", True),
    ("vision/t2i_bg", "text->image judged: background (greedy)", True),
    ("vision/t2i_sampled_all", "text->image judged, all three right (sampled)", True),
    ("vision/t2i_sampled_fg", "text->image judged: digit colour (sampled)", True),
    ("vision/t2i_sampled_bg", "text->image judged: background (sampled)", True),
    ("vision/t2i_caption_nats", "caption information (nats per bit)", True),
    ("audio/asr_word_acc", "ASR word accuracy", True),
    ("audio/tts_judge_acc", "TTS intelligibility", True),
)


def load_eval(run_dir: str) -> dict:
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        raise UserError(
            f"{path} not found: evaluate the run first (ernie5 eval --checkpoint {run_dir})"
        )
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)[0]
        if not isinstance(metrics, dict):
            raise TypeError
    except (ValueError, IndexError, KeyError, TypeError):
        raise UserError(
            f"{path} is not an evaluation table (a JSON list of metric dicts): "
            f"re-run ernie5 eval --checkpoint {run_dir}"
        ) from None
    return metrics


def run_seed(run_dir: str) -> int | None:
    """train.seed from the run's config.yaml (None when the run has none)."""
    import yaml

    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            return int(yaml.safe_load(f)["train"]["seed"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def compare(baseline: list[dict], candidate: list[dict], bound: float = 0.10) -> list[dict]:
    """One dict per metric present in the candidate runs: key, label, pairs [(cand, base)], means,
    relative change of the means (None without a baseline) with the standard error of the mean
    paired difference on the same scale (relative_se, None for one pair) and `worse` (beyond the
    bound)."""
    rows = []
    for key, label, higher in METRICS:
        if not all(key in c for c in candidate):
            continue
        cand = [float(c[key]) for c in candidate]
        base = [float(b[key]) for b in baseline] if all(key in b for b in baseline) else None
        row = {
            "key": key,
            "label": label,
            "candidate": cand,
            "baseline": base,
            "mean_candidate": float(np.mean(cand)),
            "mean_baseline": None,
            "relative": None,
            "relative_se": None,
            "worse": False,
        }
        if base is not None:
            mb, mc = float(np.mean(base)), row["mean_candidate"]
            # Relative to the baseline's size, so the sign is right for a negative baseline too.
            if mb:
                rel = (mc - mb) / abs(mb)
                worse = (rel < -bound) if higher else (rel > bound)
            else:  # no relative change from zero: any step the wrong way counts
                rel, worse = None, (mc < mb) if higher else (mc > mb)
            se = None  # standard error of the mean paired difference, relative like `rel`
            if mb and len(cand) > 1:
                se = float(np.std(np.subtract(cand, base), ddof=1) / np.sqrt(len(cand)) / abs(mb))
            row.update(mean_baseline=mb, relative=rel, relative_se=se, worse=worse)
        rows.append(row)
    return rows


def markdown(rows: list[dict], names: list[str], bound: float) -> str:
    """names: one "candidate / baseline" label per pair."""
    head = (
        "| metric | "
        + " | ".join(names)
        + " | mean candidate / baseline | relative | within the bound |\n"
    )
    out = [head, "|---|" + "---:|" * (len(names) + 3) + "\n"]
    for r in rows:
        pairs = [
            f"{c:.3f} / " + ("-" if r["baseline"] is None else f"{r['baseline'][i]:.3f}")
            for i, c in enumerate(r["candidate"])
        ]
        if r["baseline"] is None:
            tail = f"{r['mean_candidate']:.3f} / - | | |"
        else:
            ok = "no" if r["worse"] else "yes"
            rel = "n/a" if r["relative"] is None else f"{100 * r['relative']:+.1f}%"
            if r["relative_se"] is not None:
                rel += f" ± {100 * r['relative_se']:.1f}%"
            tail = f"{r['mean_candidate']:.3f} / {r['mean_baseline']:.3f} | {rel} | {ok} |"
        out.append(f"| {r['label']} | " + " | ".join(pairs) + f" | {tail}\n")
    out.append(
        "\nBound: the candidate's mean no worse than the baseline's by more than "
        f"{100 * bound:.0f}% relative, over {len(names)} pair(s); ± is the standard error of the "
        "mean paired difference (relative to the baseline's mean).\n"
    )
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", nargs="+", required=True, help="evaluated runs without the change")
    p.add_argument(
        "--candidate", nargs="+", required=True, help="evaluated runs with it, same order"
    )
    p.add_argument(
        "--bound", type=float, default=0.10, help="allowed relative loss of a mean (0.10 = 10%%)"
    )
    args = p.parse_args(argv)
    if len(args.baseline) != len(args.candidate):
        print(
            f"compare: {len(args.baseline)} baseline runs but {len(args.candidate)} candidate "
            "runs; give one of each per seed, in the same order",
            file=sys.stderr,
        )
        return 2
    try:
        base = [load_eval(d) for d in args.baseline]
        cand = [load_eval(d) for d in args.candidate]
    except UserError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    for b, c in zip(args.baseline, args.candidate):
        sb, sc = run_seed(b), run_seed(c)
        if sb is not None and sc is not None and sb != sc:
            print(
                f"compare: {c} (train.seed {sc}) is paired with {b} (train.seed {sb}); "
                "list both groups in the same seed order",
                file=sys.stderr,
            )
            return 2
    rows = compare(base, cand, args.bound)

    def name(d):
        return os.path.basename(os.path.normpath(d))

    names = [f"{name(c)} / {name(b)}" for c, b in zip(args.candidate, args.baseline)]
    print(markdown(rows, names, args.bound), end="")
    return 1 if any(r["worse"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
