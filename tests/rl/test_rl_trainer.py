import json
import os

import numpy as np

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
