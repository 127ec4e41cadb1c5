"""Training objective: text next-token loss, MTP loss, the modality heads' losses (visual bits,
audio codes; model.head_losses) and the optional router losses.

The text and MTP losses come from the logits when the forward formed them (or a reader already
read them), and otherwise straight from the hidden states through the fused output projection +
cross-entropy op (`head_cross_entropy`; model.ModelOutput defers the logits when that op may run),
so training never holds [B, S, V] float32 logits.

Labels use -100 for positions without a target (document ends, padding).

SimReg (train.simreg), a contrastive term on the final hidden states, is added by the trainer: it
needs anchors drawn per step (`sample_anchors`) and is not part of the evaluation loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn.functional as F

from ..config import ModelConfig
from ..ops.linear_ce import linear_cross_entropy
from .model import ModelOutput

IGNORE = -100


def mtp_labels(labels_BS):
    """Target of MTP at position i is the token after i+1: labels[i+1], if i has a target at all."""
    shifted = paddle.concat([labels_BS[:, 1:], paddle.full_like(labels_BS[:, :1], IGNORE)], axis=1)
    return paddle.where(labels_BS == IGNORE, labels_BS, shifted)


def _mean_over_targets(losses_N, labels_BS):
    valid = (labels_BS.reshape([-1]) != IGNORE).astype("float32")
    count = valid.sum()
    return (losses_N * valid).sum() / paddle.clip(count, min=1.0), count


def token_cross_entropy(logits_BSV, labels_BS):
    """Mean cross-entropy over positions with a target (fp32), and the number of such positions."""
    v = logits_BSV.shape[-1]
    losses = F.cross_entropy(
        logits_BSV.reshape([-1, v]).astype("float32"),
        labels_BS.reshape([-1, 1]),
        ignore_index=IGNORE,
        reduction="none",
    ).reshape([-1])
    return _mean_over_targets(losses, labels_BS)


def head_cross_entropy(text_head, h_BSM, labels_BS, fused: bool = True):
    """`token_cross_entropy(text_head(h_BSM), labels_BS)` without forming the logits when the fused
    output projection + cross-entropy op may run (ops/linear_ce.py); the reference otherwise."""
    m = h_BSM.shape[-1]
    weight, transposed = text_head.weight_layout()
    losses = linear_cross_entropy(
        h_BSM.reshape([-1, m]), weight, labels_BS.reshape([-1]), transposed, fused
    )
    return _mean_over_targets(losses, labels_BS)


def _text_loss(out: ModelOutput, labels_BS, cfg: ModelConfig, mtp: bool):
    # Logits already read (or never deferred) are used as they are; unread ones are not formed.
    deferred = out.unread_head_input(mtp)
    if deferred is None:
        return token_cross_entropy(out.mtp_logits if mtp else out.logits, labels_BS)
    text_head, h_BSM = deferred
    return head_cross_entropy(text_head, h_BSM, labels_BS, cfg.fused_ops)


@dataclass
class LossParts:
    total: paddle.Tensor
    text: paddle.Tensor
    mtp: paddle.Tensor | None
    aux: paddle.Tensor
    z: paddle.Tensor
    num_targets: paddle.Tensor
    heads: dict = field(default_factory=dict)  # loss name -> (mean loss, number of targets, weight)


def compute_loss(
    out: ModelOutput, labels_BS, cfg: ModelConfig, heads: dict | None = None
) -> LossParts:
    """`heads`: model.head_losses(out, batch) for a multimodal batch; each adds weight x mean
    loss."""
    text, count = _text_loss(out, labels_BS, cfg, mtp=False)
    total = text
    heads = heads or {}
    for loss, _, weight in heads.values():
        total = total + weight * loss
    mtp = None
    if out.has_mtp:
        mtp, _ = _text_loss(out, mtp_labels(labels_BS), cfg, mtp=True)
        total = total + cfg.mtp_loss_weight * mtp
    zero = paddle.zeros([], dtype="float32")
    aux = sum((s.aux_loss for s in out.router_stats.values()), zero)
    z = sum((s.z_loss for s in out.router_stats.values()), zero)
    if cfg.moe.aux_loss_weight > 0:
        total = total + cfg.moe.aux_loss_weight * aux
    if cfg.moe.z_loss_weight > 0:
        total = total + cfg.moe.z_loss_weight * z
    return LossParts(total, text, mtp, aux, z, count, heads)


def distillation_kl(student_logits_BSV, teacher_logits_BSV, labels_BS):
    """Mean over the positions with a text target of KL(teacher || student) of the next-token
    distributions; the teacher is detached (in-place distillation of an elastic sub-model)."""
    valid = (labels_BS != IGNORE).astype("float32")
    log_s = F.log_softmax(student_logits_BSV.astype("float32"), axis=-1)
    log_t = F.log_softmax(teacher_logits_BSV.detach().astype("float32"), axis=-1)
    kl = (paddle.exp(log_t) * (log_t - log_s)).sum(-1)
    return (kl * valid).sum() / paddle.clip(valid.sum(), min=1.0)


# ------------------------------------------------------------------ SimReg


def document_ids(startend_row_indices):
    """[B, S] document id of every position: FlashMask's first column (LTS, the row where the
    position's document ends) is shared by exactly the positions of one document."""
    return startend_row_indices[:, 0, :, 0]


def sample_anchors(labels_BS: np.ndarray, max_anchors: int, rng: np.random.Generator) -> np.ndarray:
    """[B, A] SimReg anchors: per row up to A = min(max_anchors, S) positions that have a target,
    drawn without replacement from `rng`, ascending, padded with -1."""
    labels_BS = np.asarray(labels_BS)
    a = min(max_anchors, labels_BS.shape[1])
    out = np.full((labels_BS.shape[0], a), -1, dtype=np.int64)
    for b, row in enumerate(labels_BS):
        valid = np.flatnonzero(row != IGNORE)
        pick = valid if len(valid) <= a else np.sort(rng.choice(valid, a, replace=False))
        out[b, : len(pick)] = pick
    return out


def simreg_loss(hidden_BSD, labels_BS, doc_BS, anchors_BA, temperature: float):
    """Supervised-contrastive loss over sampled anchors. Returns (sum of the per-anchor losses,
    number of anchors with at least one positive); the SimReg value is their ratio.

        anchors_BA ──gather──> h_BAD ──cosine / temperature──> sim_BAS
                                                       (each anchor vs its whole row)
        candidates_BAS = same document, position has a target, not the anchor itself
        positives_BAS  = candidates whose next-token label equals the anchor's
        loss(anchor)   = -mean over positives of log softmax over candidates of sim

    Cost is O(S * A) per sequence. Anchors without a positive contribute nothing (and no
    gradient)."""
    b, s, d = hidden_BSD.shape
    h_BSD = F.normalize(hidden_BSD.astype("float32"), axis=-1)
    anchor_ok_BA = anchors_BA >= 0
    idx_BA = paddle.clip(anchors_BA, min=0)
    flat_idx = (idx_BA + paddle.arange(b, dtype=idx_BA.dtype).unsqueeze(1) * s).reshape([-1])
    h_BAD = paddle.gather(h_BSD.reshape([b * s, d]), flat_idx).reshape([b, -1, d])
    label_BA = paddle.take_along_axis(labels_BS, idx_BA, axis=1)
    doc_BA = paddle.take_along_axis(doc_BS.astype("int64"), idx_BA, axis=1)
    sim_BAS = paddle.matmul(h_BAD, h_BSD, transpose_y=True) / temperature
    not_self_BAS = paddle.arange(s, dtype=idx_BA.dtype).reshape([1, 1, s]) != idx_BA.unsqueeze(-1)
    cand_BAS = (
        (doc_BA.unsqueeze(-1) == doc_BS.astype("int64").unsqueeze(1))
        & (labels_BS != IGNORE).unsqueeze(1)
        & not_self_BAS
        & anchor_ok_BA.unsqueeze(-1)
    )
    pos_BAS = cand_BAS & (label_BA.unsqueeze(-1) == labels_BS.unsqueeze(1))
    # A large finite fill (not -inf) keeps rows without candidates finite in value and gradient.
    masked_BAS = paddle.where(cand_BAS, sim_BAS, paddle.full_like(sim_BAS, -1e9))
    logp_BAS = masked_BAS - paddle.logsumexp(masked_BAS, axis=-1, keepdim=True)
    npos_BA = pos_BAS.astype("float32").sum(-1)
    pos_logp_BA = paddle.where(pos_BAS, logp_BAS, paddle.zeros_like(logp_BAS)).sum(-1)
    per_anchor_BA = -pos_logp_BA / paddle.clip(npos_BA, min=1.0)
    has_pos_BA = (npos_BA > 0).astype("float32")
    return (per_anchor_BA * has_pos_BA).sum(), has_pos_BA.sum()
