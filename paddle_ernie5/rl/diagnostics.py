"""Training-inference mismatch of an RL step: how far the training forward is from the rollout.

Legend: B responses, N response positions, S sequence positions, K experts per token, E experts.

Measured on the "old" forward (no grad, the weights before this group's first update), over
response tokens only (token j of row b is produced at position start_b - 1 + j):

    mismatch/dlogp_mean, _max   mean and max |log p_train - log p_rollout| per token
    kl/rollout                  k3 estimate of KL(pi_rollout || pi_train) per token
    icepop/masked_frac          share of tokens IcePop masks (ratio outside [low, high])
    router/differ_frac          share of tokens whose expert set differs from the rollout's in
                                at least one MoE layer, for the experts the training forward USED:
                                0 by construction with router replay on
    router/would_differ_frac    the same for the experts the training router CHOSE itself (its
                                top-k of score + selection bias, before replay overrides it): with
                                replay off the two are equal; with replay on this says how much
                                replay had to correct
    router/differ_pair_frac, router/would_differ_pair_frac
                                the same counted per (token, MoE layer) pair

Which experts the router itself chose is recomputed here from the router logits the forward
reports (RouterStats.logits_TE) with the router's selection bias and score function, as
model/router.py chooses them; a test checks the two agree when nothing is replayed.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np


def logp_gap(train_logp_BN, rollout_logp_BN, valid_BN) -> dict[str, float]:
    """Mean and max |log p_train - log p_rollout| and the k3 KL(rollout || train) over valid
    tokens."""
    valid = np.asarray(valid_BN, bool)
    d = (np.asarray(train_logp_BN, np.float64) - np.asarray(rollout_logp_BN, np.float64))[valid]
    if d.size == 0:
        return {"mismatch/dlogp_mean": 0.0, "mismatch/dlogp_max": 0.0, "kl/rollout": 0.0}
    return {
        "mismatch/dlogp_mean": float(np.abs(d).mean()),
        "mismatch/dlogp_max": float(np.abs(d).max()),
        "kl/rollout": float((np.exp(d) - d - 1).mean()),
    }


def masked_fraction(mask_BN, valid_BN) -> float:
    """Share of valid tokens the IcePop mask drops."""
    valid = np.asarray(valid_BN, bool)
    return float((valid & ~np.asarray(mask_BN, bool)).sum() / max(valid.sum(), 1))


def response_positions(start_B, lengths_B, seq_len: int) -> np.ndarray:
    """[B, S] bool: positions that produce a response token (start - 1 .. start - 2 + length)."""
    pos = np.arange(seq_len)[None, :]
    first = np.asarray(start_B)[:, None] - 1
    return (pos >= first) & (pos < first + np.asarray(lengths_B)[:, None])


def routing_differ(
    now: dict[int, np.ndarray], rollout: dict[int, np.ndarray], used_BS: np.ndarray
) -> tuple[float, float]:
    """(share of used positions whose expert set differs in any layer, share of (used position,
    layer) pairs that differ); ids per layer [B, S, K] (K may differ between the two)."""
    used = np.asarray(used_BS, bool)
    any_diff = np.zeros_like(used)
    pairs = 0
    for layer, rec in rollout.items():
        b, s = used.shape
        a = np.sort(np.asarray(now[layer]).reshape(b, s, -1), axis=-1)
        r = np.sort(np.asarray(rec)[:, :s], axis=-1)
        diff = (a != r).any(-1) if a.shape == r.shape else np.ones_like(used)
        any_diff |= diff
        pairs += int((diff & used).sum())
    n = max(int(used.sum()), 1)
    return float((any_diff & used).sum() / n), pairs / (n * max(len(rollout), 1))


def routing_mismatch(model, out, batch) -> dict[str, float]:
    """router/* metrics of a training forward `out` of `batch` (rl/rollout.RolloutBatch) against
    the routing recorded at rollout; {} when the batch recorded none."""
    if batch.replay_BSK is None or not out.router_stats:
        return {}
    b, s = batch.input_ids_BS.shape
    used = response_positions(batch.start_B, batch.valid_BN.sum(1), s)
    used_ids, chosen_ids = {}, {}
    for i, stats in out.router_stats.items():
        used_ids[i] = stats.topk_ids_TK.numpy().reshape(b, s, -1)
        chosen_ids[i] = stats.chosen_ids_TK.numpy().reshape(b, s, -1)
    differ, differ_pair = routing_differ(used_ids, batch.replay_BSK, used)
    would, would_pair = routing_differ(chosen_ids, batch.replay_BSK, used)
    return {
        "router/differ_frac": differ,
        "router/differ_pair_frac": differ_pair,
        "router/would_differ_frac": would,
        "router/would_differ_pair_frac": would_pair,
    }


def response_stats(entropy_BN, valid_BN) -> dict[str, float]:
    """Policy entropy per response token and mean response length (tokens) of a batch."""
    valid = np.asarray(valid_BN, bool)
    return {
        "entropy": float((np.asarray(entropy_BN) * valid).sum() / max(valid.sum(), 1)),
        "response_length": float(valid.sum(1).mean()),
    }


SUMMARISED = (
    "mismatch/dlogp_mean",
    "mismatch/dlogp_max",
    "kl/rollout",
    "icepop/masked_frac",
    "router/differ_frac",
    "router/would_differ_frac",
    "router/differ_pair_frac",
    "router/would_differ_pair_frac",
    "entropy",
    "response_length",
    "urb/staleness",
    "reward/mean",
    "perf/step_s",
    "perf/rollout_s",
    "perf/update_s",
    "perf/rollout_tokens_per_s",
    "perf/update_tokens_per_s",
    "perf/update_seq_tokens_per_s",
)


def summarise_steps(metrics_path: str) -> dict[str, dict[str, float]]:
    """{metric: {mean, max, first, last, steps}} over the RL steps logged in metrics.jsonl (the
    last row of a step counts: a resumed run repeats the steps after its checkpoint), for the
    mismatch metrics and every reward/<task>."""
    rows: dict[int, dict] = {}
    if os.path.isfile(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                if "loss" in row:
                    rows[int(row["step"])] = row
    steps = [rows[s] for s in sorted(rows)]
    keys = list(SUMMARISED) + sorted({k for r in steps for k in r if k.startswith("reward/")})
    out = {}
    for key in dict.fromkeys(keys):
        xs = [float(r[key]) for r in steps if key in r and math.isfinite(float(r[key]))]
        if xs:
            out[key] = {
                "mean": float(np.mean(xs)),
                "max": max(xs),
                "first": xs[0],
                "last": xs[-1],
                "steps": len(xs),
            }
    return out
