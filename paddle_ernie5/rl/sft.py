"""Supervised fine-tuning on the RL tasks' training prompts (`ernie5 train` with `task: sft`).

The stage between pretraining and RL: (BOS + prompt, reference solution) pairs from the same training
pools RL uses (held-out prompts never appear), cross-entropy on the solution tokens only. It teaches
the answer format and gives RL a policy whose groups are not all-wrong. Writes a run directory that
`train.init_from` of the RL recipe reads.
"""

from __future__ import annotations

import math
import os

import numpy as np
import paddle

from .. import config as C
from ..data.text import get_text_tokenizer
from ..io import checkpoint
from ..model.losses import IGNORE, token_cross_entropy
from ..train.logging import RunLogger
from ..optim.optimizer import apply_update, build_optimizer, optimizer_state
from .evaluate import evaluate
from .prompts import Prompt
from .rollout import build_prompt, continuation_arrays, model_inputs
from .trainer import load_policy, task_problems
from .verifiers import get_task


def sft_examples(model_cfg, tokenizer, problems) -> list[tuple[Prompt, np.ndarray]]:
    """(prompt, reference solution ids) per problem."""
    return [(build_prompt(model_cfg, tokenizer, p),
             np.asarray(get_task(p.task).prompt.solution_ids(tokenizer, p), np.int64)) for p in problems]


def sft_batch(examples, pad_id: int) -> tuple[dict, paddle.Tensor]:
    ids, extras = continuation_arrays([p for p, _ in examples], [sol for _, sol in examples], pad_id)
    labels = np.full(ids.shape, IGNORE, np.int64)
    for i, (prompt, sol) in enumerate(examples):
        start = len(prompt.ids)
        labels[i, start - 1:start - 1 + len(sol)] = sol  # position t predicts token t + 1
    return model_inputs(ids, extras), paddle.to_tensor(labels)


def train_from_config(cfg: C.Config, log=print) -> dict:
    tc, rc = cfg.train, cfg.rl
    paddle.seed(tc.seed)
    tok = get_text_tokenizer(cfg.data.cache_dir, cfg.model.vocab_size, tc.seed, cfg.data.val_fraction)
    model = load_policy(cfg, log)
    optimizer = build_optimizer(model, tc)
    pool, heldout = task_problems(cfg)
    examples = sft_examples(cfg.model, tok, pool)
    os.makedirs(tc.run_dir, exist_ok=True)
    C.save_config(cfg, os.path.join(tc.run_dir, "config.yaml"))
    logger = RunLogger(tc.run_dir, tc.visualdl)
    rng = np.random.default_rng(tc.seed)
    order, cursor = rng.permutation(len(examples)), 0
    model.train()
    for step in range(tc.max_steps):
        if cursor + tc.batch_size > len(order):
            order, cursor = rng.permutation(len(examples)), 0
        inputs, labels = sft_batch([examples[i] for i in order[cursor:cursor + tc.batch_size]], tok.pad_id)
        cursor += tc.batch_size
        loss, _ = token_cross_entropy(model(inputs, with_mtp=False).logits, labels)
        loss.backward()
        lr, norm = apply_update(model, optimizer, step, tc)
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"SFT loss is {float(loss)} at step {step}")
        if (step + 1) % tc.log_every == 0 or step + 1 == tc.max_steps:
            logger.scalars(step + 1, {"loss": float(loss), "train/lr": lr, "train/grad_norm": norm})
    model.eval()
    meta = {"model_config": C.to_plain(cfg.model), "config_hash": C.config_hash(cfg)}
    checkpoint.save(os.path.join(tc.run_dir, "checkpoints"), tc.max_steps,
                    {k: v.numpy() for k, v in model.state_dict().items()},
                    optimizer_state(model, optimizer), meta, tc.keep_last)
    result = evaluate(model, tok, [p for t in rc.tasks for p in heldout[t]], rc.group_size,
                      rc.max_new_tokens, rc.temperature, seed=tc.seed + 99)
    logger.scalars(tc.max_steps, {f"heldout/{k}/{task}": v for task, r in result.items() for k, v in r.items()})
    logger.close()
    return {f"{task}/{k}": v for task, r in result.items() for k, v in r.items()}
