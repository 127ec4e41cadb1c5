"""Elastic grid: the full model and a family of sliced sub-models, measured side by side.

Each row is what `ernie5 export` would produce for that shape (same layer and expert rules),
evaluated through the equivalent elastic view of the full model (exactly equal logits, see
train/export.py).
`--compare` runs (e.g. models of a sub-model's shape trained from scratch for the same steps) are
evaluated on the same batches and added as extra rows.
"""

from __future__ import annotations

import itertools

from ..model.params import count_params
from ..model.slicing import plan_export
from .suite import TextEval, score, text_metrics


def grid_shapes(cfg, target_activated: float = 0.5, target_total: float = 0.35):
    """[(label, layers, experts, top_k)]: full, one axis reduced at a time, k = 25%, and the shape
    closest to the target activated/total fractions (ERNIE 5.0's 53.7% / 35.8% sub-model)."""
    l, e, k = cfg.num_layers, cfg.moe.num_experts, cfg.moe.top_k
    shapes = [("full", l, e, k)]
    if l > 1:
        shapes.append(("depth -1 layer", l - 1, e, k))
    if e // 2 >= k:
        shapes.append(("experts 50%", l, e // 2, k))
    if k > 1:
        shapes.append(("top-k 50%", l, e, max(1, k // 2)))
        shapes.append(("top-k 25%", l, e, max(1, k // 4)))
    full = count_params(cfg)
    best, best_err = None, float("inf")
    for ll, ee, kk in itertools.product(range(1, l + 1), range(1, e + 1), range(1, k + 1)):
        if kk > ee:
            continue
        p = _sliced_counts(cfg, ll, ee, kk)
        err = abs(p["activated"] / full["activated"] - target_activated) + abs(
            p["total"] / full["total"] - target_total
        )
        if err < best_err:
            best, best_err = (ll, ee, kk), err
    shapes.append((f"~{target_activated:.0%} act / ~{target_total:.0%} total", *best))
    seen, unique = set(), []
    for shape in shapes:
        if shape[1:] not in seen:
            seen.add(shape[1:])
            unique.append(shape)
    return unique


def _sliced_counts(cfg, layers, experts, top_k):
    import dataclasses

    from ..model.view import evenly_spaced_layers

    kept = evenly_spaced_layers(cfg.num_layers, layers)
    moe = dataclasses.replace(
        cfg.moe,
        num_experts=experts,
        top_k=top_k,
        dense_hidden=cfg.moe.dense_width(),
        first_dense_layers=sum(1 for i in kept if i < cfg.moe.first_dense_layers),
    )
    return count_params(dataclasses.replace(cfg, num_layers=layers, moe=moe))


def run_grid(
    model, cfg, ev: TextEval, compare: list[tuple[str, object]] = (), log=print
) -> list[dict]:
    full = count_params(cfg.model)
    rows = []
    for label, layers, experts, top_k in grid_shapes(cfg.model):
        kept, layer_experts, view = plan_export(
            model, cfg.model, ev.batches, layers, experts, top_k
        )
        p = _sliced_counts(cfg.model, layers, experts, top_k)
        m = text_metrics(ev, model, view)
        rows.append(
            {
                "model": label,
                "layers": layers,
                "experts": experts,
                "top_k": top_k,
                "total_params": p["total"],
                "activated_params": p["activated"],
                "total_frac": p["total"] / full["total"],
                "activated_frac": p["activated"] / full["activated"],
                **m,
                "score": score(m, ev.unigram),
            }
        )
        log(f"  {label}: loss {m['text/loss']:.4f}, {m['decode/tokens_per_s']:.0f} tok/s")
    for name, other in compare:
        p = count_params(other.cfg)
        m = text_metrics(ev, other)
        rows.append(
            {
                "model": f"scratch: {name}",
                "layers": other.cfg.num_layers,
                "experts": other.cfg.moe.num_experts,
                "top_k": other.cfg.moe.top_k,
                "total_params": p["total"],
                "activated_params": p["activated"],
                "total_frac": p["total"] / full["total"],
                "activated_frac": p["activated"] / full["activated"],
                **m,
                "score": score(m, ev.unigram),
            }
        )
    base = rows[0]
    for r in rows:
        r["score_vs_full"] = r["score"] / base["score"] if base["score"] else float("nan")
        r["decode_speedup"] = r["decode/tokens_per_s"] / base["decode/tokens_per_s"]
    return rows


def markdown(rows: list[dict], unigram_ppl: float) -> str:
    head = (
        "| model | L | E | k | total params | activated | text ppl | score | score / full "
        "| decode tok/s | speed / full |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['layers']} | {r['experts']} | {r['top_k']} | "
        f"{r['total_params'] / 1e6:.2f}M ({r['total_frac']:.0%}) | "
        f"{r['activated_params'] / 1e6:.2f}M ({r['activated_frac']:.0%}) | {r['text/ppl']:.2f} | "
        f"{r['score']:.1f} | {r['score_vs_full']:.1%} | {r['decode/tokens_per_s']:.0f} | "
        f"{r['decode_speedup']:.2f}x |\n"
        for r in rows
    )
    return (
        head
        + body
        + (
            f"\nUnigram baseline perplexity {unigram_ppl:.1f}. Score = 100 x (1 - loss / "
            "unigram loss): the share of the baseline's nats the model removes.\n"
        )
    )
