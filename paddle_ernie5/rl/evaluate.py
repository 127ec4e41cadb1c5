"""Held-out measurement of a policy per task (a family's level, rl/curriculum.py): pass@1 (one
greedy decode per prompt), pass@k and the mean reward of `samples` responses per prompt sampled at
the rollout temperature, token entropy and response length.

pass@k of a prompt with c correct among n >= k samples is the unbiased estimator
1 - C(n - c, k) / C(n, k) (the chance that k of the n samples, drawn without replacement, hold a
correct one); with n = k it is 1 when any sample is correct. A task's pass@k is its prompts' mean.

Prompts of equal token length, layout and stop token are decoded together in one batched generate
call (the sampler needs equal-length prompts), which makes a few hundred held-out prompts cheap on a
CPU.
"""

from __future__ import annotations

import math
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c correct among n samples (n >= k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(
    model,
    tokenizer,
    problems: list[Problem],
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int = 0,
    pass_k: int | None = None,
    greedy_out: dict | None = None,
) -> dict[str, dict[str, float]]:
    """Per task (Problem.task): reward (mean over `samples` sampled responses per prompt),
    greedy_accuracy (pass@1 of the greedy decode), pass@k (k = pass_k, default `samples`), mean
    token entropy of the sampled responses, mean response length, number of prompts.

    `greedy_out`, when given, receives every prompt's greedy answer: {problem key: (task, reward,
    response token ids)}, for comparing two policies prompt by prompt (greedy_changes)."""
    k = samples if pass_k is None else pass_k
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
                if mode == "greedy" and greedy_out is not None:
                    answer = tuple(int(t) for t in out.tokens[i, : out.lengths[i]])
                    greedy_out[p.key] = (p.task, float(r[0]), answer)
                acc = sums[p.task]
                acc[f"{mode}_reward"] += float(r.sum())
                acc[f"{mode}_n"] += reps
                if mode == "sampled":
                    acc["pass_k"] += pass_at_k(reps, int((r == 1.0).sum()), k)
                    acc["prompts"] += 1
                    acc["length"] += float(out.lengths[sl].sum())
                    acc["entropy"] += float(ent_B[sl].sum())
                    acc["entropy_n"] += float(count_B[sl].sum())
    return {
        task: {
            "reward": a["sampled_reward"] / a["sampled_n"],
            "greedy_accuracy": a["greedy_reward"] / a["greedy_n"],
            f"pass@{k}": a["pass_k"] / a["prompts"],
            "entropy": a["entropy"] / max(a["entropy_n"], 1),
            "response_length": a["length"] / a["sampled_n"],
            "prompts": int(a["prompts"]),
        }
        for task, a in sorted(sums.items())
    }


def weak_starts(
    results: dict[str, dict[str, float]], trained: list[str], pass_k: int, floor: float
) -> list[str]:
    """The trained tasks whose held-out pass@k in `results` is below `floor`, one line each saying
    why that matters; [] when floor is 0."""
    key = f"pass@{pass_k}"
    return [
        f"{task} starts at held-out {key} {results[task][key]:.2f} "
        f"(< rl.min_start_pass_k={floor}): most of its groups will give every response the same "
        "reward, so RL has little to amplify there; train the run named by train.init_from longer "
        "first, or give the task weight 0 (rl.curriculum.<family>.weight or level_weights)"
        for task in trained
        if task in results and results[task][key] < floor
    ]


def greedy_changes(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Per task, the share of held-out prompts whose greedy answer (evaluate's greedy_out) went
    right -> wrong, wrong -> right, wrong -> another wrong answer, or changed at all between two
    policies; prompts measured by both only."""
    counts: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(5))
    for key, (task, r0, ans0) in before.items():
        if key not in after:
            continue
        _, r1, ans1 = after[key]
        ok0, ok1, moved = r0 == 1.0, r1 == 1.0, ans0 != ans1
        counts[task] += [1, ok0 and not ok1, ok1 and not ok0, moved and not (ok0 or ok1), moved]
    return {
        task: {
            "right_to_wrong": c[1] / c[0],
            "wrong_to_right": c[2] / c[0],
            "wrong_to_other_wrong": c[3] / c[0],
            "changed": c[4] / c[0],
        }
        for task, c in sorted(counts.items())
    }


def table(results: dict[str, dict[str, float]], before: dict | None = None) -> str:
    """Rows = tasks: prompts, pass@1 (greedy), pass@k, sampled reward, entropy, length; with
    `before` (an earlier measurement of the same tasks) each value reads "before -> after"."""
    k_key = next(key for key in next(iter(results.values())) if key.startswith("pass@"))
    cols = [
        ("pass@1 (greedy)", "greedy_accuracy"),
        (k_key, k_key),
        ("reward", "reward"),
        ("entropy", "entropy"),
        ("length", "response_length"),
    ]

    def cell(task, key):
        now = f"{results[task][key]:.3f}"
        if before is None or task not in before or key not in before[task]:
            return now
        return f"{before[task][key]:.3f} -> {now}"

    rows = [["task", "prompts"] + [name for name, _ in cols]]
    rows += [[t, str(r["prompts"])] + [cell(t, key) for _, key in cols] for t, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
