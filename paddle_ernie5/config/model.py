"""The `model` section with its `attention` and `moe` sub-sections (`audio` and `vision` are in
modalities.py), and the modality constants shared with the data and tokenizer code."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._check import _check
from .modalities import AudioModelConfig, VisionModelConfig

MODALITIES = ("text", "image", "video", "audio")
# Delimiters of modality spans, ids vocab_size + index (multimodal models only; see
# ModelConfig.text_vocab).
SPECIAL_TOKENS = ("<boi>", "<eoi>", "<bov>", "<eov>", "<boa>", "<eoa>")
_OP_BLOCK = 128  # FlashMask block_mask granularity (ops/flashmask.py; config imports no ops)


@dataclass(frozen=True, kw_only=True)
class HeadFusionConfig:
    """Progressive linear fusion of a converted checkpoint's heads (`ernie5 convert-dha`,
    train/dha.py; the math in model/attention.py `HeadFusion`). While `from_k`/`from_v` are set,
    layer l still computes the source's from_k[l] key and from_v[l] value heads, each a mix of the
    source heads of its group (group = from / k_heads[l] consecutive heads) with weights that start
    at identity (the source's own head: the same logits as the source) and move, over `steps`
    training forwards, to the group's shared head; after that `convert-dha` merges the checkpoint
    into the plain k_heads/v_heads model. The DHA paper (Chen et al., 2024) pulls the weights
    together with a fusion loss under an augmented Lagrangian; its schedule is not disclosed, so
    ours is an explicit interpolation toward the fused heads."""

    from_k: tuple[int, ...] = ()  # source key heads per layer being fused; () = no fusion
    from_v: tuple[int, ...] = ()  # source value heads per layer being fused
    steps: int = 8  # optimizer steps until the heads are fused
    schedule: str = "linear"  # share of the group mean at step t: t/steps, or cosine-shaped
    # learned: DHA, the fusion weights are trained; mean: fixed (the GQA mean-pooling baseline
    # with granularity head: the group's shared head is the plain mean of its heads).
    weights: str = "learned"
    # head: one weight per (head, member head), the group's heads end as its weighted mean (the
    # paper's form); subspace: one shared head per group with maps that rebuild each head from it
    # (complex per RoPE pair for keys, D x D for values), initialised by the conversion from the
    # calibration data's principal components (model/attention.py HeadFusion).
    granularity: str = "subspace"

    @property
    def active(self) -> bool:
        return bool(self.from_k)

    def validate(self, at: str) -> None:
        _check(
            at,
            "from_v",
            self.from_v,
            bool(self.from_k) == bool(self.from_v),
            "one entry per layer when from_k is set, else [] (both or neither)",
        )
        _check(at, "steps", self.steps, self.steps >= 0, ">= 0 (0 = fused from the start)")
        _check(
            at, "schedule", self.schedule, self.schedule in ("linear", "cosine"), "linear or cosine"
        )
        _check(
            at,
            "weights",
            self.weights,
            self.weights in ("learned", "mean"),
            "learned (DHA) or mean (GQA mean pooling)",
        )
        _check(
            at,
            "granularity",
            self.granularity,
            self.granularity in ("head", "subspace"),
            "head or subspace",
        )


@dataclass(frozen=True, kw_only=True)
class AttentionConfig:
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA: num_heads must be a multiple of it
    # Decoupled-Head Attention (DHA): key and value heads of each backbone layer, one entry per
    # layer; () = num_kv_heads in every layer (GQA, MHA when it equals num_heads). Query head h
    # reads key head h // (num_heads / k) and value head h // (num_heads / v). The MTP block keeps
    # num_kv_heads.
    k_heads: tuple[int, ...] = ()
    v_heads: tuple[int, ...] = ()
    fusion: HeadFusionConfig = field(default_factory=HeadFusionConfig)
    head_dim: int = 32
    rope_base: float = 1e6  # ERNIE5.md
    # Uni-RoPE: share of rotary frequency pairs given to the (t, h, w) axes. Not disclosed; we
    # follow the usual multimodal-RoPE split that gives time a quarter and the two spatial axes
    # the rest.
    rope_sections: tuple[float, float, float] = (0.25, 0.375, 0.375)
    # auto: on the CPU the CPU FlashMask op; on a GPU Paddle's flashmask_attention for fp16/bf16
    # (train.precision bf16/fp16) and the dense pure-Paddle reference for fp32 (ops/flashmask.py).
    backend: str = "auto"
    # Block-sparse prefill (ops/rr_attention.py): "rr" = RRAttention's block selection feeds the
    # FlashMask block_mask in inference forwards of several positions (gradients off and a KV cache
    # or the model in eval mode); training and decode steps stay dense. "none" = always dense.
    sparse_prefill: str = "none"
    rr_stride: int = 16  # query rows per stride; each head samples one of them (round-robin)
    rr_tau: float = 0.9  # per query block, keep key blocks until this share of the mass
    rr_block: int = 128  # selection block: a multiple of the op's 128 x 128 block_mask blocks
    # Heads sharing one block mask: "head" each query head its own, "kv" the query heads of one kv
    # head (their round-robin rows pooled), "all" every head. Not disclosed; "kv" matches the op's
    # GQA grouping.
    rr_mask_heads: str = "kv"
    rr_sink_blocks: int = (
        1  # leading key blocks always kept (attention sinks), besides the diagonal
    )
    # Not in RRAttention's description (ops/rr_attention.py): the last query blocks keep every
    # allowed key block (their last rows are what a prefill is read for; the strides' sampled rows
    # miss a single query's needle), and every query block keeps this many key blocks before its
    # diagonal (the local context next-token prediction leans on).
    rr_dense_last: int = 1
    rr_local_blocks: int = 2

    def validate(self, at: str) -> None:
        _check(at, "num_heads", self.num_heads, self.num_heads >= 1, ">= 1")
        _check(
            at,
            "num_kv_heads",
            self.num_kv_heads,
            self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
            f"a divisor of num_heads={self.num_heads}",
        )
        _check(
            at,
            "head_dim",
            self.head_dim,
            self.head_dim >= 2 and self.head_dim % 2 == 0,
            "an even number >= 2",
        )
        _check(at, "rope_base", self.rope_base, self.rope_base > 1, "> 1")
        _check(
            at,
            "rope_sections",
            self.rope_sections,
            len(self.rope_sections) == 3
            and all(s >= 0 for s in self.rope_sections)
            and abs(sum(self.rope_sections) - 1) < 1e-6,
            "three non-negative shares summing to 1",
        )
        _check(
            at,
            "backend",
            self.backend,
            self.backend in ("auto", "cpu", "reference", "paddle"),
            "one of auto, cpu, reference, paddle",
        )
        _check(
            at,
            "sparse_prefill",
            self.sparse_prefill,
            self.sparse_prefill in ("none", "rr"),
            "none (dense attention) or rr (RRAttention block-sparse prefill)",
        )
        _check(
            at,
            "rr_block",
            self.rr_block,
            self.rr_block >= _OP_BLOCK and self.rr_block % _OP_BLOCK == 0,
            f"a positive multiple of {_OP_BLOCK} (the FlashMask block_mask granularity)",
        )
        _check(
            at,
            "rr_stride",
            self.rr_stride,
            self.rr_stride >= 1 and self.rr_block % self.rr_stride == 0,
            f"a divisor of rr_block={self.rr_block} (each query block holds whole strides), "
            "e.g. 8, 16 or 32",
        )
        _check(at, "rr_tau", self.rr_tau, 0 < self.rr_tau <= 1, "0 < rr_tau <= 1")
        _check(
            at,
            "rr_mask_heads",
            self.rr_mask_heads,
            self.rr_mask_heads in ("head", "kv", "all"),
            "one of head, kv, all",
        )
        _check(at, "rr_sink_blocks", self.rr_sink_blocks, self.rr_sink_blocks >= 0, ">= 0")
        _check(at, "rr_dense_last", self.rr_dense_last, self.rr_dense_last >= 0, ">= 0")
        _check(at, "rr_local_blocks", self.rr_local_blocks, self.rr_local_blocks >= 0, ">= 0")
        h = self.num_heads
        for name in ("k_heads", "v_heads"):
            heads = getattr(self, name)
            _check(
                at,
                name,
                list(heads),
                all(k >= 1 and h % k == 0 for k in heads),
                f"divisors of num_heads={h}, one per layer ([] = num_kv_heads everywhere)",
            )
        self.fusion.validate(f"{at}.fusion")
        for name, targets in (("from_k", self.k_heads), ("from_v", self.v_heads)):
            src = getattr(self.fusion, name)
            targets = targets or (self.num_kv_heads,) * len(src)
            _check(
                f"{at}.fusion",
                name,
                list(src),
                len(src) in (0, len(targets))
                and all(s >= 1 and h % s == 0 and s % t == 0 for s, t in zip(src, targets)),
                f"per layer a divisor of num_heads={h} and a multiple of the layer's "
                f"{name[-1]}_heads {list(targets)}",
            )

    def key_heads(self, layer: int | None = None) -> int:
        """Key heads of backbone layer `layer` in the merged model (None: the MTP block)."""
        return self.k_heads[layer] if self.k_heads and layer is not None else self.num_kv_heads

    def value_heads(self, layer: int | None = None) -> int:
        """Value heads of backbone layer `layer` in the merged model (None: the MTP block)."""
        return self.v_heads[layer] if self.v_heads and layer is not None else self.num_kv_heads

    def computed_heads(self, layer: int | None = None) -> tuple[int, int]:
        """(key, value) heads layer `layer` computes and caches: the source's while a fusion is in
        progress (fusion.from_k / from_v), else key_heads / value_heads."""
        if self.fusion.active and layer is not None:
            return self.fusion.from_k[layer], self.fusion.from_v[layer]
        return self.key_heads(layer), self.value_heads(layer)

    def kv_cache_heads(self, num_layers: int) -> int:
        """Key plus value heads cached per token over the backbone's layers."""
        return sum(sum(self.computed_heads(i)) for i in range(num_layers))


@dataclass(frozen=True, kw_only=True)
class UniversalConfig:
    """Mixture of Universal Experts (MoUE, model/universal.py): ONE pool of `moe.num_experts`
    experts shared by every MoE layer instead of a pool per layer. MoE layer j (the j-th MoE layer,
    dense layers not counted) routes over a window of `window` consecutive pool experts starting
    at (j * stride) mod num_experts, wrapping around the pool (staggered rotational topology).
    The paper (Chen et al., 2026, "Mixture of Universal Experts") names the three parts; the
    details below that it does not disclose are our choices, each a field."""

    enabled: bool = False
    window: int = 0  # experts one MoE layer reaches; 0 = half the pool
    stride: int = 0  # window start step between consecutive MoE layers; 0 = window // 2
    # Explicit window start per MoE layer (overrides stride); written by export and by
    # `ernie5 convert-moue`, whose windows are centred on each layer's own experts.
    starts: tuple[int, ...] = ()
    # Universal router: width D of a per-token trajectory state carried from MoE layer to MoE
    # layer, s' = tanh(s A + sum_k w_k emb[e_k]) (emb: a D-vector per pool expert, w_k the combine
    # weights), mixed into each router's logits through a zero-initialised [D, window] projection
    # (so a converted model starts with its source's routing). 0 = routers see x only.
    trajectory_dim: int = 16
    # universal: the aux-free bias of each layer window steers towards exposure-corrected targets
    # (every pool expert gets the same total load over the depth, each layer keeping its own
    # total; targets by iterative proportional fitting); window: a uniform load inside each
    # window, as a standard MoE layer balances.
    balance: str = "universal"
    # Window slots a conversion added start closed (a large negative offset on their router logit
    # and selection score); after every optimizer step the offset is multiplied by open_decay, so
    # they open progressively. Slots of a model built from scratch are open from the start.
    open_decay: float = 0.9

    def window_size(self, num_experts: int) -> int:
        return self.window or max(1, num_experts // 2)

    def window_starts(self, num_moe_layers: int, num_experts: int) -> tuple[int, ...]:
        """Start of each MoE layer's window in the pool (the window wraps around)."""
        if self.starts:
            return tuple(self.starts)
        stride = self.stride or max(1, self.window_size(num_experts) // 2)
        return tuple((j * stride) % num_experts for j in range(num_moe_layers))

    def validate(self, at: str, moe: MoEConfig) -> None:
        if not self.enabled:
            return
        e = moe.num_experts
        _check(
            at,
            "window",
            self.window,
            self.window == 0 or moe.top_k <= self.window <= e,
            f"0 (half the pool) or top_k={moe.top_k} <= window <= num_experts={e}",
        )
        _check(
            at,
            "window",
            self.window,
            self.window_size(e) >= moe.top_k,
            f"a window of at least top_k={moe.top_k} experts (0 = half the pool of {e})",
        )
        _check(at, "stride", self.stride, self.stride >= 0, ">= 0 (0 = window // 2)")
        _check(
            at,
            "starts",
            list(self.starts),
            all(0 <= s < e for s in self.starts),
            f"pool indices 0..{e - 1}, one per MoE layer ([] = the rotation by stride)",
        )
        _check(at, "trajectory_dim", self.trajectory_dim, self.trajectory_dim >= 0, ">= 0")
        _check(
            at,
            "balance",
            self.balance,
            self.balance in ("universal", "window"),
            "universal (exposure-corrected) or window (uniform per window)",
        )
        _check(at, "open_decay", self.open_decay, 0 <= self.open_decay <= 1, "0..1")
        _check(
            at.rsplit(".", 1)[0],
            "capacity_factor",
            moe.capacity_factor,
            moe.capacity_factor == 0,
            "0 (dropless) with a universal expert pool",
        )

    def validate_layers(self, at: str, num_moe_layers: int, num_experts: int) -> None:
        """The windows against the depth: one start per MoE layer, and every pool expert reached
        by some window (an expert no layer reaches would be dead weight)."""
        if not self.enabled:
            return
        _check(
            at,
            "starts",
            list(self.starts),
            len(self.starts) in (0, num_moe_layers),
            f"one start per MoE layer ({num_moe_layers}) or []",
        )
        w = self.window_size(num_experts)
        starts = self.window_starts(num_moe_layers, num_experts)
        reached = {(s + i) % num_experts for s in starts for i in range(w)}
        missing = sorted(set(range(num_experts)) - reached)
        _check(
            at,
            "window",
            self.window,
            not missing,
            f"windows that together reach the whole pool: with {num_moe_layers} MoE layers, "
            f"window {w} and starts {list(starts)} "
            f"experts {missing[:8]}{'...' if len(missing) > 8 else ''} are never reached; "
            "raise window or stride, or shrink num_experts",
        )


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    num_experts: int = 32  # ONE pool shared by every modality (ERNIE5.md)
    top_k: int = 4
    expert_hidden: int = 128  # fine-grained SwiGLU experts
    num_shared_experts: int = 1
    shared_expert_hidden: int = 128
    first_dense_layers: int = 0  # layers before this index use a dense SwiGLU instead of MoE
    # Width of those dense SwiGLUs (and of the MTP block's); 0 = top_k * expert_hidden + shared
    # width, the activated width of an MoE layer.
    dense_hidden: int = 0
    score_func: str = "softmax"  # router scores; top-k weights are renormalised to sum to 1
    bias_update_rate: float = 1e-3  # aux-free balancing; the paper uses 1e-4 at scale
    aux_loss_weight: float = 0.0  # optional sequence-level balance loss
    z_loss_weight: float = 0.0  # optional router z-loss
    capacity_factor: float = 0.0  # 0 = dropless (the default and the paper's choice)
    # Routed experts (paddle_ernie5/ops/moe_experts.py): cpu_op = the C++ op (token rows by index,
    # no padded grid), grouped = batched matmuls over an [E, C, M] grid; auto = cpu_op for CPU
    # tensors, grouped on a GPU. Expert-parallel dispatchers always use grouped.
    expert_backend: str = "auto"
    # One pool shared by every MoE layer (num_experts is then the pool's size), off by default.
    universal: UniversalConfig = field(default_factory=UniversalConfig)

    def dense_width(self) -> int:
        return self.dense_hidden or (
            self.top_k * self.expert_hidden + self.num_shared_experts * self.shared_expert_hidden
        )

    def validate(self, at: str) -> None:
        _check(at, "num_experts", self.num_experts, self.num_experts >= 1, ">= 1")
        _check(
            at,
            "top_k",
            self.top_k,
            1 <= self.top_k <= self.num_experts,
            f"1 <= top_k <= num_experts={self.num_experts}",
        )
        _check(at, "expert_hidden", self.expert_hidden, self.expert_hidden >= 1, ">= 1")
        _check(
            at, "num_shared_experts", self.num_shared_experts, self.num_shared_experts >= 0, ">= 0"
        )
        _check(
            at,
            "shared_expert_hidden",
            self.shared_expert_hidden,
            self.shared_expert_hidden >= 1,
            ">= 1",
        )
        _check(
            at, "first_dense_layers", self.first_dense_layers, self.first_dense_layers >= 0, ">= 0"
        )
        _check(at, "dense_hidden", self.dense_hidden, self.dense_hidden >= 0, ">= 0 (0 = derived)")
        _check(
            at,
            "score_func",
            self.score_func,
            self.score_func in ("softmax", "sigmoid"),
            "softmax or sigmoid",
        )
        _check(at, "bias_update_rate", self.bias_update_rate, self.bias_update_rate >= 0, ">= 0")
        _check(at, "aux_loss_weight", self.aux_loss_weight, self.aux_loss_weight >= 0, ">= 0")
        _check(at, "z_loss_weight", self.z_loss_weight, self.z_loss_weight >= 0, ">= 0")
        _check(
            at,
            "capacity_factor",
            self.capacity_factor,
            self.capacity_factor == 0 or self.capacity_factor >= 1,
            "0 (dropless) or >= 1",
        )
        _check(
            at,
            "expert_backend",
            self.expert_backend,
            self.expert_backend in ("auto", "cpu_op", "grouped"),
            "one of auto, cpu_op, grouped",
        )
        self.universal.validate(f"{at}.universal", self)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 4096  # text BPE vocabulary; the tokenizer is trained to this size
    hidden_size: int = 128
    num_layers: int = 4
    max_seq_len: int = 256
    rms_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    num_mtp_modules: int = 1  # DeepSeek-V3 style multi-token prediction depth
    mtp_loss_weight: float = 0.3  # ERNIE5.md: 0.3 in the first stage
    modalities: tuple[str, ...] = ("text",)
    # RMSNorm, RoPE on q and k, SwiGLU and the output projection + cross-entropy through the fused
    # C++ CPU ops (custom_ops/fused, custom_ops/linear_ce; paddle_ernie5/ops/fused.py,
    # ops/linear_ce.py) when the device is the CPU and the math float32; false, a GPU or the bf16
    # emulation use the pure-Paddle reference of each op (same results to float32 rounding).
    fused_ops: bool = True
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    audio: AudioModelConfig = field(default_factory=AudioModelConfig)
    vision: VisionModelConfig = field(default_factory=VisionModelConfig)

    def validate(self, at: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "max_seq_len"):
            _check(at, name, getattr(self, name), getattr(self, name) >= 1, ">= 1")
        _check(
            at, "num_mtp_modules", self.num_mtp_modules, self.num_mtp_modules in (0, 1), "0 or 1"
        )
        _check(at, "mtp_loss_weight", self.mtp_loss_weight, self.mtp_loss_weight >= 0, ">= 0")
        _check(
            at,
            "modalities",
            self.modalities,
            len(self.modalities) > 0 and set(self.modalities) <= set(MODALITIES),
            f"a non-empty subset of {list(MODALITIES)}",
        )
        _check(
            at,
            "moe.first_dense_layers",
            self.moe.first_dense_layers,
            self.moe.first_dense_layers <= self.num_layers,
            f"<= num_layers={self.num_layers}",
        )
        a = self.attention
        for name, heads in (
            ("attention.k_heads", a.k_heads),
            ("attention.v_heads", a.v_heads),
            ("attention.fusion.from_k", a.fusion.from_k),
            ("attention.fusion.from_v", a.fusion.from_v),
        ):
            _check(
                at,
                name,
                list(heads),
                len(heads) in (0, self.num_layers),
                f"one entry per layer (num_layers={self.num_layers}) or []",
            )
        self.attention.validate(f"{at}.attention")
        self.moe.validate(f"{at}.moe")
        self.moe.universal.validate_layers(
            f"{at}.moe.universal",
            self.num_layers - self.moe.first_dense_layers,
            self.moe.num_experts,
        )
        self.audio.validate(f"{at}.audio")
        self.vision.validate(f"{at}.vision")

    @property
    def multimodal(self) -> bool:
        return tuple(self.modalities) != ("text",)

    @property
    def text_vocab(self) -> int:
        """Rows of the text embedding and text head: the BPE vocabulary plus, in a multimodal
        model, the modality delimiters (SPECIAL_TOKENS: <boi> <eoi> <bov> <eov> <boa> <eoa>)."""
        return self.vocab_size + (len(SPECIAL_TOKENS) if self.multimodal else 0)
