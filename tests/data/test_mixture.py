"""The multimodal mixture loader: whole documents per row, exact resume, source frequencies,
heads."""

import numpy as np
import paddle
import pytest

from paddle_ernie5 import config as C
from paddle_ernie5.data import mixture
from paddle_ernie5.data.multimodal import text_segment
from paddle_ernie5.data.packing import IGNORE


class _Toy:
    """A fixed-length document of one causal block, tagged with its length in an extra."""

    def __init__(self, length):
        self.length = length

    def __len__(self):
        return 5

    def document(self, index, rng):
        n = self.length
        seg = text_segment(np.arange(2, 2 + n))
        seg.extras["tag"] = np.full((n, 2), float(n), np.float32)
        return [seg]


def _loader(weights, seq_len=32, batch=4, seed=3):
    sources = {name: _Toy(n) for name, n in (("a", 5), ("b", 11), ("c", 20))}
    rng = np.random.default_rng(seed)
    return mixture.draw_documents(sources, weights, rng, seq_len, batch)


def test_draw_documents_fills_exactly_the_rows_with_whole_documents():
    from paddle_ernie5.data.multimodal import pack_segments

    docs, sources = _loader({"a": 1.0, "b": 1.0, "c": 1.0})
    batch = pack_segments(docs, 32)
    assert batch["input_ids"].shape == (4, 32)
    assert len(docs) == len(sources) > 4
    # Every packed document keeps its own length tag on all of its positions: nothing was split.
    tag = batch["tag"][..., 0]
    lts = batch["startend_row_indices"][:, 0, :, 0]
    for r in range(4):
        ends = sorted(set(lts[r][lts[r] > 0].tolist()))
        start = 0
        for end in ends:
            assert np.all(tag[r, start:end] == end - start)
            start = end


def test_source_frequencies_follow_the_weights():
    counts = {"a": 0, "c": 0}
    rng = np.random.default_rng(0)
    sources = {"a": _Toy(5), "c": _Toy(5)}
    for _ in range(200):
        _, drawn = mixture.draw_documents(sources, {"a": 1.0, "c": 3.0}, rng, 40, 2)
        for t in drawn:
            counts[t] += 1
    n = counts["a"] + counts["c"]
    p = 0.25
    assert abs(counts["a"] / n - p) < 3 * np.sqrt(p * (1 - p) / n)


def test_too_long_document_names_the_fix():
    with pytest.raises(ValueError, match="data.seq_len"):
        mixture.draw_documents({"c": _Toy(20)}, {"c": 1.0}, np.random.default_rng(0), 16, 1)


def test_mixture_loader_resumes_exactly(debug_config, monkeypatch):
    # Register the real sources first, or the loader's own import of them would replace the toy.
    mixture.load_source_modules()
    monkeypatch.setitem(mixture.SOURCES, "tts", lambda ctx: _Toy(7))
    cfg = debug_config("model.modalities=[text,audio]", "data.mixture.tts=1.0")
    from paddle_ernie5.data.loader import build_text_data

    tok, text_loader, _ = build_text_data(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.data.seq_len, 2, 0
    )
    ctx = mixture.MixtureContext(cfg, tok, "train", text_loader.docs_ids_fn(0))
    assert ctx.special_id("<boi>") == cfg.model.vocab_size
    a = mixture.MixtureLoader(ctx, 3, seed=7)
    first = [a.next_batch() for _ in range(3)]
    assert set(a.last_sources) <= {"text", "tts"}
    # Positions per source (tools/text_control.py): the toy's tagged positions, and together every
    # position that is not padding.
    assert a.last_positions["tts"] == int((first[2]["tag"][..., 0] > 0).sum())
    assert sum(a.last_positions.values()) == int((first[2]["input_ids"] != tok.pad_id).sum())
    assert a.last_positions["text"] > 0
    b = mixture.MixtureLoader(ctx, 3, seed=7)
    b.load_state_dict({"step": 2})
    again = b.next_batch()
    for k in first[2]:
        if isinstance(first[2][k], np.ndarray):
            np.testing.assert_array_equal(first[2][k], again[k])
    assert not np.array_equal(first[0]["input_ids"], first[1]["input_ids"])
    # Text windows: labels are the next token inside the window, one <bos> per text document.
    labels, ids = first[0]["labels"], first[0]["input_ids"]
    inside = labels[:, :-1] != IGNORE
    assert np.all(labels[:, :-1][inside] == ids[:, 1:][inside])


def test_mixture_weight_needs_its_modality(debug_config):
    with pytest.raises(C.ConfigError, match="data.mixture.image_gen"):
        debug_config("data.mixture.image_gen=1.0")


def test_text_vocab_grows_by_the_delimiters_only_when_multimodal(debug_config):
    text = debug_config()
    mm = debug_config("model.modalities=[text,image]")
    assert text.model.text_vocab == text.model.vocab_size
    assert mm.model.text_vocab == mm.model.vocab_size + len(C.SPECIAL_TOKENS)


def test_head_registry_builds_heads_and_adds_their_weighted_losses(debug_config, monkeypatch):
    from paddle import nn

    from paddle_ernie5.model import heads as H
    from paddle_ernie5.model.losses import compute_loss
    from paddle_ernie5.model.model import Ernie5Model

    class Probe(nn.Layer):
        loss_weight = 0.5

        def __init__(self, cfg):
            super().__init__()
            self.proj = nn.Linear(cfg.hidden_size, 1)

        def forward(self, h, batch):
            return {"y": self.proj(h)[..., 0]}

        def loss(self, pred, batch):
            if "probe_target" not in batch:
                return {}
            return {
                "probe": (((pred["y"] - batch["probe_target"]) ** 2).mean(), paddle.to_tensor(6.0))
            }

    from paddle_ernie5.model import embeddings as EMB

    monkeypatch.setitem(H._HEADS, "probe", (("audio",), Probe))

    class Absent(nn.Layer):  # an audio embedding for batches that carry no audio
        def __init__(self, cfg):
            super().__init__()

        def forward(self, batch):
            return None

    monkeypatch.setitem(EMB._REGISTRY, "audio", Absent)
    assert "probe" not in Ernie5Model(debug_config().model).heads
    cfg = debug_config("model.modalities=[text,audio]")
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    s = 6
    batch = {
        "input_ids": paddle.randint(0, cfg.model.vocab_size, [1, s]),
        "token_types": paddle.zeros([1, s], "int64"),
        "positions": paddle.arange(s).reshape([1, 1, s]).expand([1, 3, s]),
        "startend_row_indices": paddle.to_tensor(np.full((1, 1, s, 1), s, np.int32)),
        "probe_target": paddle.ones([1, s]),
    }
    out = model(batch, with_mtp=False)
    heads = model.head_losses(out, batch)
    parts = compute_loss(out, paddle.full([1, s], IGNORE, "int64"), cfg.model, heads)
    expected = float(((out.extra["probe"]["y"] - 1.0) ** 2).mean()) * 0.5
    assert float(
        parts.total
        - parts.aux * cfg.model.moe.aux_loss_weight
        - parts.z * cfg.model.moe.z_loss_weight
    ) == pytest.approx(expected, rel=1e-5)
    parts.total.backward()
    assert model.heads["probe"].proj.weight.grad is not None
