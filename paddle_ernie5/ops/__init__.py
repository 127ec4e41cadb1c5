"""Thin Python seams over the custom operators, each beside a pure-Paddle reference.

flashmask.py    FlashMask attention (CPU custom op / Paddle's GPU kernel / dense reference)
masks.py        builders of FlashMask startend_row_indices
moe_experts.py  routed SwiGLU experts of an MoE layer (CPU custom op / grouped batched matmuls)
fused.py        RMSNorm, RoPE on q and k (with the qkv split), SwiGLU (CPU custom op / reference)
linear_ce.py    output projection + cross-entropy in tiles, no full logits (CPU op / reference)
adamw.py        one AdamW step over every parameter, gradient sums of squares (CPU op / reference)
policy.py       when a fused op replaces its reference (model.fused_ops, train.fused_optimizer)
build.py        builds and caches the C++ ops (`python -m paddle_ernie5.ops.build`, `make ops`)
The C++ ops are loaded on first use, never at import.
"""

from .flashmask import BACKENDS, flashmask_attention, flashmask_attention_reference

__all__ = ["BACKENDS", "flashmask_attention", "flashmask_attention_reference"]
