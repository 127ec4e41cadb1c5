"""Size a recipe on a cluster from its config alone: parameters, memory per device, tokens per
step.

Assumptions (stated in the printed table too): bf16 weights (2 B/param), fp32 gradients (4 B),
fp32 master weights + Adam moments (12 B) divided by the sharding degree (stage 1). Tensor parallel
(mp) splits every matmul weight; expert parallel (ep) splits the experts of each MoE layer; pipeline
(pp) splits the layers as `stages.plan_stages` does; the device reported is the pipeline rank that
needs the most memory. Activations are bf16 per token and layer for FlashMask attention (no S x S
term):

    attention  M (norm in) + M (qkv in) + (H + Kk + Kv) D (q, k, v) + H D (attention out)
               + 2 H (fp32 lse), Kk + Kv averaged over the layers (model.attention.k_heads /
               v_heads; 2 num_kv_heads without them)
    MoE FFN    M (norm in) + M (router/dispatch in) + K (3 F + M) (expert gate/up, act, out)
               + 3 F_shared (shared expert)
    recompute  only each layer's input (M) is kept, plus one layer's full set while it recomputes

divided by mp (sequence parallel), times the micro-batches pipeline rank i keeps in flight under
1F1B (min(pp - i, micro-batches)). The last stage also holds fp32 logits (V per token) for the loss.

For inference the plan also gives the KV cache per token: bf16 keys and values of every backbone
layer, 2 B x D x sum over layers of (Kk + Kv), and that figure as a share of the multi-head
attention cache (Kk = Kv = H everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..model.params import count_params, universal_pool_params
from .stages import plan_stages

GiB = 1024**3


@dataclass(frozen=True)
class Plan:
    devices: int
    total_params: int
    activated_params: int
    tokens_per_step: int
    micro_batch_tokens: int  # per data-parallel rank
    in_flight: int  # micro-batches whose activations the reported rank holds
    stage: str  # first..last item of the reported pipeline rank
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    activations: float
    activations_recompute: float
    logits: float
    universal_pool: int = 0  # parameters of a universal expert pool (MoUE), 0 without one
    kv_cache_bytes_per_token: int = 0  # bf16 keys + values over the backbone's layers
    kv_cache_mha_share: float = 1.0  # of the same model with Kk = Kv = H in every layer

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def total_recompute(self) -> float:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations_recompute
            + self.logits
        )


def make_plan(cfg: Config) -> Plan:
    m, p, tc = cfg.model, cfg.parallel, cfg.train
    counts = count_params(m)
    a, moe = m.attention, m.moe
    data_ranks = p.dp * p.ep * p.sharding
    micro_tokens = tc.batch_size // data_ranks * cfg.data.seq_len
    expert_params = moe.num_experts * 3 * m.hidden_size * moe.expert_hidden

    def device_params(stage) -> float:
        n_moe = sum(
            1
            for it in stage.items
            if it.startswith("block.") and int(it.split(".")[1]) >= moe.first_dense_layers
        )
        experts = n_moe * expert_params
        if moe.universal.enabled:  # one pool, split once over ep
            experts = expert_params if "universal_pool" in stage.items else 0
        return (stage.params - experts) / p.mp + experts / (p.ep * p.mp)

    kv_heads = a.kv_cache_heads(m.num_layers)
    per_rank: dict[int, list] = {}
    for st in plan_stages(m, p):
        per_rank.setdefault(st.index, []).append(st)
    attn = (
        2
        * (
            2 * m.hidden_size
            + (a.num_heads + kv_heads / m.num_layers) * a.head_dim
            + a.num_heads * a.head_dim
        )
        + 4 * a.num_heads
    )
    ffn = 2 * (
        2 * m.hidden_size
        + moe.top_k * (3 * moe.expert_hidden + m.hidden_size)
        + 3 * moe.shared_expert_hidden * moe.num_shared_experts
    )
    per_layer = micro_tokens * (attn + ffn) / p.mp

    def rank_plan(index: int, stages) -> Plan:
        in_flight = min(p.pp - index, tc.grad_accum)  # 1F1B: stage i keeps pp - i micro-batches
        params = sum(device_params(s) for s in stages)
        names = [it for s in stages for it in s.items]
        blocks = sum(1 for it in names if it.startswith("block."))
        return Plan(
            devices=p.dp * p.ep * p.sharding * p.pp * p.mp,
            total_params=counts["total"],
            activated_params=counts["activated"],
            tokens_per_step=tc.batch_size * tc.grad_accum * cfg.data.seq_len,
            micro_batch_tokens=micro_tokens,
            in_flight=in_flight,
            stage=f"{names[0]}..{names[-1]}",
            weights=2 * params,
            gradients=4 * params,
            optimizer=12 * params / p.sharding,
            activations=per_layer * blocks * in_flight,
            activations_recompute=micro_tokens * 2 * m.hidden_size / p.mp * blocks * in_flight
            + per_layer,
            logits=micro_tokens * 4 * m.text_vocab / p.mp if "head" in names else 0.0,
            universal_pool=universal_pool_params(m),
            kv_cache_bytes_per_token=2 * a.head_dim * kv_heads,
            kv_cache_mha_share=kv_heads / (2 * a.num_heads * m.num_layers),
        )

    # The device that needs the most memory (without recompute) sets the requirement.
    return max((rank_plan(i, group) for i, group in per_rank.items()), key=lambda plan: plan.total)


def _num(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(cfg: Config, plan: Plan) -> str:
    p, tc = cfg.parallel, cfg.train
    rows = [
        (
            "devices",
            f"{plan.devices} (dp={p.dp} ep={p.ep} sharding={p.sharding} pp={p.pp} mp={p.mp})",
        ),
        ("parameters, total", _num(plan.total_params)),
        (
            "parameters, activated per token",
            f"{_num(plan.activated_params)} "
            f"({100 * plan.activated_params / plan.total_params:.2f}%)",
        ),
        (
            "tokens per step",
            f"{_num(plan.tokens_per_step)} ({tc.batch_size} seq x {tc.grad_accum} "
            f"micro-batches x {cfg.data.seq_len})",
        ),
        *(
            [("parameters, universal expert pool", f"{plan.universal_pool:,}")]
            if plan.universal_pool
            else []
        ),
        ("tokens per micro-batch per data rank", f"{plan.micro_batch_tokens}"),
        ("pipeline rank reported (most memory)", plan.stage),
        ("weights (bf16) / device", f"{plan.weights / GiB:.1f} GiB"),
        ("gradients (fp32) / device", f"{plan.gradients / GiB:.1f} GiB"),
        (
            f"optimizer (fp32 master + Adam, / sharding {p.sharding}) / device",
            f"{plan.optimizer / GiB:.1f} GiB",
        ),
        (
            f"activations, no recompute ({plan.in_flight} micro-batches in flight)",
            f"{plan.activations / GiB:.1f} GiB",
        ),
        ("activations, full recompute", f"{plan.activations_recompute / GiB:.1f} GiB"),
        ("logits (fp32, last stage)", f"{plan.logits / GiB:.1f} GiB"),
        ("total / device, no recompute", f"{plan.total / GiB:.1f} GiB"),
        ("total / device, full recompute", f"{plan.total_recompute / GiB:.1f} GiB"),
        (
            "KV cache per token (bf16, inference)",
            f"{plan.kv_cache_bytes_per_token:,} B ({100 * plan.kv_cache_mha_share:.1f}% of MHA)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'quantity'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)
