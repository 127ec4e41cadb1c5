"""Figures for docs/results.md from a run directory: PNGs of its logged scalars and routing.

    python tools/plot_results.py runs/pretrain_tiny --out docs/img --name pretrain_tiny
    python tools/plot_results.py runs/pretrain_tiny --scalar 'moe/entropy/*' \\
        --scalar 'moe/max_over_mean/*' --scalar perf/tokens_per_s

What it writes (under --out, each name prefixed with --name, default the run directory's name):

- `<name>_loss.png`: the training loss (`loss/text` by default, --train-key) against the step, the
  validation loss (`val/loss`) as points, and the unigram baseline as a line when the run has an
  `eval.json` with `text/unigram_ppl` (written by `ernie5 eval` or `ernie5 train --eval`);
- `<name>_scalars.png`: one panel per --scalar; a name may be a shell pattern (`moe/entropy/*`),
  and every key of metrics.jsonl it matches is drawn in that panel;
- `<name>_routing_entropy.png`: normalised routing entropy per source and MoE layer, read from a
  routing report (`ernie5 routing-report`): `report.json` when the report directory has one
  (`{"entropy": {source: [per layer]}, "layer_ids": [...]}`), else the entropy table of its
  `report.md`. The directory is --routing, or `<run>/routing_report` when that exists.

It only reads what the run wrote; nothing is trained or evaluated here. Prints each path it wrote.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (one JSON object per logged step); a torn last line is
    skipped (a run that is still writing)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar, in step order, without non-finite values. A resumed run
    can log a step twice: the last record of a step wins."""
    by_step = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and "step" in r:
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def matching_keys(records: list[dict], pattern: str) -> list[str]:
    keys = sorted({k for r in records for k in r if k != "step"})
    return [k for k in keys if fnmatch.fnmatchcase(k, pattern)]


def unigram_loss(run_dir: str) -> float | None:
    """ln(unigram perplexity) from the run's eval.json, if it has one."""
    path = os.path.join(run_dir, "eval.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    row = rows[0] if isinstance(rows, list) and rows else rows
    ppl = row.get("text/unigram_ppl") if isinstance(row, dict) else None
    return math.log(ppl) if isinstance(ppl, (int, float)) and ppl > 0 else None


def routing_entropy(report_dir: str) -> tuple[list[str], list[str], list[list[float]]] | None:
    """(sources, layer labels, entropy[source][layer]) from a routing report directory, or
    None."""
    js = os.path.join(report_dir, "report.json")
    if os.path.isfile(js):
        with open(js, encoding="utf-8") as f:
            data = json.load(f)
        ent = data["entropy"]
        sources = list(ent)
        n = len(ent[sources[0]])
        layers = [f"L{i}" for i in data.get("layer_ids", range(1, n + 1))]
        return sources, layers, [list(map(float, ent[t])) for t in sources]
    md = os.path.join(report_dir, "report.md")
    if not os.path.isfile(md):
        return None
    lines = open(md, encoding="utf-8").read().splitlines()
    try:
        start = next(
            i for i, l in enumerate(lines) if l.lower().startswith("## normalised routing")
        )
    except StopIteration:
        return None
    header = next(l for l in lines[start + 1 :] if l.startswith("|"))
    layers = [c.strip() for c in header.strip("|").split("|")[1:]]
    sources, values = [], []
    for l in lines[lines.index(header, start) + 2 :]:
        if not l.startswith("|"):
            break
        cells = [c.strip() for c in l.strip("|").split("|")]
        sources.append(cells[0])
        values.append([float(c) for c in cells[1:]])
    return sources, layers, values


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(records, run_dir, out_path, train_key="loss/text", title=""):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    s, v = series(records, train_key)
    if s:
        ax.plot(s, v, lw=1, color="tab:blue", label=f"train {train_key}")
    s, v = series(records, "val/loss")
    if s:
        ax.plot(s, v, "o-", color="tab:orange", label="validation loss")
        for x, y in zip(s, v):
            ax.annotate(
                f"{y:.3f}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
            )
    base = unigram_loss(run_dir)
    if base is not None:
        ax.axhline(base, ls="--", color="grey", label=f"unigram baseline ({base:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or os.path.basename(os.path.normpath(run_dir)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_scalars(records, patterns, out_path, title=""):
    plt = _plt()
    fig, axes = plt.subplots(len(patterns), 1, figsize=(7, 2.6 * len(patterns)), squeeze=False)
    for ax, pat in zip(axes[:, 0], patterns):
        keys = matching_keys(records, pat)
        for k in keys:
            s, v = series(records, k)
            ax.plot(s, v, lw=1, label=k)
        ax.set_title(pat if keys else f"{pat} (not in metrics.jsonl)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if 1 < len(keys) <= 12:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_routing_entropy(sources, layers, values, out_path, title=""):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(layers), 0.9 + 0.35 * len(sources)))
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), layers, fontsize=8)
    ax.set_yticks(range(len(sources)), sources, fontsize=8)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="black" if v > 0.6 else "white",
            )
    ax.set_title(title or "normalised routing entropy", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    ap.add_argument("--out", default="docs/img", help="output directory (default docs/img)")
    ap.add_argument("--name", default="", help="file name prefix (default: the run's name)")
    ap.add_argument(
        "--train-key", default="loss/text", help="training loss key (default loss/text)"
    )
    ap.add_argument(
        "--scalar",
        action="append",
        default=[],
        metavar="KEY_OR_PATTERN",
        help="a metrics.jsonl key or shell pattern, one panel each (repeatable)",
    )
    ap.add_argument(
        "--routing",
        default="",
        help="routing report directory (default <run>/routing_report when present)",
    )
    ap.add_argument("--title", default="", help="title of the loss figure")
    args = ap.parse_args(argv)

    metrics = os.path.join(args.run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        print(f"plot_results: no metrics.jsonl in {args.run_dir}", file=sys.stderr)
        return 2
    records = read_metrics(metrics)
    name = args.name or os.path.basename(os.path.normpath(args.run_dir))
    os.makedirs(args.out, exist_ok=True)
    written = []

    path = os.path.join(args.out, f"{name}_loss.png")
    plot_loss(records, args.run_dir, path, args.train_key, args.title)
    written.append(path)
    if args.scalar:
        path = os.path.join(args.out, f"{name}_scalars.png")
        plot_scalars(records, args.scalar, path)
        written.append(path)
    routing = args.routing or os.path.join(args.run_dir, "routing_report")
    ent = routing_entropy(routing) if os.path.isdir(routing) else None
    if args.routing and ent is None:
        print(
            f"plot_results: no routing report (report.json or report.md) in {routing}",
            file=sys.stderr,
        )
        return 2
    if ent is not None:
        path = os.path.join(args.out, f"{name}_routing_entropy.png")
        plot_routing_entropy(*ent, path)
        written.append(path)
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
