"""Supervised batches of (prompt, reference solution) pairs: the SFT stage's step (rl/sft.py) and
RL's retention term (rl.retain_*, rl/trainer.py) both train on them.

Cross-entropy on the solution tokens only; the prompt is built exactly as a rollout builds it
(rl/rollout.py), so the solution continues where a sampled response would.
"""

from __future__ import annotations

import numpy as np
import paddle

from ..model.losses import IGNORE, token_cross_entropy
from .rollout import build_prompt, continuation_arrays, model_inputs
from .verifiers import get_family


def sft_examples(model_cfg, tokenizer, problems) -> list:
    """(prompt, reference solution ids) per problem."""
    return [
        (
            build_prompt(model_cfg, tokenizer, p),
            np.asarray(get_family(p.family).prompt.solution_ids(tokenizer, p), np.int64),
        )
        for p in problems
    ]


def sft_batch(examples, pad_id: int) -> tuple[dict, paddle.Tensor]:
    ids, extras = continuation_arrays(
        [p for p, _ in examples], [sol for _, sol in examples], pad_id
    )
    labels = np.full(ids.shape, IGNORE, np.int64)
    for i, (prompt, sol) in enumerate(examples):
        start = len(prompt.ids)
        labels[i, start - 1 : start - 1 + len(sol)] = sol  # position t predicts token t + 1
    return model_inputs(ids, extras), paddle.to_tensor(labels)


def solution_loss(model, model_cfg, tokenizer, problems) -> paddle.Tensor:
    """Mean cross-entropy of the reference solutions of `problems` given their prompts."""
    inputs, labels = sft_batch(sft_examples(model_cfg, tokenizer, problems), tokenizer.pad_id)
    return token_cross_entropy(model(inputs, with_mtp=False).logits, labels)[0]
