"""Timing shared by the benchmark tools (run as `python tools/<tool>.py`, so this directory is on
the import path)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def run_in_tree(tree: str, script: str, *args: str):
    """Run the Python source `script` with `args` against another checkout (its directory first on
    PYTHONPATH, as the working directory) and return the JSON its last output line prints. A
    failure stops the tool with the end of the script's stderr."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": tree},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"baseline at {tree} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved_median_ms(runs: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time in ms of each run: one warm-up call each, then `repeats` rounds in which
    every run is called once in order, so load from other processes spreads over all of them."""
    for run in runs:  # warm-up
        run()
    samples: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, run in enumerate(runs):
            t0 = time.perf_counter()
            run()
            samples[i].append(time.perf_counter() - t0)
    return [statistics.median(s) * 1e3 for s in samples]


def load_eval_model(checkpoint: str | None, recipe: str, overrides: list[str]):
    """(ModelConfig, model in eval mode): the trained model of a run dir or checkpoint, or else the
    recipe's model (with `overrides`) built untrained from seed 0. Imports paddle: call it after
    the thread count is set."""
    import paddle

    if checkpoint:
        from paddle_ernie5.eval.runner import load_model

        cfg, model = load_model(checkpoint, log=lambda *_: None)
        model_cfg = cfg.model
    else:
        from paddle_ernie5.config import load_config
        from paddle_ernie5.model.model import Ernie5Model

        model_cfg = load_config(recipe, overrides).model
        paddle.seed(0)
        model = Ernie5Model(model_cfg)
    model.eval()
    return model_cfg, model
