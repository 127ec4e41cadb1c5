"""Supervised fine-tuning on the RL problem families' training prompts (`ernie5 train` with
`component: sft`).

The stage between pretraining and RL: (BOS + prompt, reference solution) pairs from the same
training pools RL uses (held-out prompts never appear), cross-entropy on the solution tokens only.
It teaches the answer format and gives RL a policy whose groups are not all-wrong. Writes a run
directory that `train.init_from` of the RL recipe reads.
"""

from __future__ import annotations

import math

import numpy as np
import paddle

from .. import config as C
from ..data.text import get_text_tokenizer
from ..model.losses import IGNORE, token_cross_entropy
from ..optim.optimizer import apply_update, build_optimizer
from ..train.loop import Component, Loop
from .evaluate import evaluate
from .prompts import Prompt
from .rollout import build_prompt, continuation_arrays, model_inputs
from .trainer import family_problems, load_policy
from .verifiers import get_family


def sft_examples(model_cfg, tokenizer, problems) -> list[tuple[Prompt, np.ndarray]]:
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


class SFTRun(Component):
    """The policy trained on the training prompts' reference solutions, in shuffled passes;
    evaluated on the held-out prompts of every problem family (sampled reward, greedy accuracy,
    entropy)."""

    name = "sft"

    def __init__(self, cfg: C.Config, rng: np.random.Generator, log=print):
        tc = self.tc = cfg.train
        self.rc, self.rng = cfg.rl, rng
        self.config = C.to_plain(cfg.model)
        self.eval_every = tc.eval_every
        self.tok = get_text_tokenizer(
            cfg.data.cache_dir, cfg.model.vocab_size, tc.seed, cfg.data.val_fraction
        )
        self.model = load_policy(cfg, log)
        self.optimizer = build_optimizer(self.model, tc)
        pool, self.heldout = family_problems(cfg)
        self.examples = sft_examples(cfg.model, self.tok, pool)
        self.order, self.cursor = rng.permutation(len(self.examples)), 0

    def step(self, step: int) -> dict[str, float]:
        tc = self.tc
        if self.cursor + tc.batch_size > len(self.order):
            self.order, self.cursor = self.rng.permutation(len(self.examples)), 0
        rows = self.order[self.cursor : self.cursor + tc.batch_size]
        inputs, labels = sft_batch([self.examples[i] for i in rows], self.tok.pad_id)
        self.cursor += tc.batch_size
        loss, _ = token_cross_entropy(self.model(inputs, with_mtp=False).logits, labels)
        loss.backward()
        lr, norm = apply_update(self.model, self.optimizer, step, tc)
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"SFT loss is {float(loss)} at step {step}")
        return {"loss": float(loss), "train/lr": lr, "train/grad_norm": norm}

    def evaluate(self) -> dict:
        rc = self.rc
        result = evaluate(
            self.model,
            self.tok,
            [p for t in rc.families for p in self.heldout[t]],
            rc.group_size,
            rc.max_new_tokens,
            rc.temperature,
            seed=self.tc.seed + 99,
        )
        return {f"{family}/{k}": v for family, r in result.items() for k, v in r.items()}

    def state_dict(self) -> dict:
        return {"order": self.order.tolist(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.cursor = np.asarray(state["order"], np.int64), state["cursor"]


def train_from_config(cfg: C.Config, log=print) -> dict:
    """Fine-tune; the run directory's last checkpoint is what `train.init_from` of RL reads."""
    loop = Loop(cfg.train, cfg)
    return loop.fit(SFTRun(cfg, loop.rng, log))
