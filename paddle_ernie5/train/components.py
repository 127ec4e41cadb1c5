"""`ernie5 train` for every component but the backbone's pretraining: tokenizers, codecs, judges,
the merger, and the supervised and RL stages.

Each component name (config.COMPONENTS, but pretrain) maps to `module:function`; the function
takes the resolved config, trains, saves under train.run_dir and returns a dict of held-out
metrics, which the CLI prints.
"""

from __future__ import annotations

import importlib

RUNNERS = {
    "visual_tokenizer": "paddle_ernie5.train.visual_tokenizer:train_from_config",
    "vision_judge": "paddle_ernie5.train.vision_judge:train_from_config",
    "vision_merger": "paddle_ernie5.train.vision_merger:train_from_config",
    "audio_codec": "paddle_ernie5.train.audio_codec:train_from_config",
    "speech_judge": "paddle_ernie5.train.speech_judge:train_from_config",
    "sft": "paddle_ernie5.rl.sft:train_from_config",
    "rl": "paddle_ernie5.rl.trainer:train_from_config",
}


def run_component(cfg) -> dict:
    module_name, _, fn_name = RUNNERS[cfg.component].partition(":")
    return getattr(importlib.import_module(module_name), fn_name)(cfg)
