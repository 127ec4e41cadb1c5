"""Held-out measurement of a policy on RL tasks: sampled reward, greedy accuracy, entropy.

Prompts of equal token length are decoded together in one batched generate call (the sampler needs
equal-length prompts), which makes a few hundred held-out prompts cheap on a CPU.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import paddle

from ..model.generation import generate
from .objectives import response_logp_entropy
from .rollout import model_inputs, prompt_ids, score, stop_id
from .verifiers import Problem


@paddle.no_grad()
def _entropy(model, prompts_BP: np.ndarray, tokens_BN: np.ndarray, lengths_B: np.ndarray,
             temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (sum of the policy's entropies over the response tokens, number of tokens)."""
    n = tokens_BN.shape[1]
    ids = np.concatenate([prompts_BP, tokens_BN[:, :n - 1]], axis=1)
    out = model(model_inputs(ids), with_mtp=False)
    start = np.full([len(ids)], prompts_BP.shape[1])
    _, ent = response_logp_entropy(out.logits, tokens_BN, start, temperature)
    valid = np.arange(n)[None, :] < lengths_B[:, None]
    return (ent.numpy() * valid).sum(axis=1), valid.sum(axis=1)


def evaluate(model, tokenizer, problems: list[Problem], samples: int, max_new_tokens: int,
             temperature: float, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per task: reward (mean over `samples` sampled responses per prompt), greedy accuracy, mean token
    entropy of the sampled responses, mean response length."""
    stop = stop_id(tokenizer)
    buckets: dict[int, list[tuple[Problem, np.ndarray]]] = defaultdict(list)
    for p in problems:
        ids, _ = prompt_ids(tokenizer, p)
        buckets[len(ids)].append((p, ids))
    sums: dict[str, defaultdict] = defaultdict(lambda: defaultdict(float))
    for b, (length, items) in enumerate(sorted(buckets.items())):
        prompts = np.stack([ids for _, ids in items])
        for mode, reps, temp in (("sampled", samples, temperature), ("greedy", 1, 0.0)):
            rows = np.repeat(prompts, reps, axis=0)
            out = generate(model, rows, max_new_tokens, temperature=temp, stop_id=stop,
                           pad_id=tokenizer.pad_id, seed=seed + b)
            stopped = out.tokens[np.arange(len(rows)), out.lengths - 1] == stop
            if mode == "sampled":
                ent_B, count_B = _entropy(model, rows, out.tokens, out.lengths, temperature)
            for i, (p, _) in enumerate(items):
                sl = slice(i * reps, (i + 1) * reps)
                r = score(tokenizer, p, [], out.tokens[sl], out.lengths[sl], stopped[sl])
                acc = sums[p.task]
                acc[f"{mode}_reward"] += float(r.sum())
                acc[f"{mode}_n"] += reps
                if mode == "sampled":
                    acc["length"] += float(out.lengths[sl].sum())
                    acc["entropy"] += float(ent_B[sl].sum())
                    acc["entropy_n"] += float(count_B[sl].sum())
    return {task: {"reward": a["sampled_reward"] / a["sampled_n"],
                   "greedy_accuracy": a["greedy_reward"] / a["greedy_n"],
                   "entropy": a["entropy"] / max(a["entropy_n"], 1),
                   "response_length": a["length"] / a["sampled_n"]}
            for task, a in sorted(sums.items())}
