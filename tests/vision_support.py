"""A randomly initialised tiny visual tokenizer and a multimodal debug config built on it (tests
only: no trained checkpoint is needed)."""

import os

import paddle
from support import RECIPES

TOKENIZER = dict(image_size=8, width=8, downsample=2, bits=4, scales=(1, 2, 4), frames=4)
VISION = [
    "data.seq_len=112",  # the longest video QA document (every question) has 98 positions
    "model.max_seq_len=112",
    "model.vision.bits=4",
    "model.vision.scales=[1,2,4]",
    "model.vision.video_scales=2",
    "model.vision.merger_width=16",
    "model.vision.head_hidden=32",
]


def tiny_tokenizer(folder: str):
    from paddle_ernie5.config import VisualTokenizerConfig
    from paddle_ernie5.tokenizers.visual import VisualTokenizer

    path = os.path.join(folder, "visual_tokenizer")
    if not os.path.isdir(path):
        paddle.seed(0)
        tok = VisualTokenizer(VisualTokenizerConfig(**TOKENIZER))
        tok.eval()
        tok.save(path)
    return path


def vision_config(cache_dir: str, run_dir: str, tokenizer_dir: str, *overrides):
    from paddle_ernie5.config import load_config

    return load_config(
        os.path.join(RECIPES, "debug.yaml"),
        [
            f"data.cache_dir={cache_dir}",
            f"train.run_dir={run_dir}",
            "train.visualdl=false",
            "model.modalities=[text,image,video]",
            f"model.vision.tokenizer_dir={tokenizer_dir}",
            "model.vision.judge=",
            *VISION,
            *overrides,
        ],
    )
