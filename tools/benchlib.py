"""Timing shared by the benchmark tools (run as `python tools/<tool>.py`, so this directory is on
the import path)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


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
