"""Train a recipe: `python tools/train.py recipes/pretrain_tiny.yaml train.max_steps=50`."""

import sys

from paddle_ernie5.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
