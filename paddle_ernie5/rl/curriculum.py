"""The problems of a run: one training pool and one held-out set per task (a family's level), and
the mixture training queries are drawn from.

    rl.families, rl.curriculum.<family>.levels / .weight
      -> tasks "arithmetic/L1", "arithmetic/L3", "sorting/L2", "counting" (level 0 keeps the name)
      -> task weight = family weight x the level's share (rl.curriculum.<family>.level_weights,
         else equal shares), normalised over the tasks; a task of weight 0 is measured, not drawn
      -> per task: split_problems = (training pool, held-out prompts[:rl.eval_problems])

Query i of a run (U-RB slot i = group * prompts_per_step + j) is drawn by its own generator,
seeded by (seed, i): a task by the weights, then one problem of its pool uniformly, with
replacement. The queries of a group are therefore a pure function of the group (what U-RB needs),
and small pools (one-digit sums: 71 training problems) are revisited, which AHRL's hints and the
running accuracy need.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import config as C
from .problems import Problem, has_working, task_name
from .verifiers import get_family, split_problems


@dataclass
class Curriculum:
    tasks: list[str]  # in config order: family by family, levels ascending
    weights: np.ndarray  # [tasks] sampling probabilities of training queries
    train: dict[str, list[Problem]]  # task -> training pool
    heldout: dict[str, list[Problem]]  # task -> held-out prompts (never trained on)

    def draw(self, seed: int, i: int) -> Problem:
        """Training query number i of a run with this seed."""
        rng = np.random.default_rng([seed, 7919, i])
        pool = self.train[self.tasks[rng.choice(len(self.tasks), p=self.weights)]]
        return pool[int(rng.integers(len(pool)))]

    def training_problems(self) -> list[Problem]:
        return [p for t in self.tasks for p in self.train[t]]

    def heldout_problems(self) -> list[Problem]:
        return [p for t in self.tasks for p in self.heldout[t]]


def family_levels(cfg: C.Config, family: str) -> tuple[int, ...]:
    """The levels of `family` this run draws: rl.curriculum's, else the family's defaults."""
    spec = get_family(family)
    chosen = cfg.rl.curriculum.of(family).levels
    if not chosen:
        return spec.default_levels or spec.levels
    unknown = [lv for lv in chosen if lv not in spec.levels]
    if unknown:
        raise C.ConfigError(
            f"rl.curriculum.{family}.levels={list(chosen)} is invalid: family {family!r} has "
            f"levels {', '.join(map(str, spec.levels))}"
        )
    return tuple(sorted(chosen))


def build_curriculum(cfg: C.Config) -> Curriculum:
    rc = cfg.rl
    tasks, weights, train, held = [], [], {}, {}
    for i, family in enumerate(rc.families):
        levels = family_levels(cfg, family)
        for level in levels:
            task = task_name(family, level)
            tr, he = split_problems(
                family, rc.train_problems, cfg.train.seed + i, rc.heldout_fraction, cfg, level
            )
            if not tr or not he:
                raise C.ConfigError(
                    f"rl.train_problems={rc.train_problems} leaves task {task!r} with {len(tr)} "
                    f"training and {len(he)} held-out problems; raise it"
                )
            tasks.append(task)
            weights.append(rc.curriculum.of(family).level_weight(level, len(levels)))
            train[task], held[task] = tr, he[: rc.eval_problems]
    w = np.asarray(weights, np.float64)
    if w.sum() <= 0:
        raise C.ConfigError(
            "rl.curriculum gives every family of rl.families weight 0 (its weight, or all of its "
            "level_weights); nothing would be trained"
        )
    return Curriculum(tasks, w / w.sum(), train, held)


def check_response_budget(cur: Curriculum, tokenizer, max_new_tokens: int) -> None:
    """A task whose reference responses carry worked steps (a running count) can only score when
    the whole response fits in rl.max_new_tokens: refuse a budget shorter than its longest
    reference. (Short-answer tasks are not checked: a response cut there just scores 0.)"""
    for task in cur.tasks:
        problems = [p for p in cur.train[task] + cur.heldout[task] if has_working(p)]
        if not problems:
            continue
        prompt = get_family(problems[0].family).prompt
        longest = max(len(prompt.solution_ids(tokenizer, p)) for p in problems)
        if longest > max_new_tokens:
            raise C.ConfigError(
                f"rl.max_new_tokens={max_new_tokens} is invalid: the reference responses of task "
                f"{task!r} (worked steps, then the answer) are up to {longest} tokens; raise it"
            )
