"""Export an elastic sub-model by slicing: fewer layers, fewer experts per MoE layer, smaller
top-k.

No retraining: the sliced parameters are copied as they are. The result is an ordinary model
(`Ernie5Model` with a smaller config) whose logits equal the full model's in the matching
`ElasticView`. Rules (documented choices):
- layers: `evenly_spaced_layers` (first and last kept), the rule elastic training uses by default;
- experts: per MoE layer, the `num_experts` experts with the highest load measured on held-out data
  in the chosen (layers, top-k) view, ties broken by lower index; kept in their original order.
Routing in the slice is identical: top-k weights are renormalised over the chosen experts, so the
softmax normaliser over the dropped experts cancels, and the selection bias is sliced with them.
A universal expert pool (MoUE) is kept whole (--experts = the pool); the kept MoE layers keep
their windows (universal.starts).
Per-layer attention settings (model.attention.k_heads / v_heads and a fusion in progress) follow
their layers.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ..config import AttentionConfig, ModelConfig
from ..errors import UserError
from .view import ElasticView, evenly_spaced_layers

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_EXPERT_AXIS = {
    "ffn.router.weight": 1,
    "ffn.router.selection_bias": 0,
    "ffn.experts.w_gate_up": 0,
    "ffn.experts.w_down": 0,
}


class ExportError(UserError, ValueError):
    """An export request that cannot be satisfied by this model."""


def check_request(cfg: ModelConfig, layers: int, experts: int, top_k: int) -> None:
    moe = cfg.moe
    if not 1 <= layers <= cfg.num_layers:
        raise ExportError(
            f"--layers {layers}: the model has {cfg.num_layers} layers "
            f"(allowed 1..{cfg.num_layers})"
        )
    if moe.universal.enabled and experts != moe.num_experts:
        raise ExportError(
            f"--experts {experts}: a universal expert pool is exported whole "
            f"(--experts {moe.num_experts}); slice --layers and --top-k"
        )
    if not 1 <= experts <= moe.num_experts:
        raise ExportError(
            f"--experts {experts}: the model has {moe.num_experts} experts per layer "
            f"(allowed 1..{moe.num_experts})"
        )
    if not 1 <= top_k <= min(experts, moe.top_k):
        raise ExportError(
            f"--top-k {top_k}: allowed 1..min(--experts={experts}, trained top_k={moe.top_k})"
        )


def choose_experts(loads: dict[int, np.ndarray], keep: int) -> dict[int, tuple[int, ...]]:
    """Per layer, the `keep` most loaded experts (ties: lower index first), in index order."""
    out = {}
    for layer, load in loads.items():
        order = np.lexsort((np.arange(load.size), -np.asarray(load)))
        out[layer] = tuple(sorted(order[:keep].tolist()))
    return out


def sub_view(
    layers: tuple[int, ...], layer_experts: dict[int, tuple[int, ...]], top_k: int
) -> ElasticView:
    return ElasticView(
        layers=layers, top_k=top_k, layer_experts=tuple(sorted(layer_experts.items()))
    )


def slice_state(
    state: dict[str, np.ndarray],
    cfg: ModelConfig,
    layers: tuple[int, ...],
    layer_experts: dict[int, tuple[int, ...]],
    top_k: int,
):
    """(sliced state dict, sliced ModelConfig)."""
    renumber = {old: new for new, old in enumerate(layers)}
    out = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m is None:
            out[key] = value
            continue
        old, rest = int(m.group(1)), m.group(2)
        if old not in renumber:
            continue
        if rest in _EXPERT_AXIS and not cfg.moe.universal.enabled:
            value = np.take(value, list(layer_experts[old]), axis=_EXPERT_AXIS[rest])
        out[f"blocks.{renumber[old]}.{rest}"] = np.ascontiguousarray(value)
    keep_experts = len(next(iter(layer_experts.values()))) if layer_experts else cfg.moe.num_experts
    universal = cfg.moe.universal
    if universal.enabled:  # the pool stays whole; the kept MoE layers keep their windows
        first = cfg.moe.first_dense_layers
        starts = universal.window_starts(cfg.num_layers - first, cfg.moe.num_experts)
        kept = tuple(starts[l - first] for l in layers if l >= first)
        universal = dataclasses.replace(universal, starts=kept)
    moe = dataclasses.replace(
        cfg.moe,
        universal=universal,
        num_experts=keep_experts,
        top_k=top_k,
        dense_hidden=cfg.moe.dense_width(),
        first_dense_layers=sum(1 for l in layers if l < cfg.moe.first_dense_layers),
    )
    new_cfg = dataclasses.replace(
        cfg, num_layers=len(layers), moe=moe, attention=slice_attention(cfg.attention, layers)
    )
    new_cfg.validate("model")
    return out, new_cfg


def slice_attention(att: AttentionConfig, layers: tuple[int, ...]) -> AttentionConfig:
    """The attention config of the kept `layers` (their entries of every per-layer list)."""

    def pick(values: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(values[i] for i in layers) if values else ()

    fusion = dataclasses.replace(
        att.fusion, from_k=pick(att.fusion.from_k), from_v=pick(att.fusion.from_v)
    )
    return dataclasses.replace(
        att, k_heads=pick(att.k_heads), v_heads=pick(att.v_heads), fusion=fusion
    )


def measure_loads(model, batches, view: ElasticView) -> dict[int, np.ndarray]:
    """Expert loads per MoE layer of `model` over `batches` (model-input dicts) in `view`."""
    import paddle

    loads: dict[int, np.ndarray] = {}
    model.eval()
    with paddle.no_grad():
        for batch in batches:
            for layer, stats in model(batch, view, with_mtp=False).router_stats.items():
                loads[layer] = loads.get(layer, 0) + stats.load_E.numpy()
    return loads


def plan_export(model, cfg: ModelConfig, batches, layers: int, experts: int, top_k: int):
    """Apply the rules: (layer indices, per-layer experts, the equivalent ElasticView)."""
    check_request(cfg, layers, experts, top_k)
    kept = evenly_spaced_layers(cfg.num_layers, layers)
    loads = measure_loads(model, batches, ElasticView(layers=kept, top_k=top_k))
    layer_experts = choose_experts(loads, experts)
    return kept, layer_experts, sub_view(kept, layer_experts, top_k)
