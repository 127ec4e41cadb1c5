"""Pipeline parallel (GPU builds): the backbone as a flat sequence of stage-able layers for Fleet.

    [embed] [block 0] [block 1] ... [block L-1] [head: norm, text head, MTP]
     └─ stage 0 ─────┘ └─ stage 1 ─┘ ...        └─ stage pp-1 ──────────────┘

`layer_costs` gives each item's parameter count (memory) and activated parameter count (compute per
token) from the config alone; `partition` cuts the sequence into pp * pp_chunks contiguous segments
with the smallest possible largest compute cost (VPP: segment s runs on stage s % pp). Both are plain
Python and tested on any machine. `build_pipeline_model` hands the same cut to Fleet's PipelineLayer
as `seg_method` together with LayerDescs of the stage layers below; Fleet's PipelineLayer and its
schedules (`parallel.pp_schedule`) run only on GPUs, so that function is not exercised on CPU.

Stage layers pass one tuple (hidden, cos, sin, startend_row_indices, next-token embeddings) from
stage to stage; the embedding stage computes the next-token embeddings the MTP head needs, so no
weight is shared across stages. Router statistics of pipelined MoE layers stay inside each stage: the
aux-free bias update under pp > 1 is not wired into the trainer yet (`ernie5 train` refuses pp > 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig, ParallelConfig
from ..model.params import modality_params


@dataclass(frozen=True)
class Item:
    name: str  # "embed", "block.3", "head"
    params: int
    activated: int  # parameters one token touches (compute proxy)


def layer_costs(cfg: ModelConfig) -> list[Item]:
    """The pipeline items of a model with their parameter counts (sum = count_params total); the
    modalities' input layers ride with the embedding, their heads with the text head."""
    m, v, moe, a = cfg.hidden_size, cfg.text_vocab, cfg.moe, cfg.attention
    attn = m * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + a.num_heads * a.head_dim * m
    expert = 3 * m * moe.expert_hidden
    shared = 3 * m * moe.shared_expert_hidden * moe.num_shared_experts
    dense_ffn = 3 * m * (moe.expert_hidden * moe.top_k + moe.shared_expert_hidden * moe.num_shared_experts)
    mod_inputs, mod_heads = modality_params(cfg)  # image/video/audio embeddings and heads
    items = [Item("embed", v * m + mod_inputs, 0)]
    for i in range(cfg.num_layers):
        common = attn + 2 * m
        if i < moe.first_dense_layers:
            items.append(Item(f"block.{i}", common + dense_ffn, common + dense_ffn))
        else:
            items.append(Item(f"block.{i}", common + m * moe.num_experts + moe.num_experts * expert + shared,
                              common + m * moe.num_experts + moe.top_k * expert + shared))
    head = m + (0 if cfg.tie_embeddings else v * m)
    mtp = (2 * m + 2 * m * m + attn + 2 * m + dense_ffn + m) if cfg.num_mtp_modules else 0
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
        j = max((k for k in range(len(bounds) - 1) if bounds[k + 1] - bounds[k] > 1),
                key=lambda k: sum(costs[bounds[k]:bounds[k + 1]]))
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
        part = items[bounds[s]:bounds[s + 1]]
        stages.append(Stage(s % pcfg.pp, s // pcfg.pp, tuple(it.name for it in part),
                            sum(it.params for it in part), sum(it.activated for it in part)))
    return stages


# ------------------------------------------------------------------------ Fleet (GPU builds)


def _stage_layers():
    """Stage-able layer classes; defined lazily so that importing this module needs no model code.
    Each takes and returns one tuple: (hidden, cos, sin, startend_row_indices, next_embed)."""
    import paddle
    from paddle import nn

    from ..model.block import Block
    from ..model.heads import MTPModule, TextHead
    from ..model.norm import RMSNorm
    from ..model.rope import rope_cos_sin

    class EmbedStage(nn.Layer):
        def __init__(self, cfg: ModelConfig):
            super().__init__()
            self.cfg = cfg
            self.table = nn.Embedding(cfg.text_vocab, cfg.hidden_size,
                                      weight_attr=nn.initializer.Normal(std=cfg.init_std))

        def forward(self, inputs):
            input_ids, positions, mask = inputs
            att = self.cfg.attention
            cos, sin = rope_cos_sin(positions, att.head_dim, att.rope_base, att.rope_sections)
            # The MTP module on the last stage needs the next tokens' embeddings: computed here, where
            # the table lives, and carried along (no weight shared across stages).
            next_ids = paddle.concat([input_ids[:, 1:], input_ids[:, -1:]], axis=1)
            return self.table(input_ids), cos, sin, mask, self.table(next_ids)

    class BlockStage(nn.Layer):
        def __init__(self, cfg: ModelConfig, index: int):
            super().__init__()
            self.block = Block(cfg, use_moe=index >= cfg.moe.first_dense_layers)

        def forward(self, inputs):
            x, cos, sin, mask, next_embed = inputs
            x, _ = self.block(x, cos, sin, mask)
            return x, cos, sin, mask, next_embed

    class HeadStage(nn.Layer):
        def __init__(self, cfg: ModelConfig):
            super().__init__()
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
            self.text_head = TextHead(cfg)
            self.mtp = MTPModule(cfg) if cfg.num_mtp_modules else None

        def forward(self, inputs):
            x, cos, sin, mask, next_embed = inputs
            logits = self.text_head(self.norm(x))
            if self.mtp is None:
                return logits
            return logits, self.text_head(self.mtp(x, next_embed, cos, sin, mask))

    return EmbedStage, BlockStage, HeadStage


def build_pipeline_model(cfg: ModelConfig, pcfg: ParallelConfig, loss_fn):
    """Fleet PipelineLayer over the stage layers, cut by `plan_stages` (call after fleet.init on GPUs).
    Untied embeddings only (a tied head would need the table on two stages)."""
    from paddle.distributed import fleet
    from paddle.distributed.fleet.meta_parallel import LayerDesc, PipelineLayer

    if cfg.tie_embeddings:
        raise ValueError("pipeline parallel needs model.tie_embeddings=false")
    EmbedStage, BlockStage, HeadStage = _stage_layers()
    descs = [LayerDesc(EmbedStage, cfg=cfg)]
    descs += [LayerDesc(BlockStage, cfg=cfg, index=i) for i in range(cfg.num_layers)]
    descs.append(LayerDesc(HeadStage, cfg=cfg))
    bounds = partition([max(1, it.activated) for it in layer_costs(cfg)], pcfg.pp * pcfg.pp_chunks)
    return PipelineLayer(layers=descs, num_stages=pcfg.pp, loss_fn=loss_fn, seg_method=bounds,
                         topology=fleet.get_hybrid_communicate_group().topology(),
                         num_virtual_pipeline_stages=pcfg.pp_chunks if pcfg.pp_chunks > 1 else None)


def fleet_pipeline_configs(pcfg: ParallelConfig, micro_batch_size: int, accumulate_steps: int) -> dict:
    """strategy.pipeline_configs for the recipe's schedule; with pp_chunks > 1 Fleet runs its
    interleaved (VPP) 1F1B schedule."""
    return {"micro_batch_size": micro_batch_size, "accumulate_steps": accumulate_steps,
            "schedule_mode": "FThenB" if pcfg.pp_schedule == "FThenB" else "1F1B"}
