import numpy as np

from paddle_ernie5.eval.routing import analyse, iou, normalised_entropy, top_set, write_report


def test_top_set_iou_and_entropy_by_hand():
    counts = np.array([10, 0, 5, 5, 7, 1, 0, 2])
    assert top_set(counts) == {0, 4}  # ceil(0.25 * 8) = 2 most used
    assert top_set(np.array([3, 3, 3, 3])) == {0}
    assert iou({0, 4}, {4, 5}) == 1 / 3
    assert normalised_entropy(np.array([5, 5, 5, 5])) == 1.0
    assert normalised_entropy(np.array([9, 0, 0, 0])) == 0.0
    p = np.array([0.5, 0.25, 0.25])
    assert np.isclose(normalised_entropy(np.array([2, 1, 1])), -(p * np.log(p)).sum() / np.log(3))


def test_analysis_and_report(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 50, size=(3, 16))
    usages = {"a": a, "a_again": a.copy(), "b": a[:, ::-1].copy()}
    res = analyse(usages)
    for mat in res["iou"].values():
        np.testing.assert_allclose(np.diag(mat), 1.0)
        np.testing.assert_allclose(mat, mat.T)
        assert mat[0, 1] == 1.0
    text = write_report(usages, [1, 2, 3], str(tmp_path))
    assert "| a vs a_again | 1.00 | 1.00 | 1.00 |" in text
    for name in ("usage_heatmaps.png", "iou_top25.png", "entropy.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0


def test_selected_positions_and_groups_by_hand(tmp_path):
    from paddle_ernie5.eval.routing import count_selected, group_usages

    ids_TK = np.array([[0, 1], [1, 2], [3, -1], [0, 3]])  # -1: a dropped choice
    select = np.array([True, False, True, True])
    np.testing.assert_array_equal(count_selected(ids_TK, select, 4), [2, 1, 0, 2])
    u = {
        "text/prose": np.array([[4, 0, 0, 0]]),
        "text/arithmetic": np.array([[0, 2, 0, 0]]),
        "audio understanding (ASR)": np.array([[0, 0, 1, 0]]),
        "audio generation (TTS)": np.array([[0, 0, 0, 3]]),
    }
    groups = group_usages(u)
    np.testing.assert_array_equal(groups["text"], [[4, 2, 0, 0]])
    np.testing.assert_array_equal(groups["audio"], [[0, 0, 1, 3]])
    assert "understanding" not in groups
    text = write_report(u, [1], str(tmp_path))
    # text group top-25% = {0}, audio group = {3}: IoU 0 at the only layer (first = middle = last).
    assert "| text vs audio | 0.12 / 0.32 / 0.40 | 0.00 / 0.00 / 0.00 |" in text


def test_multimodal_routing_counts_only_the_source_modality(debug_config, monkeypatch):
    """A toy source whose documents are text + 'audio' positions: usage counts only the audio
    ones."""
    import paddle

    from paddle_ernie5.data import mixture
    from paddle_ernie5.data.multimodal import Segment
    from paddle_ernie5.eval.routing import multimodal_source_batches, usage
    from paddle_ernie5.model import embeddings as EMB
    from paddle_ernie5.model.model import Ernie5Model

    class Toy:
        def __init__(self, ctx):
            pass

        def __len__(self):
            return 3

        def document(self, i, rng):
            n = 6
            types = np.array([0, 0, 3, 3, 3, 0])
            pos = np.tile(np.arange(n), (3, 1))
            return [Segment(types, pos, np.arange(2, 2 + n), np.full(n, -100))]

    class AudioAsText(paddle.nn.Layer):  # embeds audio positions with the text table's ids
        def __init__(self, cfg):
            super().__init__()
            self.table = paddle.nn.Embedding(cfg.text_vocab, cfg.hidden_size)

        def forward(self, batch):
            return self.table(batch["input_ids"])

    # Register the real sources first, or the report's own import of them would replace the toy.
    mixture.load_source_modules()
    monkeypatch.setitem(mixture.SOURCES, "asr", Toy)
    monkeypatch.setitem(EMB._REGISTRY, "audio", AudioAsText)
    cfg = debug_config(
        "model.modalities=[text,audio]", "data.mixture.asr=1.0", "train.batch_size=2"
    )
    from paddle_ernie5.data.text import get_text_tokenizer

    tok = get_text_tokenizer(
        cfg.data.cache_dir, cfg.model.vocab_size, cfg.train.seed, cfg.data.val_fraction
    )
    batches = multimodal_source_batches(cfg, tok, max_batches=1)["audio understanding (ASR)"]
    select = batches[0]["routing_select"]
    paddle.seed(0)
    model = Ernie5Model(cfg.model)
    counts = usage(model, batches)
    assert (
        counts.sum(axis=1).tolist() == [int(select.sum()) * cfg.model.moe.top_k] * counts.shape[0]
    )
    assert 0 < select.sum() < select.size
