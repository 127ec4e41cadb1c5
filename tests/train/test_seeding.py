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


def test_train_seed_changes_batches_but_not_the_split_or_the_tokenizer(debug_config, tmp_path):
    """data.split_seed, not train.seed, picks the validation split and the tokenizer: a run of
    another seed (or an SFT/RL run started from it) reads the same tokens."""
    runs = []
    for seed in (1, 2):
        cfg = debug_config(f"train.seed={seed}", f"train.run_dir={tmp_path / str(seed)}")
        runs.append(Trainer(cfg, log=lambda *_: None))
    a, b = runs
    text = "The quick brown fox jumps over the lazy dog."
    assert a.tokenizer.encode(text) == b.tokenizer.encode(text)
    np.testing.assert_array_equal(a.val_packed["input_ids"], b.val_packed["input_ids"])
    assert not np.array_equal(
        a.loader.next_batch()["input_ids"], b.loader.next_batch()["input_ids"]
    )
    other = debug_config("data.split_seed=7", f"train.run_dir={tmp_path / 'split7'}")
    c = Trainer(other, log=lambda *_: None)
    assert not np.array_equal(c.val_packed["input_ids"], a.val_packed["input_ids"])
