"""RL objectives: GRPO advantages, GSPO with a token-level IcePop mask (MISC), WPSM, KL, entropy.

Legend: B responses in a batch, N response positions (right-padded), V vocabulary.

    rollout logp ─┐
    old logp ─────┴─ IcePop: m_t = [low <= pi_old/pi_rollout <= high]  (token level, detached)
    new logp, old logp, m ─ GSPO: s_i = exp(sum_t m_t (new - old) / sum_t m_t)
    s_i, A_i ─ loss_i = -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) * w_i  (w: WPSM)

Masking tokens rather than whole sequences keeps the rest of a long response learning; the paper
reports that sequence-level masking collapsed entropy. "old" is the training engine's log-prob under
the weights before this group's first update, "rollout" is what the sampler reported: their ratio
measures the train/rollout mismatch (numerics, routing, staleness of background rollouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F


def grpo_advantages(rewards_QG: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Group-normalised advantages (r - mean) / (std + eps) per query (row); equal rewards give
    0."""
    r = np.asarray(rewards_QG, dtype=np.float64)
    adv = (r - r.mean(axis=1, keepdims=True)) / (r.std(axis=1, keepdims=True) + eps)
    return adv.astype(np.float32)


def icepop_mask(
    old_logp_BN: np.ndarray,
    rollout_logp_BN: np.ndarray,
    valid_BN: np.ndarray,
    low: float,
    high: float,
) -> np.ndarray:
    """Token mask: keep a valid token when pi_old / pi_rollout lies in [low, high]."""
    ratio = np.exp(np.asarray(old_logp_BN, np.float64) - np.asarray(rollout_logp_BN, np.float64))
    return np.asarray(valid_BN, bool) & (ratio >= low) & (ratio <= high)


def gspo_ratio(new_logp_BN, old_logp_BN, mask_BN):
    """Sequence-level importance ratio exp(mean over kept tokens of log(pi_new / pi_old)); 1 where
    a sequence keeps no token (it then carries no gradient)."""
    m = mask_BN.astype("float32")
    count = paddle.clip(m.sum(axis=1), min=1.0)
    return paddle.exp(((new_logp_BN - old_logp_BN) * m).sum(axis=1) / count)


@dataclass
class GSPOOut:
    loss: paddle.Tensor
    clip_low_frac: float  # sequences whose ratio was clipped from below (A < 0) / sequences used
    clip_high_frac: float


def gspo_loss(ratio_B, adv_B, weight_B, used_B, clip_low: float, clip_high: float) -> GSPOOut:
    """Clipped sequence-level surrogate, weighted (WPSM) and averaged over the sequences used."""
    adv = paddle.to_tensor(adv_B, dtype="float32")
    w = paddle.to_tensor(np.asarray(weight_B, np.float32) * np.asarray(used_B, np.float32))
    clipped = paddle.clip(ratio_B, 1.0 - clip_low, 1.0 + clip_high)
    per_seq = -paddle.minimum(ratio_B * adv, clipped * adv)
    loss = (per_seq * w).sum() / max(float(np.sum(used_B)), 1.0)
    r = ratio_B.numpy()
    a = np.asarray(adv_B)
    n = max(int(np.sum(used_B)), 1)
    used = np.asarray(used_B, bool)
    return GSPOOut(
        loss,
        float(np.sum(used & (a < 0) & (r < 1 - clip_low))) / n,
        float(np.sum(used & (a > 0) & (r > 1 + clip_high))) / n,
    )


def wpsm_weights(
    running_acc_B: np.ndarray, entropy_B: np.ndarray, tau: float, eta: float, alpha: float
) -> np.ndarray:
    """(1 - alpha) for low-entropy responses to queries the policy already solves, 1 otherwise."""
    damp = (np.asarray(running_acc_B) > tau) & (np.asarray(entropy_B) < eta)
    return np.where(damp, 1.0 - alpha, 1.0).astype(np.float32)


def k3_kl(new_logp_BN, ref_logp_BN, mask_BN):
    """Per-token k3 estimator of KL(pi_new || pi_ref), averaged over kept tokens (non-negative)."""
    d = ref_logp_BN - new_logp_BN
    m = mask_BN.astype("float32")
    return ((paddle.exp(d) - d - 1.0) * m).sum() / paddle.clip(m.sum(), min=1.0)


def response_logp_entropy(logits_BSV, targets_BN, start_B: np.ndarray, temperature: float):
    """Log-prob of each response token and the policy entropy at its position.

    Response token j of row b is predicted at position start_B[b] - 1 + j (start = prompt
    length)."""
    b, n = targets_BN.shape
    pos = (np.asarray(start_B)[:, None] - 1 + np.arange(n)[None, :]).clip(
        max=logits_BSV.shape[1] - 1
    )
    idx = paddle.to_tensor(np.stack([np.repeat(np.arange(b), n), pos.reshape(-1)], axis=1))
    logits_TV = paddle.gather_nd(logits_BSV, idx).astype("float32") / temperature
    logp_TV = F.log_softmax(logits_TV, axis=-1)
    tgt = paddle.to_tensor(np.asarray(targets_BN, np.int64).reshape([-1, 1]))
    logp = paddle.take_along_axis(logp_TV, tgt, axis=-1).reshape([b, n])
    entropy = -(paddle.exp(logp_TV) * logp_TV).sum(axis=-1).reshape([b, n])
    return logp, entropy
