"""Training objective: text next-token loss, MTP loss and the optional router losses.

Labels use -100 for positions without a target (document ends, padding).
"""

from __future__ import annotations

from dataclasses import dataclass

import paddle
import paddle.nn.functional as F

from ..config import ModelConfig
from ..model.model import ModelOutput

IGNORE = -100


def mtp_labels(labels_BS):
    """Target of MTP at position i is the token after i+1: labels[i+1], if i has a target at all."""
    shifted = paddle.concat([labels_BS[:, 1:], paddle.full_like(labels_BS[:, :1], IGNORE)], axis=1)
    return paddle.where(labels_BS == IGNORE, labels_BS, shifted)


def token_cross_entropy(logits_BSV, labels_BS):
    """Mean cross-entropy over positions with a target (fp32), and the number of such positions."""
    v = logits_BSV.shape[-1]
    losses = F.cross_entropy(logits_BSV.reshape([-1, v]).astype("float32"), labels_BS.reshape([-1, 1]),
                             ignore_index=IGNORE, reduction="none").reshape([-1])
    valid = (labels_BS.reshape([-1]) != IGNORE).astype("float32")
    count = valid.sum()
    return (losses * valid).sum() / paddle.clip(count, min=1.0), count


@dataclass
class LossParts:
    total: paddle.Tensor
    text: paddle.Tensor
    mtp: paddle.Tensor | None
    aux: paddle.Tensor
    z: paddle.Tensor
    num_targets: paddle.Tensor


def compute_loss(out: ModelOutput, labels_BS, cfg: ModelConfig) -> LossParts:
    text, count = token_cross_entropy(out.logits, labels_BS)
    total = text
    mtp = None
    if out.mtp_logits is not None:
        mtp, _ = token_cross_entropy(out.mtp_logits, mtp_labels(labels_BS))
        total = total + cfg.mtp_loss_weight * mtp
    zero = paddle.zeros([], dtype="float32")
    aux = sum((s.aux_loss for s in out.router_stats.values()), zero)
    z = sum((s.z_loss for s in out.router_stats.values()), zero)
    if cfg.moe.aux_loss_weight > 0:
        total = total + cfg.moe.aux_loss_weight * aux
    if cfg.moe.z_loss_weight > 0:
        total = total + cfg.moe.z_loss_weight * z
    return LossParts(total, text, mtp, aux, z, count)
