"""Supervised fine-tuning on the RL problem families' training prompts (`ernie5 train` with
`component: sft`).

The stage between pretraining and RL: (BOS + prompt, reference solution) pairs from the same
training pools RL uses (every task of the curriculum, rl/curriculum.py; held-out prompts never
appear), cross-entropy on the solution tokens only. Each batch draws its examples by the
curriculum's task weights, uniformly within a task, so a small pool (one-digit sums) is not drowned
by a large one. It teaches the answer format (sorting and reversal exist only here before RL) and
gives RL a policy whose groups are not all-wrong. Evaluated per task like RL (pass@1 greedy,
pass@k, sampled reward). Writes a run directory that `train.init_from` of the RL recipe reads.
"""

from __future__ import annotations

import math

import numpy as np

from .. import config as C
from ..data.text import get_text_tokenizer
from ..optim.optimizer import apply_update, build_optimizer
from ..train.loop import Component, Loop
from .curriculum import build_curriculum, check_response_budget
from .evaluate import evaluate
from .problems import Problem
from .supervised import solution_loss
from .trainer import load_policy


class SFTRun(Component):
    """The policy trained on the training prompts' reference solutions, example i of the run drawn
    by the curriculum (`Curriculum.draw`, a pure function of i: a resumed run draws the same
    batches); evaluated on the held-out prompts of every task."""

    name = "sft"

    def __init__(self, cfg: C.Config, rng: np.random.Generator, log=print):
        tc = self.tc = cfg.train
        self.rc, self.rng = cfg.rl, rng
        self.config = C.to_plain(cfg.model)
        self.eval_every = tc.eval_every
        self.tok = get_text_tokenizer(
            cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.split_seed, cfg.data.val_fraction
        )
        self.model = load_policy(cfg, log)
        self.optimizer = build_optimizer(self.model, tc)
        self.model_cfg = cfg.model
        self.curriculum = build_curriculum(cfg)
        check_response_budget(self.curriculum, self.tok, cfg.rl.max_new_tokens)

    def batch(self, step: int) -> list[Problem]:
        b = self.tc.batch_size
        return [self.curriculum.draw(self.tc.seed, i) for i in range(step * b, (step + 1) * b)]

    def step(self, step: int) -> dict[str, float]:
        tc = self.tc
        loss = solution_loss(self.model, self.model_cfg, self.tok, self.batch(step))
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
            self.curriculum.heldout_problems(),
            rc.eval_samples,
            rc.max_new_tokens,
            rc.temperature,
            seed=self.tc.seed + 99,
            pass_k=rc.pass_k,
        )
        return {f"{task}/{k}": v for task, r in result.items() for k, v in r.items()}


def train_from_config(cfg: C.Config, log=print) -> dict:
    """Fine-tune; the run directory's last checkpoint is what `train.init_from` of RL reads."""
    loop = Loop(cfg.train, cfg)
    return loop.fit(SFTRun(cfg, loop.rng, log))
