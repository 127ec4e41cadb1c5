"""Same seed, same initial weights, whether this run builds the multimodal data cache or reads it
from an earlier run (building it runs the visual tokenizer, which may draw from Paddle's
generator)."""

import numpy as np
from vision_support import tiny_tokenizer, vision_config

from paddle_ernie5.train.trainer import Trainer


def test_initial_weights_do_not_depend_on_whether_the_data_cache_existed(tmp_path):
    tok = tiny_tokenizer(str(tmp_path))
    cache = str(tmp_path / "cache")
    weights = []
    for run in ("builds_cache", "reads_cache"):
        cfg = vision_config(cache, str(tmp_path / run), tok, "data.mixture.image_qa=1")
        trainer = Trainer(cfg, log=lambda *_: None)
        weights.append({k: v.numpy() for k, v in trainer.model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[0].items():
        np.testing.assert_array_equal(value, weights[1][key], err_msg=key)
