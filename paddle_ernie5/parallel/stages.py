"""Pipeline stage planning: the backbone as a flat sequence of stage-able items, cut into stages.

    [embed] [block 0] [block 1] ... [block L-1] [head: norm, text head, MTP]
     └─ stage 0 ─────┘ └─ stage 1 ─┘ ...        └─ stage pp-1 ──────────────┘

A universal-expert model (MoUE) has one more item after the embedding, `universal_pool` (pipeline
parallelism refuses it: every stage would need the pool).

`layer_costs` gives each item's parameter count (memory) and activated parameter count (compute per
token) from the config alone; `partition` cuts the sequence into pp * pp_chunks contiguous segments
with the smallest possible largest compute cost (virtual stages: segment s runs on stage s % pp).
Plain Python: the planner sizes a cluster with it on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig, ParallelConfig
from ..model.params import attention_params, modality_params, universal_pool_params


@dataclass(frozen=True)
class Item:
    name: str  # "embed", "block.3", "head"
    params: int
    activated: int  # parameters one token touches (compute proxy)


def layer_costs(cfg: ModelConfig) -> list[Item]:
    """The pipeline items of a model with their parameter counts (sum = count_params total); the
    modalities' input layers ride with the embedding, their heads with the text head."""
    m, v, moe = cfg.hidden_size, cfg.text_vocab, cfg.moe
    expert = 3 * m * moe.expert_hidden
    shared = 3 * m * moe.shared_expert_hidden * moe.num_shared_experts
    dense_ffn = (
        3 * m * (moe.expert_hidden * moe.top_k + moe.shared_expert_hidden * moe.num_shared_experts)
    )
    mod_inputs, mod_heads = modality_params(cfg)  # image/video/audio embeddings and heads
    items = [Item("embed", v * m + mod_inputs, 0)]
    uni = moe.universal
    if uni.enabled:  # MoUE: the shared pool is one item; the blocks hold routers over windows
        d, n_moe = uni.trajectory_dim, cfg.num_layers - moe.first_dense_layers
        items.append(
            Item("universal_pool", universal_pool_params(cfg), n_moe * moe.top_k * (expert + d))
        )
    for i in range(cfg.num_layers):
        common = attention_params(cfg, i) + 2 * m
        if i < moe.first_dense_layers:
            items.append(Item(f"block.{i}", common + dense_ffn, common + dense_ffn))
        elif uni.enabled:
            router = (m + d) * uni.window_size(moe.num_experts)
            items.append(Item(f"block.{i}", common + router + shared, common + router + shared))
        else:
            items.append(
                Item(
                    f"block.{i}",
                    common + m * moe.num_experts + moe.num_experts * expert + shared,
                    common + m * moe.num_experts + moe.top_k * expert + shared,
                )
            )
    head = m + (0 if cfg.tie_embeddings else v * m)
    mtp = (
        (2 * m + 2 * m * m + attention_params(cfg) + 2 * m + dense_ffn + m)
        if cfg.num_mtp_modules
        else 0
    )
    items.append(Item("head", head + mtp + mod_heads, head + mtp))
    return items


def partition(costs: list[int], parts: int) -> list[int]:
    """Boundaries [0, b1, ..., n] of `parts` non-empty contiguous segments minimising the largest
    segment sum (binary search on that sum, greedy feasibility check)."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} pipeline items into {parts} non-empty stages")

    def cuts(limit: int) -> list[int] | None:
        bounds, total = [0], 0
        for i, c in enumerate(costs):
            # Leave at least one item for every remaining segment.
            if total + c > limit or n - i <= parts - len(bounds):
                if total == 0 and c > limit:
                    return None
                if i > bounds[-1]:
                    bounds.append(i)
                    total = 0
            total += c
            if total > limit:
                return None
        bounds.append(n)
        return bounds if len(bounds) - 1 <= parts else None

    lo, hi = max(costs), sum(costs)
    while lo < hi:
        mid = (lo + hi) // 2
        if cuts(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    bounds = cuts(lo)
    while len(bounds) - 1 < parts:  # split the largest multi-item segment until there are `parts`
        j = max(
            (k for k in range(len(bounds) - 1) if bounds[k + 1] - bounds[k] > 1),
            key=lambda k: sum(costs[bounds[k] : bounds[k + 1]]),
        )
        bounds.insert(j + 1, bounds[j] + 1)
    return bounds


@dataclass(frozen=True)
class Stage:
    index: int  # pipeline rank that runs it
    chunk: int  # virtual stage index on that rank (0 without VPP)
    items: tuple[str, ...]
    params: int
    activated: int


def plan_stages(cfg: ModelConfig, pcfg: ParallelConfig) -> list[Stage]:
    """Which items each pipeline rank (and virtual chunk) holds, balanced on compute."""
    items = layer_costs(cfg)
    segments = pcfg.pp * pcfg.pp_chunks
    bounds = partition([max(1, it.activated) for it in items], segments)
    stages = []
    for s in range(segments):
        part = items[bounds[s] : bounds[s + 1]]
        stages.append(
            Stage(
                s % pcfg.pp,
                s // pcfg.pp,
                tuple(it.name for it in part),
                sum(it.params for it in part),
                sum(it.activated for it in part),
            )
        )
    return stages
