"""Held-out measurement of a policy on RL problem families: sampled reward, greedy accuracy,
entropy.

Prompts of equal token length, layout and stop token are decoded together in one batched generate
call (the sampler needs equal-length prompts), which makes a few hundred held-out prompts cheap on a
CPU.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import paddle

from ..model.generation import generate
from .objectives import response_logp_entropy
from .problems import Problem
from .prompts import Prompt
from .rollout import build_prompt, continuation_arrays, model_inputs, prompt_arrays, score, stop_id


@paddle.no_grad()
def _entropy(
    model,
    prompts: list[Prompt],
    tokens_BN: np.ndarray,
    lengths_B: np.ndarray,
    temperature: float,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (sum of the policy's entropies over the response tokens, number of tokens)."""
    n = tokens_BN.shape[1]
    ids, extras = continuation_arrays(prompts, list(tokens_BN[:, : n - 1]), pad_id)
    out = model(model_inputs(ids, extras), with_mtp=False)
    start = np.full([len(ids)], len(prompts[0].ids))
    _, ent = response_logp_entropy(out.logits, tokens_BN, start, temperature)
    valid = np.arange(n)[None, :] < lengths_B[:, None]
    return (ent.numpy() * valid).sum(axis=1), valid.sum(axis=1)


def evaluate(
    model,
    tokenizer,
    problems: list[Problem],
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per family: reward (mean over `samples` sampled responses per prompt), greedy accuracy,
    mean token entropy of the sampled responses, mean response length."""
    buckets: dict[tuple, list[tuple[Problem, Prompt]]] = defaultdict(list)
    for p in problems:
        prompt = build_prompt(model.cfg, tokenizer, p)
        buckets[(len(prompt.ids), prompt.doc is not None, stop_id(tokenizer, p))].append(
            (p, prompt)
        )
    sums: dict[str, defaultdict] = defaultdict(lambda: defaultdict(float))
    for b, ((_, _, stop), items) in enumerate(sorted(buckets.items())):
        for mode, reps, temp in (("sampled", samples, temperature), ("greedy", 1, 0.0)):
            rows = [prompt for _, prompt in items for _ in range(reps)]
            ids, extras = prompt_arrays(rows, tokenizer.pad_id)
            out = generate(
                model,
                ids,
                max_new_tokens,
                temperature=temp,
                stop_id=stop,
                pad_id=tokenizer.pad_id,
                seed=seed + b,
                prompt_extras=extras,
            )
            stopped = out.tokens[np.arange(len(rows)), out.lengths - 1] == stop
            if mode == "sampled":
                ent_B, count_B = _entropy(
                    model, rows, out.tokens, out.lengths, temperature, tokenizer.pad_id
                )
            for i, (p, _) in enumerate(items):
                sl = slice(i * reps, (i + 1) * reps)
                r = score(tokenizer, p, [], out.tokens[sl], out.lengths[sl], stopped[sl])
                acc = sums[p.family]
                acc[f"{mode}_reward"] += float(r.sum())
                acc[f"{mode}_n"] += reps
                if mode == "sampled":
                    acc["length"] += float(out.lengths[sl].sum())
                    acc["entropy"] += float(ent_B[sl].sum())
                    acc["entropy_n"] += float(count_B[sl].sum())
    return {
        family: {
            "reward": a["sampled_reward"] / a["sampled_n"],
            "greedy_accuracy": a["greedy_reward"] / a["greedy_n"],
            "entropy": a["entropy"] / max(a["entropy_n"], 1),
            "response_length": a["length"] / a["sampled_n"],
        }
        for family, a in sorted(sums.items())
    }
