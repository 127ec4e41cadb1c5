"""Thin Python seams over the custom operators, each beside a pure-Paddle reference.

flashmask.py    FlashMask attention (CPU custom op / Paddle's GPU kernel / dense reference)
masks.py        builders of FlashMask startend_row_indices
moe_experts.py  routed SwiGLU experts of an MoE layer (CPU custom op / grouped batched matmuls)
build.py        builds and caches the C++ ops (`python -m paddle_ernie5.ops.build`, `make ops`)
The C++ ops are loaded on first use, never at import.
"""

from .flashmask import BACKENDS, flashmask_attention, flashmask_attention_reference

__all__ = ["BACKENDS", "flashmask_attention", "flashmask_attention_reference"]
