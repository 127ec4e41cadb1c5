"""Grouped-query attention with Uni-RoPE over the FlashMask operator.

Legend: B batch, S sequence, H query heads, K key/value heads, D head_dim, M model width.
Every attention pattern (causal text, packed documents, block-causal vision) arrives as FlashMask
`startend_row_indices` [B, 1|K, S, C]; this layer never builds an S x S mask itself.

With `model.attention.sparse_prefill: rr`, an inference forward of several positions computes only
the 128 x 128 blocks RRAttention selects (ops/rr_attention.py, passed to the op as `block_mask`):
gradients off, and either a KV cache (the prefill of generation) or the layer in eval mode (scoring
a long text). Training forwards and one-position decode steps stay dense.

Decoupled-Head Attention (DHA): a layer may have its own numbers of key heads Kk and value heads
Kv (`model.attention.k_heads` / `v_heads`, each a divisor of H; GQA and MHA are the cases
Kk = Kv). Query head h reads key head h // (H / Kk) and value head h // (H / Kv). The qkv projection
is [H | Kk | Kv] heads wide. A checkpoint being converted to DHA (`attention.fusion`) computes its
source's heads through `HeadFusion`, which mixes each head's projection with the other heads of
its group until the group shares one head.
"""

from __future__ import annotations

import math

import numpy as np
import paddle
from paddle import nn

from ..config import AttentionConfig
from ..ops.flashmask import flashmask_attention
from ..ops.rr_attention import RRSelection, rr_block_mask
from .rope import rope_qkv


class Attention(nn.Layer):
    def __init__(
        self,
        hidden_size: int,
        cfg: AttentionConfig,
        init_std: float,
        fused: bool = True,
        layer: int | None = None,
    ):
        """`fused` (model.fused_ops): the split of the qkv projection and RoPE on q and k run as
        one fused CPU op where it applies (ops/fused.py `rope_qkv`). `layer`: the backbone layer's
        index, which picks its key and value head counts (None: the MTP block, num_kv_heads)."""
        super().__init__()
        self.cfg = cfg
        self.fused = fused
        h, d = cfg.num_heads, cfg.head_dim
        self.k_heads, self.v_heads = cfg.computed_heads(layer)
        init = nn.initializer.Normal(std=init_std)
        self.qkv = nn.Linear(
            hidden_size, (h + self.k_heads + self.v_heads) * d, weight_attr=init, bias_attr=False
        )
        self.out = nn.Linear(h * d, hidden_size, weight_attr=init, bias_attr=False)
        fusing = cfg.fusion.active and layer is not None
        self.fusion = HeadFusion(cfg, layer) if fusing else None
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
        h, d = self.cfg.num_heads, self.cfg.head_dim
        kh, vh = self.k_heads, self.v_heads
        if self.fusion is None:
            qkv = self.qkv(x_BSM)
        else:
            qkv = paddle.matmul(x_BSM, self.fusion.mix(self.qkv.weight))
        qkv = qkv.reshape([b, s, h + kh + vh, d])
        if kh == vh:
            q_BSHD, k_BSKD, v_BSKD = rope_qkv(qkv, cos, sin, h, kh, self.fused)
        else:
            # The op rotates the first H' + K' of [H' | K' | K'] heads: with K' = Kv and
            # H' = H + Kk - Kv those are exactly q and k, split again below.
            qk, kv, v_BSKD = rope_qkv(qkv, cos, sin, h + kh - vh, vh, self.fused)
            q_BSHD, k_BSKD = paddle.concat([qk, kv], axis=2).split([h, kh], axis=2)
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
            dense_last=cfg.rr_dense_last,
            local_blocks=cfg.rr_local_blocks,
            softmax_scale=cfg.head_dim**-0.5,
            backend=cfg.backend,
        )
        return self.last_selection.block_mask


class HeadFusion(nn.Layer):
    """Progressive linear fusion of one layer's source key and value heads (attention.fusion).

    Legend: M model width, S source heads of one kind, T target heads (k_heads or v_heads), G =
    S / T heads per group (consecutive), D head_dim, P = D / 2 RoPE pairs. Source head j (group c =
    j // G, rank r = j % G) is computed with the projection

        W'_j = (1 - lam) W_j + lam F_j         lam: 0 -> 1 over fusion.steps optimizer steps

    granularity "head" (the paper's scalar fusion weights):
        F_j = sum_i a[c, r, i] W_{cG+i}, a = mean_r(w[c]): the group's mean weights, shared by
        its heads; w [T, G, G] starts at the identity (F_j = the group's plain mean).
    granularity "subspace" (fusion weights as maps, set from the calibration data by
    train/dha.py):
        shared head  W_c = sum_i W_{cG+i} C[c, i]
        F_j = W_c N[c, r]
      keys: C, N are complex numbers per RoPE pair ([T, G, P, 2]), the maps that commute with RoPE,
      so N folds into the query projection; values: D x D matrices ([T, G, D, D]), N folds into
      the output projection. Every head of a group is then a linear image of one shared head,
      which is all the merged model caches.

    At lam = 0 W'_j = W_j: the source's logits. The weights are trained (fusion.weights learned,
    DHA) or fixed (mean: "head" at the identity, the GQA mean-pooling baseline). `step` counts
    optimizer steps (the trainer calls `advance` after each, through `advance_head_fusion`, so
    gradient accumulation and elastic sub-model forwards do not move it); it is a buffer, so
    checkpoints carry it and a resumed run continues the schedule."""

    def __init__(self, cfg: AttentionConfig, layer: int):
        super().__init__()
        f = cfg.fusion
        self.cfg = cfg
        self.sources = (f.from_k[layer], f.from_v[layer])
        self.targets = (cfg.key_heads(layer), cfg.value_heads(layer))
        d = cfg.head_dim
        for kind, src, tgt in zip("kv", self.sources, self.targets):
            g = src // tgt
            if f.granularity == "head":
                tensors = {f"w_{kind}": np.broadcast_to(np.eye(g), (tgt, g, g))}
            elif kind == "k":  # complex 1 + 0i per pair: C and N the identity
                one = np.zeros([tgt, g, d // 2, 2])
                one[..., 0] = 1.0
                shared = np.zeros_like(one)
                shared[:, 0] = one[:, 0]  # the shared head starts as the group's first head
                tensors = {"c_k": shared, "n_k": one}
            else:
                eye = np.broadcast_to(np.eye(d), (tgt, g, d, d))
                shared = np.zeros_like(eye)
                shared[:, 0] = eye[:, 0]
                tensors = {"c_v": shared, "n_v": eye}
            for name, value in tensors.items():
                value = paddle.to_tensor(np.ascontiguousarray(value, dtype=np.float32))
                if f.weights == "learned":
                    init = nn.initializer.Assign(value)
                    self.add_parameter(
                        name, self.create_parameter(list(value.shape), default_initializer=init)
                    )
                else:
                    self.register_buffer(name, value, persistable=True)
        self.register_buffer("step", paddle.zeros([1], dtype="int64"), persistable=True)

    def share(self) -> float:
        """lam: how far the heads have moved to their fused form (0 .. 1)."""
        f = self.cfg.fusion
        if f.steps == 0:
            return 1.0
        t = min(1.0, int(self.step.numpy()[0]) / f.steps)
        return t if f.schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * t))

    def advance(self) -> None:
        self.step.set_value(self.step + 1)

    def fused(self, kind: str, heads_MTGD):
        """F [M, T, G, D] of one kind's source heads [M, T, G, D] (see the class docstring)."""
        if self.cfg.fusion.granularity == "head":
            w = getattr(self, f"w_{kind}")
            a = w.mean(axis=1)  # [T, G(member)]
            shared_MTD = (heads_MTGD * a.unsqueeze(0).unsqueeze(-1)).sum(axis=2)
            return shared_MTD.unsqueeze(2).expand(heads_MTGD.shape)
        c, n = getattr(self, f"c_{kind}"), getattr(self, f"n_{kind}")
        if kind == "v":
            shared_MTD = paddle.einsum("mtid,tide->mte", heads_MTGD, c)
            return paddle.einsum("mte,tjef->mtjf", shared_MTD, n)
        p = heads_MTGD.shape[-1] // 2
        re, im = heads_MTGD[..., :p], heads_MTGD[..., p:]  # the rotate-half pairs (i, i + P)
        c_re, c_im = c[..., 0].unsqueeze(0), c[..., 1].unsqueeze(0)  # [1, T, G, P]
        s_re = (re * c_re - im * c_im).sum(axis=2, keepdim=True)  # [M, T, 1, P]
        s_im = (re * c_im + im * c_re).sum(axis=2, keepdim=True)
        n_re, n_im = n[..., 0].unsqueeze(0), n[..., 1].unsqueeze(0)
        return paddle.concat([s_re * n_re - s_im * n_im, s_re * n_im + s_im * n_re], axis=-1)

    def shared(self, kind: str, heads_MTGD):
        """The shared head of each group [M, T, D] (the merged model's heads)."""
        if self.cfg.fusion.granularity == "head":
            return self.fused(kind, heads_MTGD)[:, :, 0]
        c = getattr(self, f"c_{kind}")
        if kind == "v":
            return paddle.einsum("mtid,tide->mte", heads_MTGD, c)
        p = heads_MTGD.shape[-1] // 2
        re, im = heads_MTGD[..., :p], heads_MTGD[..., p:]
        c_re, c_im = c[..., 0].unsqueeze(0), c[..., 1].unsqueeze(0)
        return paddle.concat(
            [(re * c_re - im * c_im).sum(axis=2), (re * c_im + im * c_re).sum(axis=2)], axis=-1
        )

    def mix(self, qkv_weight_MN, lam: float | None = None):
        """The layer's qkv projection [M, (H + Sk + Sv) D] with every key and value head replaced by
        W'_j (lam: the current share unless given)."""
        lam = self.share() if lam is None else lam
        h, d = self.cfg.num_heads, self.cfg.head_dim
        m = qkv_weight_MN.shape[0]
        parts = [qkv_weight_MN[:, : h * d]]
        start = h * d
        for kind, src, tgt in zip("kv", self.sources, self.targets):
            heads_MTGD = qkv_weight_MN[:, start : start + src * d].reshape([m, tgt, src // tgt, d])
            mixed = (
                heads_MTGD
                if lam == 0
                else heads_MTGD * (1.0 - lam) + self.fused(kind, heads_MTGD) * lam
            )
            parts.append(mixed.reshape([m, src * d]))
            start += src * d
        return paddle.concat(parts, axis=1)


def advance_head_fusion(model: nn.Layer) -> None:
    """One optimizer step of every progressive head fusion in `model` (any wrapper or pipeline
    stage of it): the trainer calls this after each step."""
    for layer in model.sublayers():
        if isinstance(layer, HeadFusion):
            layer.advance()
