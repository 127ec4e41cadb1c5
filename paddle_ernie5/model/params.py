"""Parameter counts from a config alone (no paddle import, no allocation): any size, any recipe."""

from __future__ import annotations

from ..config import ModelConfig
from ..config.modalities import CAPTION_CLASSES


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the model `cfg` describes.

    total: every parameter, MTP included. activated: parameters one text token touches in inference
    (backbone with top_k of the experts, the text embedding row excluded, MTP excluded; a universal
    pool's trajectory recurrence and the embeddings of the k experts each MoE layer picks
    included). experts: the routed experts (a universal pool's once)."""
    m, v, l = cfg.hidden_size, cfg.text_vocab, cfg.num_layers
    moe = cfg.moe
    norms = 2 * m
    expert = 3 * m * moe.expert_hidden
    shared = 3 * m * moe.shared_expert_hidden * moe.num_shared_experts
    dense_ffn = 3 * m * moe.dense_width()
    n_moe = l - moe.first_dense_layers
    n_dense = moe.first_dense_layers
    moe_layer_total = m * moe.num_experts + moe.num_experts * expert + shared
    moe_layer_active = m * moe.num_experts + moe.top_k * expert + shared
    pool_total = pool_active = 0
    if moe.universal.enabled:  # routers over a window; the experts counted once, in the pool
        w, d = moe.universal.window_size(moe.num_experts), moe.universal.trajectory_dim
        moe_layer_total = (m + d) * w + shared
        moe_layer_active = (m + d) * w + moe.top_k * expert + shared
        pool_total = universal_pool_params(cfg)
        pool_active = d * d + n_moe_layers(cfg) * moe.top_k * d
    embed = v * m
    head = 0 if cfg.tie_embeddings else v * m
    mtp = (
        (2 * m + 2 * m * m + attention_params(cfg) + norms + dense_ffn + m)
        if cfg.num_mtp_modules
        else 0
    )
    attn = sum(attention_params(cfg, i) for i in range(l))
    backbone_common = attn + l * norms + n_dense * dense_ffn + m
    total = embed + head + backbone_common + n_moe * moe_layer_total + mtp + pool_total
    activated = (
        head
        + backbone_common
        + n_moe * moe_layer_active
        + pool_active
        + (embed if cfg.tie_embeddings else 0)
    )
    if "audio" in cfg.modalities:
        total += audio_params(cfg)
    for kind in ("image", "video"):
        if kind in cfg.modalities:
            total += vision_embedding_params(cfg, kind)
    if "image" in cfg.modalities or "video" in cfg.modalities:
        total += vision_head_params(cfg)
    return {
        "total": total,
        "activated": activated,
        "embedding": embed,
        "experts": (1 if moe.universal.enabled else n_moe) * moe.num_experts * expert,
    }


def n_moe_layers(cfg: ModelConfig) -> int:
    return cfg.num_layers - cfg.moe.first_dense_layers


def universal_pool_params(cfg: ModelConfig) -> int:
    """The universal expert pool (model/universal.py): its experts, the per-expert trajectory
    embeddings and the state recurrence; 0 for a standard MoE."""
    moe = cfg.moe
    if not moe.universal.enabled:
        return 0
    d = moe.universal.trajectory_dim
    return moe.num_experts * (3 * cfg.hidden_size * moe.expert_hidden + d) + d * d


def attention_params(cfg: ModelConfig, layer: int | None = None) -> int:
    """Attention of backbone layer `layer` (None: the MTP block): the qkv projection over its key
    and value heads (model.attention.k_heads / v_heads; while a conversion fuses heads, the
    source's heads and the fusion weights) and the output projection."""
    a, m = cfg.attention, cfg.hidden_size
    kh, vh = a.computed_heads(layer)
    params = m * (a.num_heads + kh + vh) * a.head_dim + a.num_heads * a.head_dim * m
    f = a.fusion
    if layer is not None and f.active and f.weights == "learned":
        d = a.head_dim
        for src, tgt, subspace in ((kh, a.key_heads(layer), d), (vh, a.value_heads(layer), d * d)):
            # head: [T, G, G]; subspace: C and N, [T, G, D/2, 2] (keys) or [T, G, D, D] (values)
            params += src * (src // tgt) if f.granularity == "head" else 2 * src * subspace
    return params


def audio_params(cfg: ModelConfig) -> int:
    return audio_embedding_params(cfg) + audio_head_params(cfg)


def audio_embedding_params(cfg: ModelConfig) -> int:
    """model/audio.py: per-level code tables and the projection to the model width."""
    a = cfg.audio
    return a.levels * a.codebook_size * a.embed_dim + a.embed_dim * cfg.hidden_size


def audio_head_params(cfg: ModelConfig) -> int:
    """model/audio.py: per level RMSNorm + MLP (level 0 has the extra <eoa> class) and the code
    embeddings added between levels."""
    a, m, h = cfg.audio, cfg.hidden_size, cfg.audio.head_hidden
    outs = 0
    for level in range(a.levels):
        k = a.codebook_size + (1 if level == 0 else 0)
        outs += m + ((m * h + h + h * k + k) if h else (m * k + k))
    return outs + (a.levels - 1) * a.codebook_size * m


def modality_params(cfg: ModelConfig) -> tuple[int, int]:
    """(input side, output side) parameters of the non-text modalities; pipeline stages put them
    with the embedding and with the head."""
    mods = set(cfg.modalities)
    inputs = sum(vision_embedding_params(cfg, k) for k in ("image", "video") if k in mods)
    heads = vision_head_params(cfg) if mods & {"image", "video"} else 0
    if "audio" in mods:
        inputs, heads = inputs + audio_embedding_params(cfg), heads + audio_head_params(cfg)
    return inputs, heads


def vision_embedding_params(cfg: ModelConfig, kind: str) -> int:
    """model/vision.py: bits -> width, scale table, the patch merger of one visual modality and its
    group-place table (and the cell table, cell_embedding; the pooled caption table,
    caption_pooling; the clips' temporal context projection, temporal_context)."""
    v, m, d = cfg.vision, cfg.hidden_size, cfg.vision.merger_width
    group = v.merge**2 * (v.merge_frames if kind == "video" else 1)
    channels = v.bits * (2 if kind == "video" and v.merger_motion and v.merge_frames > 1 else 1)
    merger = (
        (channels * d + d)
        + group * d
        + 4 * d
        + (3 * d * d + 3 * d)
        + (d * d + d)
        + (2 * d * d + 2 * d)
        + (2 * d * d + d)
        + (d * m + m)
    )
    place = v.merged_places(kind) * m if v.merger_position else 0
    place += v.merged_places(kind) * d * m if v.merger_place_projection else 0
    cells = v.generation_cells(kind) * m if v.cell_embedding else 0
    cells += (cfg.vocab_size + 1) * m if v.caption_pooling else 0  # pooled caption table
    cells += v.temporal_context_width * m if kind == "video" else 0  # temporal context, no bias
    return (v.bits * m + m) + (len(v.scales) + 1) * m + merger + place + cells


def vision_head_params(cfg: ModelConfig) -> int:
    """model/vision.py: RMSNorm + MLP (or linear) to per-bit logits, shared by image and video (and
    the linear shape head, shape_loss_weight > 0, and caption heads, caption_loss_weight > 0)."""
    v, m, h = cfg.vision, cfg.hidden_size, cfg.vision.head_hidden
    aux = m + 1 if v.shape_loss_weight > 0 else 0
    aux += (m + 1) * sum(n for _, n in CAPTION_CLASSES) if v.caption_loss_weight > 0 else 0
    return m + ((m * h + h + h * v.bits + v.bits) if h else (m * v.bits + v.bits)) + aux
