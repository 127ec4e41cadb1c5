"""Parameter counts from a config alone (no paddle import, no allocation): any size, any recipe."""

from __future__ import annotations

from ..config import ModelConfig


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts computed from the config alone (no allocation), for any size.

    total: every parameter, MTP included. activated: parameters one text token touches in inference
    (backbone with top_k of the experts, the text embedding row excluded, MTP excluded)."""
    m, v, l = cfg.hidden_size, cfg.vocab_size, cfg.num_layers
    a, moe = cfg.attention, cfg.moe
    attn = m * (a.num_heads + 2 * a.num_kv_heads) * a.head_dim + a.num_heads * a.head_dim * m
    norms = 2 * m
    expert = 3 * m * moe.expert_hidden
    shared = 3 * m * moe.shared_expert_hidden * moe.num_shared_experts
    dense_ffn = 3 * m * moe.dense_width()
    n_moe = l - moe.first_dense_layers
    n_dense = moe.first_dense_layers
    moe_layer_total = m * moe.num_experts + moe.num_experts * expert + shared
    moe_layer_active = m * moe.num_experts + moe.top_k * expert + shared
    embed = v * m
    head = 0 if cfg.tie_embeddings else v * m
    mtp = (2 * m + 2 * m * m + attn + norms + dense_ffn + m) if cfg.num_mtp_modules else 0
    backbone_common = l * (attn + norms) + n_dense * dense_ffn + m
    total = embed + head + backbone_common + n_moe * moe_layer_total + mtp
    activated = head + backbone_common + n_moe * moe_layer_active + (embed if cfg.tie_embeddings else 0)
    return {"total": total, "activated": activated, "embedding": embed,
            "experts": n_moe * moe.num_experts * expert}
