import json
import os

import numpy as np
import pytest

from paddle_ernie5.train.components import run_component

SMALL = [
    "rl.train_problems=40",
    "rl.eval_problems=2",
    "rl.prompts_per_step=2",
    "rl.group_size=2",
    "rl.max_new_tokens=3",
    "train.lr=1.0e-3",
    "train.min_lr=1.0e-4",
    "train.warmup_steps=0",
    "train.max_steps=2",
    "train.batch_size=4",
]


def test_sft_then_rl_end_to_end(debug_config, tmp_path):
    sft = debug_config("component=sft", f"train.run_dir={tmp_path / 'sft'}", *SMALL)
    metrics = run_component(sft)
    assert {"arithmetic/reward", "counting/greedy_accuracy"} <= set(metrics)
    rl = debug_config(
        "component=rl",
        f"train.run_dir={tmp_path / 'rl'}",
        f"train.init_from={tmp_path / 'sft'}",
        "rl.kl_coef=0.01",
        "rl.rollout_workers=1",
        *SMALL,
    )
    out = run_component(rl)
    assert {"arithmetic/reward_before", "counting/reward_after"} <= set(out)
    rows = [json.loads(l) for l in open(tmp_path / "rl" / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in (
        "reward/mean",
        "entropy",
        "clip/low_frac",
        "clip/high_frac",
        "icepop/masked_frac",
        "kl/ref",
        "kl/rollout",
        "response_length",
        "wpsm/damped_frac",
        "hint/query_frac",
        "urb/staleness",
    ):
        assert all(np.isfinite(r[key]) for r in steps), key
    # one group of look-ahead
    assert steps[0]["urb/staleness"] == 0 and steps[1]["urb/staleness"] == 1
    assert steps[0]["router/mismatch"] == 0  # replay on
    assert any(k.startswith("heldout/reward/") for k in rows[0])
    assert os.path.isdir(tmp_path / "rl" / "checkpoints" / "step_00000002")


@pytest.fixture
def known_answer():
    """A family whose every answer is 0 (prompts vary): what a policy can learn in a few steps."""
    from paddle_ernie5.rl import verifiers as V

    def make(n, seed):
        rng = np.random.default_rng(seed)
        return [
            V.Problem("toy_zero", f"Q: What is {a} times zero? A:", "0", " 0.\n")
            for a in rng.integers(0, 1000, n)
        ]

    V.register_family(V.FamilySpec("toy_zero", make, V.exact_integer))
    yield [
        "rl.families=[toy_zero]",
        "rl.train_problems=400",
        "rl.eval_problems=16",
        "rl.prompts_per_step=4",
        "rl.group_size=8",
        "rl.max_new_tokens=4",
        "rl.hints=false",
        "rl.rollout_workers=0",  # rollouts in the training thread: the run is deterministic
        "rl.lookahead=0",
        "train.warmup_steps=0",
        "train.batch_size=8",
    ]
    del V.FAMILIES["toy_zero"]


def _sft(debug_config, tmp_path, known_answer, steps):
    run = tmp_path / f"sft{steps}"
    run_component(
        debug_config(
            "component=sft",
            f"train.run_dir={run}",
            f"train.max_steps={steps}",
            f"train.save_every={steps}",
            "train.lr=0.01",
            "train.min_lr=0.01",
            *known_answer,
        )
    )
    return run


def _rl(debug_config, tmp_path, known_answer, init_from, steps):
    run = tmp_path / "rl"
    out = run_component(
        debug_config(
            "component=rl",
            f"train.run_dir={run}",
            f"train.init_from={init_from}",
            f"train.max_steps={steps}",
            f"train.save_every={steps}",
            "train.lr=0.003",
            "train.min_lr=0.003",
            *known_answer,
        )
    )
    rewards = [
        r["reward/mean"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r
    ]
    assert len(rewards) == steps
    return out, rewards


def test_rl_raises_the_reward(debug_config, tmp_path, known_answer):
    """From a policy that has seen the answer format only briefly (4 SFT steps: held-out reward
    about 0), 20 RL steps make the sampled reward climb and the held-out reward rise."""
    sft = _sft(debug_config, tmp_path, known_answer, 4)
    out, rewards = _rl(debug_config, tmp_path, known_answer, sft, 20)
    assert out["toy_zero/reward_before"] < 0.1
    assert out["toy_zero/reward_after"] > out["toy_zero/reward_before"] + 0.2, out
    assert np.mean(rewards[-5:]) > np.mean(rewards[:5]) + 0.15, rewards


def test_a_policy_that_knows_the_answer_gets_full_reward(debug_config, tmp_path, known_answer):
    """After 30 SFT steps the policy answers every prompt: each rollout group of the RL run and the
    held-out measurement before and after score 1.0."""
    sft = _sft(debug_config, tmp_path, known_answer, 30)
    out, rewards = _rl(debug_config, tmp_path, known_answer, sft, 2)
    assert rewards == [1.0, 1.0]
    assert out["toy_zero/reward_before"] == out["toy_zero/reward_after"] == 1.0
