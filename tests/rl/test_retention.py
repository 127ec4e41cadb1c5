"""RL's retention term (rl.retain_*): supervised replay of reference solutions of tasks the policy
already solves, added to every update."""

import glob
import os

import numpy as np
import paddle
import pytest
from support import RECIPES

from paddle_ernie5 import config as C
from paddle_ernie5.rl import trainer as T
from paddle_ernie5.rl.curriculum import family_levels
from paddle_ernie5.rl.problems import task_name
from paddle_ernie5.rl.supervised import solution_loss

# arithmetic trained by RL, counting measured only (weight 0)
BASE = [
    "component=rl",
    "rl.families=[arithmetic,counting]",
    "rl.curriculum.arithmetic.levels=[1]",
    "rl.curriculum.counting.weight=0",
    "rl.train_problems=40",
    "rl.eval_problems=4",
    "rl.prompts_per_step=2",
    "rl.group_size=2",
    "rl.max_new_tokens=3",
    "rl.rollout_workers=0",  # rollouts in the training thread: the runs are deterministic
    "rl.lookahead=0",
    "train.lr=1.0e-3",
    "train.min_lr=1.0e-3",
    "train.warmup_steps=0",
]


def _counting_loss_after(cfg, steps: int) -> tuple[float, list]:
    trainer = T.RLTrainer(cfg, log=lambda *a: None)
    metrics = [trainer.train_step() for _ in range(steps)]
    trainer.buffer.close()
    trainer.model.eval()
    with paddle.no_grad():
        loss = solution_loss(
            trainer.model, cfg.model, trainer.tokenizer, trainer.curriculum.heldout["counting"]
        )
    return float(loss), metrics


def test_retention_holds_a_task_rl_does_not_train(debug_config, tmp_path):
    """Three updates from the same start and rollouts: with counting retained, the held-out
    counting solutions' loss falls well below the run without; the run logs the term."""
    plain, m_plain = _counting_loss_after(debug_config(*BASE, f"train.run_dir={tmp_path / 'a'}"), 3)
    kept, m_kept = _counting_loss_after(
        debug_config(
            *BASE,
            f"train.run_dir={tmp_path / 'b'}",
            "rl.retain_tasks=[counting]",
            "rl.retain_coef=1.0",
            "rl.retain_batch=4",
        ),
        3,
    )
    assert kept < plain - 0.5, (kept, plain)
    assert all("retain/loss" not in m for m in m_plain)
    losses = [m["retain/loss"] for m in m_kept]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    # the same rollouts were drawn: the first step's reward does not depend on the term
    assert m_kept[0]["reward/mean"] == m_plain[0]["reward/mean"]


def test_retained_problems_are_a_pure_function_of_seed_step_and_minibatch():
    pools = [[f"a{i}" for i in range(5)], [f"b{i}" for i in range(7)]]
    one = T.draw_retained(pools, 16, 3, 10, 1)
    assert one == T.draw_retained(pools, 16, 3, 10, 1)
    assert one != T.draw_retained(pools, 16, 3, 10, 0)
    assert one != T.draw_retained(pools, 16, 3, 11, 1)
    assert set(one) <= set(pools[0] + pools[1])
    assert any(p.startswith("a") for p in one) and any(p.startswith("b") for p in one)


def test_retention_refuses_a_task_outside_the_curriculum(debug_config, tmp_path):
    cfg = debug_config(
        *BASE, f"train.run_dir={tmp_path}", "rl.retain_tasks=[counting/L7]", "rl.retain_coef=1"
    )
    with pytest.raises(C.ConfigError, match=r"retain_tasks=.*L7 not in .*arithmetic/L1"):
        T.RLTrainer(cfg, log=lambda *a: None)


def test_retention_needs_tasks_when_on(debug_config, tmp_path):
    with pytest.raises(C.ConfigError, match="rl.retain_tasks=.*non-empty"):
        debug_config(*BASE, "rl.retain_coef=0.5")
    with pytest.raises(C.ConfigError, match="rl.retain_batch"):
        debug_config(*BASE, "rl.retain_batch=0")
    with pytest.raises(C.ConfigError, match="rl.retain_coef"):
        debug_config(*BASE, "rl.retain_tasks=[counting]", "rl.retain_coef=-1")


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(RECIPES, "*.yaml"))), ids=os.path.basename
)
def test_every_recipe_retains_only_tasks_of_its_curriculum(path):
    """A recipe that inherits a retention setting must also inherit (or set) the tasks it names."""
    cfg = C.load_config(path)
    rc = getattr(cfg, "rl", None)
    if rc is None or rc.retain_coef == 0:
        return
    tasks = [task_name(f, lv) for f in rc.families for lv in family_levels(cfg, f)]
    assert set(rc.retain_tasks) <= set(tasks), (rc.retain_tasks, tasks)
