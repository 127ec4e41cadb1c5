"""Scaffolding shared by the trainers of separately trained components (tokenizers, judges):
seeding, the resolved config in the run directory, VisualDL + metrics.jsonl, a progress bar, timing,
and metrics.json at the end. The component's own loop stays in its module."""

from __future__ import annotations

import os
import time

import numpy as np
import paddle

from .. import config as C
from ..io import write_json
from .logging import RunLogger


class ComponentRun:
    def __init__(self, cfg, desc: str):
        tr = cfg.train
        paddle.seed(tr.seed)
        self.rng = np.random.default_rng(tr.seed)
        self.cfg, self.tr = cfg, tr
        os.makedirs(tr.run_dir, exist_ok=True)
        C.save_config(cfg, os.path.join(tr.run_dir, "config.yaml"))
        self.log = RunLogger(tr.run_dir, visualdl=tr.visualdl)
        from tqdm import tqdm

        self.bar = tqdm(total=tr.max_steps, desc=desc, unit="step", disable=not tr.progress,
                        dynamic_ncols=True)
        self.t0 = time.time()

    def step(self, step: int, scalars: dict[str, float], **postfix) -> None:
        """Advance the bar; every train.log_every steps (and at the last) log the scalars."""
        self.bar.update(1)
        if step % self.tr.log_every == 0 or step == self.tr.max_steps - 1:
            self.bar.set_postfix(**postfix)
            self.log.scalars(step, scalars)

    def path(self, name: str) -> str:
        return os.path.join(self.tr.run_dir, name)

    def training_done(self) -> float:
        """Close the bar; seconds spent since the run started."""
        self.bar.close()
        return round(time.time() - self.t0, 1)

    def finish(self, metrics: dict) -> dict:
        """Log held-out metrics as eval/*, write metrics.json, close the logger."""
        self.log.scalars(self.tr.max_steps, {f"eval/{k}": v for k, v in metrics.items()})
        self.log.close()
        write_json(self.path("metrics.json"), metrics)
        return metrics
