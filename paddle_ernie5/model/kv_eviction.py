"""KV-cache eviction once at the end of the prefill: NACL and two baselines (`generate.kv_policy`).

Legend: B batch, S prefill rows, P prompt positions in the cache, H query heads, K kv heads,
G = H / K, D head dim, n proxy tokens, N kept keys per (row, kv head).

    prefill, layer l: attention over all P keys (dense or block-sparse), then
      cache.end_prefill(q) -> KVEviction.keep_indices(l, q, keys) -> keep_BKN -> the cache keeps
      those keys and values (their RoPE rotation unchanged) and frees the rest
    decode steps: attention over the N kept keys and the new ones; positions continue from the
      prompt's true length (generation.py computes them, not the cache length)

Budget: N = ceil(kv_budget * P) keys per layer and kv head, kv_budget read as the decimal it was
written as (0.1 * 30 keeps exactly 3, not ceil(3.0000000000000004) = 4); at least 1.

Eviction groups: one set of kept positions per batch row, layer and eviction group, shared by the
query heads of the group. With as many key as value heads (GQA, MHA) a group is one kv head and its
query heads. With differing counts Kk != Kv (Decoupled-Head Attention) a query head's attention
needs the keys and the values of the same positions, so a group must hold whole key groups and
whole value groups: the E = gcd(Kk, Kv) runs of H / E consecutive query heads, each with Kk / E key
heads and Kv / E value heads that all keep the group's positions (`gather_kept` repeats a group's
positions over its heads). Scores (nacl) are summed over the group's query heads.

Policies:
  nacl    NACL (Chen et al., ACL 2024): proxy-token eviction + random eviction. The last
          `nacl_proxy_tokens` prompt positions are proxies (the question of a long-context prompt);
          score_c = the attention key c receives from the proxies, summed over the proxies and over
          the G query heads of the kv head (softmax rows over the causally visible keys). The
          proxies themselves are kept (the most recent N if there are more than N); of the budget
          left, r, floor(nacl_random_share * r) keys are drawn at random and the rest are the
          top-scored keys (ties: the earlier position). The random keep draws, without
          replacement, from the keys neither kept as proxies nor as top keys with probability
          proportional to exp(score) (as NACL's released code samples from softmax(score)),
          independently per (layer, row, kv head) from a generator seeded by (nacl_seed, layer).
  recent  the last N positions of the prompt (a recency window).
  random  N positions drawn uniformly without replacement per (row, kv head), seeded as above.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import paddle
import paddle.nn.functional as F

from ..config.generate import GenerateConfig


def _exact(x: float) -> Fraction:
    """A config fraction as the decimal it was written as (repr is the shortest round-trip)."""
    return Fraction(repr(float(x)))


def kept_count(budget: float, p: int) -> int:
    """N = ceil(budget * P) keys kept of P (at least 1)."""
    return max(1, math.ceil(_exact(budget) * p))


def proxy_scores(
    q_BSHD, k_BPKD, n_proxy: int, softmax_scale: float, groups: int | None = None
) -> np.ndarray:
    """score_BEP (float64): the attention each key receives from the last `n_proxy` query rows,
    summed over them and over the query heads of its eviction group (`groups` E, a divisor of the
    key heads K; default K: one group per kv head). Query row i of S is position P - S + i; a
    proxy sees the keys up to its own position."""
    b, s, h, d = q_BSHD.shape
    p, kh = k_BPKD.shape[1], k_BPKD.shape[2]
    n = min(n_proxy, s)
    g = h // kh
    q_BKRD = q_BSHD[:, s - n :].transpose([0, 2, 1, 3]).reshape([b, kh, g * n, d])
    scores_BKRP = paddle.matmul(q_BKRD, k_BPKD.transpose([0, 2, 1, 3]), transpose_y=True)
    pos = np.tile(np.arange(p - n, p), g)  # row (head j, proxy i) -> position P - n + i
    visible = paddle.to_tensor((np.arange(p)[None, :] <= pos[:, None]).reshape(1, 1, g * n, p))
    scores_BKRP = paddle.where(
        visible, scores_BKRP * softmax_scale, paddle.full_like(scores_BKRP, float("-inf"))
    )
    scores_BKP = F.softmax(scores_BKRP, axis=-1).sum(axis=2).numpy().astype(np.float64)
    e = kh if groups is None else groups
    return scores_BKP.reshape(b, e, kh // e, p).sum(axis=2)


def nacl_keep(
    scores_BKP: np.ndarray, keep: int, n_proxy: int, random_share: float, rng
) -> np.ndarray:
    """keep_BKN sorted positions: proxies, top-scored keys and the score-weighted random keep (the
    module docstring's nacl)."""
    b, kh, p = scores_BKP.shape
    proxies = min(n_proxy, p)
    kept_proxies = min(proxies, keep)
    rest = keep - kept_proxies
    n_random = math.floor(_exact(random_share) * rest)
    n_top = rest - n_random
    cand = scores_BKP[..., : p - proxies]
    top = np.argsort(-cand, axis=-1, kind="stable")[..., :n_top]
    # Gumbel-top-k: the n_random largest of score + Gumbel noise are a draw without replacement
    # with probabilities proportional to exp(score).
    noisy = cand + rng.gumbel(size=cand.shape)
    np.put_along_axis(noisy, top, -np.inf, axis=-1)
    drawn = np.argsort(-noisy, axis=-1, kind="stable")[..., :n_random]
    tail = np.broadcast_to(np.arange(p - kept_proxies, p), (b, kh, kept_proxies))
    return np.sort(np.concatenate([top, drawn, tail], axis=-1), axis=-1)


def recent_keep(b: int, kh: int, p: int, keep: int) -> np.ndarray:
    """keep_BKN: the last `keep` positions."""
    return np.broadcast_to(np.arange(p - keep, p), (b, kh, keep)).copy()


def random_keep(b: int, kh: int, p: int, keep: int, rng) -> np.ndarray:
    """keep_BKN: `keep` positions drawn uniformly without replacement per (row, kv head)."""
    return np.sort(np.argsort(rng.random((b, kh, p)), axis=-1)[..., :keep], axis=-1)


class KVEviction:
    """The eviction a cache runs at the end of its prefill, per layer (the `generate` settings)."""

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg.validate()

    def keep_indices(
        self, layer: int, q_BSHD, k_BPKD, softmax_scale: float, v_heads: int | None = None
    ):
        """keep_BEN int64 (sorted positions of the P cached keys to keep per eviction group, E =
        gcd(key heads, `v_heads`); E = K when v_heads is None or equal), or None when the budget
        keeps them all."""
        cfg = self.cfg
        b, p, kh = k_BPKD.shape[:3]
        e = kh if v_heads is None else math.gcd(kh, v_heads)
        keep = kept_count(cfg.kv_budget, p)
        if keep >= p:
            return None
        rng = np.random.default_rng([cfg.nacl_seed, layer])
        if cfg.kv_policy == "recent":
            return recent_keep(b, e, p, keep)
        if cfg.kv_policy == "random":
            return random_keep(b, e, p, keep, rng)
        scores = proxy_scores(q_BSHD, k_BPKD, cfg.nacl_proxy_tokens, softmax_scale, e)
        return nacl_keep(scores, keep, cfg.nacl_proxy_tokens, cfg.nacl_random_share, rng)


def gather_kept(x_BKPD, keep_BEN: np.ndarray):
    """x [B, K, P, D] -> the kept positions [B, K, N, D] (head-major); each of the E eviction
    groups' positions apply to its K / E consecutive heads."""
    b, kh, _, d = x_BKPD.shape
    keep = np.repeat(keep_BEN.astype(np.int64), kh // keep_BEN.shape[1], axis=1)
    index = paddle.to_tensor(keep).unsqueeze(-1).expand([b, kh, -1, d])
    return paddle.take_along_axis(x_BKPD, index, axis=2)
