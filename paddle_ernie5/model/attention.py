"""Grouped-query attention with Uni-RoPE over the FlashMask operator.

Legend: B batch, S sequence, H query heads, K key/value heads, D head_dim, M model width.
Every attention pattern (causal text, packed documents, block-causal vision) arrives as FlashMask
`startend_row_indices` [B, 1|K, S, C]; this layer never builds an S x S mask itself.

With `model.attention.sparse_prefill: rr`, an inference forward of several positions computes only
the 128 x 128 blocks RRAttention selects (ops/rr_attention.py, passed to the op as `block_mask`):
gradients off, and either a KV cache (the prefill of generation) or the layer in eval mode (scoring
a long text). Training forwards and one-position decode steps stay dense.
"""

from __future__ import annotations

import paddle
from paddle import nn

from ..config import AttentionConfig
from ..ops.flashmask import flashmask_attention
from ..ops.rr_attention import RRSelection, rr_block_mask
from .rope import rope_qkv


class Attention(nn.Layer):
    def __init__(self, hidden_size: int, cfg: AttentionConfig, init_std: float, fused: bool = True):
        """`fused` (model.fused_ops): the split of the qkv projection and RoPE on q and k run as
        one fused CPU op where it applies (ops/fused.py `rope_qkv`)."""
        super().__init__()
        self.cfg = cfg
        self.fused = fused
        h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nn.initializer.Normal(std=init_std)
        self.qkv = nn.Linear(hidden_size, (h + 2 * k) * d, weight_attr=init, bias_attr=False)
        self.out = nn.Linear(h * d, hidden_size, weight_attr=init, bias_attr=False)
        # The block selection of this layer's last sparse prefill (density, selection time), or
        # None when the last forward was dense: a diagnostic read by benchmarks.
        self.last_selection: RRSelection | None = None

    def forward(self, x_BSM, cos, sin, startend_row_indices, cache=None, causal: bool = True):
        """`cache`: a layer cache during incremental decoding (model/generation.py: keys/values of
        earlier positions are read from it and the new ones appended); the causal mask is then
        bottom-right aligned. A decode step (one new position per row, no mask) on a static cache
        attends over the cache's buffers in place (`StaticLayerCache.attend`) instead of through
        the FlashMask op, whose 64 x 64 tiles are mostly idle for a single query row. After a
        prefill (several positions into an empty cache) the cache may evict keys
        (`end_prefill`: NACL and its baselines, model/kv_eviction.py)."""
        b, s, _ = x_BSM.shape
        h, k, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        qkv = self.qkv(x_BSM).reshape([b, s, h + 2 * k, d])
        q_BSHD, k_BSKD, v_BSKD = rope_qkv(qkv, cos, sin, h, k, self.fused)
        self.last_selection = None
        if s == 1 and startend_row_indices is None and causal and hasattr(cache, "attend"):
            o_BSHD = cache.attend(q_BSHD, k_BSKD, v_BSKD, d**-0.5)
            return self.out(o_BSHD.reshape([b, s, h * d]))
        if cache is not None:
            k_BSKD, v_BSKD = cache.append(k_BSKD, v_BSKD)
        o_BSHD = flashmask_attention(
            q_BSHD,
            k_BSKD,
            v_BSKD,
            startend_row_indices,
            causal=causal,
            softmax_scale=d**-0.5,
            block_mask=self._sparse_blocks(q_BSHD, k_BSKD, startend_row_indices, causal, cache),
            backend=self.cfg.backend,
        )
        if cache is not None and s > 1:
            cache.end_prefill(q_BSHD, d**-0.5)
        return self.out(o_BSHD.reshape([b, s, h * d]))

    def _sparse_blocks(self, q_BSHD, k_BSKD, startend_row_indices, causal: bool, cache):
        """RRAttention's block mask for an inference forward of several positions, else None."""
        cfg = self.cfg
        inference = cache is not None or not self.training
        if (
            cfg.sparse_prefill != "rr"
            or q_BSHD.shape[1] == 1
            or k_BSKD.shape[1] <= cfg.rr_block  # one key block: nothing to skip
            or paddle.is_grad_enabled()
            or not inference
        ):
            return None
        self.last_selection = rr_block_mask(
            q_BSHD,
            k_BSKD,
            startend_row_indices,
            causal=causal,
            stride=cfg.rr_stride,
            tau=cfg.rr_tau,
            block=cfg.rr_block,
            mask_heads=cfg.rr_mask_heads,
            sink_blocks=cfg.rr_sink_blocks,
            softmax_scale=cfg.head_dim**-0.5,
            backend=cfg.backend,
        )
        return self.last_selection.block_mask
