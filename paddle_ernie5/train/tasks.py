"""`ernie5 train` for components trained apart from the backbone: tokenizers, codecs, judges.

Each task name (config.TASKS) maps to `module:function`; the function takes the resolved Config,
trains, saves under train.run_dir and returns a dict of held-out metrics, which the CLI prints.
"""

from __future__ import annotations

import importlib

RUNNERS = {
    "visual_tokenizer": "paddle_ernie5.tokenizers.visual:train_from_config",
    "vision_judge": "paddle_ernie5.eval.vision_judge:train_from_config",
    "vision_merger": "paddle_ernie5.train.vision_merger:train_from_config",
    "audio_codec": "paddle_ernie5.tokenizers.audio:train_from_config",
    "speech_judge": "paddle_ernie5.eval.speech_judge:train_from_config",
    "sft": "paddle_ernie5.rl.sft:train_from_config",
    "rl": "paddle_ernie5.rl.trainer:train_from_config",
}


def run_task(cfg) -> dict:
    module_name, _, fn_name = RUNNERS[cfg.task].partition(":")
    return getattr(importlib.import_module(module_name), fn_name)(cfg)
