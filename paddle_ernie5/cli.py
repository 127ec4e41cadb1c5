"""`ernie5` command line: parse -> build -> run. Heavy imports happen after the thread count is set."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from . import config as C

USAGE_ERROR = 2


def _set_threads(threads: int) -> None:
    # Paddle pins OMP_NUM_THREADS=1 at import when unset; decide before it is imported.
    n = threads or os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ.setdefault("MKL_NUM_THREADS", str(n))
    warnings.filterwarnings("ignore", message=".*ccache.*")


def cmd_train(args) -> int:
    cfg = C.load_config(args.recipe, args.overrides)
    if cfg.build_only:
        raise C.ConfigError(f"recipe {args.recipe!r} is build-only (it sizes a model and is never "
                            "allocated); use `ernie5 config` to see its parameter count")
    _set_threads(cfg.train.threads)
    from .train.trainer import Trainer

    trainer = Trainer(cfg)
    result = trainer.fit()
    unigram = trainer.unigram_loss()
    print(f"validation loss {result.val_loss:.4f} nats/token (ppl {_exp(result.val_loss):.1f}); "
          f"unigram baseline {unigram:.4f} (ppl {_exp(unigram):.1f}); run dir {result.run_dir}")
    return 0


def cmd_config(args) -> int:
    import yaml

    cfg = C.load_config(args.recipe, args.overrides)
    from .model.params import count_params

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    p = count_params(cfg.model)
    print(f"# parameters: {p['total']:,} total, {p['activated']:,} activated per token "
          f"({100 * p['activated'] / p['total']:.2f}%)")
    return 0


def _exp(x: float) -> float:
    import math

    return math.exp(min(x, 50.0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ernie5", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_ in (("train", cmd_train, "train a recipe"),
                            ("config", cmd_config, "print a recipe's resolved config and size")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/pretrain_tiny.yaml")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except C.ConfigError as e:
        print(f"ernie5: config error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
