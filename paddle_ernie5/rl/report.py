"""Curriculum report of a checkpoint: pass@1 (greedy), pass@k and sampled reward per task on the
held-out prompts, printed as a table and written to <run>/eval.json.

    python -m paddle_ernie5.rl.report runs/sft_tiny                      # the run's own curriculum
    python -m paddle_ernie5.rl.report runs/sft_tiny rl.curriculum.arithmetic.levels=[1,2,3,4,5,6]
    python -m paddle_ernie5.rl.report runs/rl_tiny --out /tmp/eval.json

The run's config.yaml (an SFT or RL run, or a pretraining run: its rl section holds the defaults)
names the model, tokenizer and curriculum; overrides change any of it (e.g. more levels, to
calibrate which levels a starting model can learn: pass@k between 0.2 and 0.8). The weights are
the run's newest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time

from .. import config as C
from ..data.text import get_text_tokenizer
from ..io import write_json
from .curriculum import build_curriculum
from .evaluate import evaluate, table
from .trainer import load_policy


def curriculum_report(cfg: C.Config, log=print) -> dict:
    """{task: metrics} of the policy `cfg.train.init_from` on cfg's held-out curriculum."""
    rc = cfg.rl
    tok = get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.split_seed, cfg.data.val_fraction
    )
    model = load_policy(cfg, log)
    return evaluate(
        model,
        tok,
        build_curriculum(cfg).heldout_problems(),
        rc.eval_samples,
        rc.max_new_tokens,
        rc.temperature,
        seed=cfg.train.seed + 99,
        pass_k=rc.pass_k,
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("run", help="run directory with config.yaml and checkpoints")
    ap.add_argument(
        "overrides", nargs="*", help="dotted config overrides, e.g. rl.eval_problems=64"
    )
    ap.add_argument("--out", help="where to write the JSON (default <run>/eval.json)")
    args = ap.parse_args(argv)
    cfg = C.load_config(
        os.path.join(args.run, "config.yaml"),
        [*args.overrides, f"train.init_from={args.run}"],
    )
    t0 = time.perf_counter()
    result = curriculum_report(cfg)
    print(table(result))
    out = args.out or os.path.join(args.run, "eval.json")
    write_json(
        out,
        {
            "run": args.run,
            "overrides": args.overrides,
            "samples": cfg.rl.eval_samples,
            "temperature": cfg.rl.temperature,
            "max_new_tokens": cfg.rl.max_new_tokens,
            "tasks": result,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
