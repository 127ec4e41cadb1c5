"""tools/text_control.py: the text tokens a multimodal run's mixture gives the text source, and the
text-only control that matches them."""

import os

import numpy as np
from support import ROOT, load_tool

from paddle_ernie5.data import mixture
from paddle_ernie5.data.multimodal import text_segment


def _tool():
    return load_tool("text_control")


class _Speech:
    """Documents of 7 positions standing in for the tts source."""

    def __len__(self):
        return 4

    def document(self, index, rng):
        return [text_segment(np.arange(2, 9))]


def test_count_matches_the_batches_the_run_draws(debug_config, monkeypatch):
    mixture.load_source_modules()
    monkeypatch.setitem(mixture.SOURCES, "tts", lambda ctx: _Speech())
    cfg = debug_config("model.modalities=[text,audio]", "data.mixture.tts=1.0")
    totals = _tool().count_positions(cfg, steps=3)
    assert set(totals) == {"text", "tts"}
    assert totals["tts"] % 7 == 0 and totals["tts"] > 0 and totals["text"] > 0
    # The same steps drawn by the training loader: every position that is not padding is counted.
    from paddle_ernie5.data.loader import text_data_for

    tok, text_loader, _ = text_data_for(cfg, bpe_dropout=True)
    ctx = mixture.MixtureContext(cfg, tok, "train", text_loader.docs_ids_fn(0))
    loader = mixture.MixtureLoader(ctx, cfg.train.batch_size, cfg.train.seed)
    filled = sum(int((loader.batch_at(t)["input_ids"] != tok.pad_id).sum()) for t in range(3))
    assert totals["text"] + totals["tts"] == filled


def test_a_recipe_without_a_mixture_is_refused(capsys):
    code = _tool().main([os.path.join(ROOT, "recipes", "pretrain_tiny.yaml")])
    assert code == 2
    assert "no data.mixture" in capsys.readouterr().err
