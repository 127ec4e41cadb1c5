"""The text-only control of a multimodal run: how many text-corpus tokens the run's mixture gives
the text source over all its steps, and the text-only run (recipes/pretrain_tiny.yaml by default)
that sees the same number, so that the two runs' text perplexities can be compared.

    python tools/text_control.py recipes/multimodal_tiny.yaml [key=value ...]
    python tools/text_control.py recipes/multimodal_tiny.yaml --steps 100   # a sample of steps

The loader draws the documents of step t from Generator([seed, t]) alone (data/mixture.py), so
the count is the run's own, step by step, not an estimate from the mixture weights (documents of
different lengths share a row, and a long document that does not fit is redrawn). Prints the
per-source positions per step, the text tokens in all, and the control's command.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="a multimodal recipe (data.mixture with a text weight)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, as `ernie5 train` takes")
    ap.add_argument("--steps", type=int, default=0, help="count these steps (0 = train.max_steps)")
    ap.add_argument(
        "--control", default="recipes/pretrain_tiny.yaml", help="the text-only recipe to match"
    )
    return ap.parse_args(argv)


def count_positions(cfg, steps: int, progress=None) -> dict[str, int]:
    """Positions each mixture source fills over steps 0 .. steps-1 of the run `cfg` describes."""
    from paddle_ernie5.data.loader import text_data_for
    from paddle_ernie5.data.mixture import MixtureContext, MixtureLoader

    tokenizer, text_loader, _ = text_data_for(cfg, bpe_dropout=True)
    ctx = MixtureContext(cfg, tokenizer, "train", text_loader.docs_ids_fn(0))
    loader = MixtureLoader(ctx, cfg.train.batch_size, cfg.train.seed)
    totals = dict.fromkeys(loader.sources, 0)
    for step in range(steps):
        loader.batch_at(step)
        for name, n in loader.last_positions.items():
            totals[name] += n
        if progress is not None:
            progress(step)
    return totals


def main(argv=None) -> int:
    from tqdm import tqdm

    from paddle_ernie5.config import Config, ConfigError, load_config
    from paddle_ernie5.errors import UserError

    args = parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        control = load_config(args.control)
    except (ConfigError, UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not isinstance(cfg, Config) or not cfg.data.mixture.enabled:
        print(f"error: {args.recipe} trains no data.mixture; nothing to match", file=sys.stderr)
        return 2
    if cfg.data.mixture.weights().get("text", 0) <= 0:
        print(f"error: {args.recipe} gives the text source no weight", file=sys.stderr)
        return 2
    steps = args.steps or cfg.train.max_steps
    bar = tqdm(total=steps, desc="counting", unit="step")
    try:
        totals = count_positions(cfg, steps, progress=lambda _: bar.update(1))
    except (ConfigError, UserError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    row = cfg.train.batch_size * cfg.data.seq_len
    print(f"{args.recipe}: {steps} steps of {row} positions")
    print("| source | positions per step | share |")
    print("|---|---:|---:|")
    for name, n in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {n / steps:.1f} | {n / (steps * row):.3f} |")
    text = totals["text"]
    if args.steps and args.steps != cfg.train.max_steps:
        text = round(text / steps * cfg.train.max_steps)
        print(f"scaled to train.max_steps={cfg.train.max_steps}")
    per_step = control.train.batch_size * control.data.seq_len
    control_steps = max(1, math.ceil(text / per_step))
    print(f"text tokens over the run: {text} ({text / cfg.train.max_steps:.1f} per step)")
    print(
        f"control: ernie5 train {args.control} train.max_steps={control_steps} "
        f"train.eval_every={control_steps} train.save_every={control_steps}"
        f"  ({control_steps} x {per_step} = {control_steps * per_step} tokens)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
