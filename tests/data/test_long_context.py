"""The built-in passkey task (data/long_context.py): an example's layout and answer, seeding, the
needle's depth, the held-out filler kept apart from the training documents, and the mixture source
that trains only the key's characters."""

import numpy as np
import pytest

from paddle_ernie5.data import long_context as L
from paddle_ernie5.data.packing import IGNORE


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from paddle_ernie5.data.text import get_text_tokenizer

    return get_text_tokenizer(str(tmp_path_factory.mktemp("cache")), 512, 1234, 0.05)


@pytest.fixture(scope="module")
def fmt(tok):
    return L.PasskeyFormat(tok)


def _filler(n=3000, seed=0):
    return np.random.default_rng(seed).integers(100, 400, size=n)


@pytest.mark.parametrize("length", [120, 257, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_example_layout_answer_and_depth(fmt, length, depth):
    filler = _filler()
    ex = fmt.example(filler, length, np.random.default_rng(1), depth=depth)
    ids = ex.ids
    assert len(ids) == length and ids[0] == fmt.bos
    assert ex.answer_at == length - L.KEY_CHARS
    for i, t in enumerate(ex.answer):  # character i from slot i's alphabet
        assert t in fmt.alphabets[i]
    assert ids[ex.answer_at - 1] == fmt.mark
    marks = np.nonzero(ids == fmt.mark)[0]
    assert len(marks) == 2  # needle and question (the filler holds no marker)
    stated = ids[marks[0] + 1 : marks[0] + 1 + L.KEY_CHARS]
    np.testing.assert_array_equal(stated, ex.answer)
    q = len(fmt.question)
    np.testing.assert_array_equal(ids[marks[1] - q : marks[1]], fmt.question)
    n = length - fmt.overhead
    assert marks[0] - len(fmt.needle) == 1 + round(depth * n)  # <bos> + filler before the needle
    after = marks[0] + 1 + L.KEY_CHARS + len(fmt.needle_end)
    filler_part = np.concatenate([ids[1 : marks[0] - len(fmt.needle)], ids[after : marks[1] - q]])
    assert len(filler_part) == n
    assert ex.depth == depth
    np.testing.assert_array_equal(ex.prompt, ids[: ex.answer_at])


def test_examples_are_seeded_and_spread_over_depths(fmt):
    filler = _filler()
    a = L.passkey_examples(fmt, filler, 600, 8, seed=3)
    b = L.passkey_examples(fmt, filler, 600, 8, seed=3)
    c = L.passkey_examples(fmt, filler, 600, 8, seed=4)
    assert all(np.array_equal(x.ids, y.ids) for x, y in zip(a, b))
    assert not all(np.array_equal(x.ids, y.ids) for x, y in zip(a, c))
    assert [x.depth for x in a] == [(i + 0.5) / 8 for i in range(8)]
    keys = {tuple(x.answer.tolist()) for x in a}
    assert len(keys) > 4  # keys are drawn, not fixed


def test_a_too_short_example_is_refused(fmt):
    with pytest.raises(ValueError, match="at least"):
        fmt.example(_filler(), fmt.overhead - 1, np.random.default_rng(0))


def test_filler_wraps_around_a_short_text(fmt):
    ex = fmt.example(np.arange(100, 110), 400, np.random.default_rng(0), depth=0.5, start=7)
    assert ex.ids[1] == 107 and ex.ids[4] == 100


def test_held_out_filler_shares_no_document_with_training():
    train = L.filler_documents("train", 1234, 0.05)
    val = L.filler_documents("val", 1234, 0.05)
    assert not set(train) & set(val)
    assert sum(len(d) for d in val) > 100_000  # room for 32K-token windows without repeats
    assert L.filler_documents("val", 1234, 0.05) == val  # seeded order
    with pytest.raises(ValueError, match="train or val"):
        L.filler_documents("test", 1234, 0.05)


def test_long_text_is_a_seeded_window(tok):
    filler = _filler(5000)
    a = L.long_text(tok, filler, 1000, seed=0)
    assert len(a) == 1000 and a[0] == tok.bos_id
    start = int(np.nonzero(filler == a[1])[0][0])
    assert start >= 0
    np.testing.assert_array_equal(a, L.long_text(tok, filler, 1000, seed=0))
    assert not np.array_equal(a, L.long_text(tok, filler, 1000, seed=1))


def test_answer_labels_train_only_the_key(fmt):
    ex = fmt.example(_filler(), 300, np.random.default_rng(2))
    labels = L.answer_labels(ex)
    kept = np.nonzero(labels != IGNORE)[0]
    np.testing.assert_array_equal(kept, np.arange(ex.answer_at - 1, ex.answer_at - 1 + 4))
    np.testing.assert_array_equal(labels[kept], ex.answer)
    np.testing.assert_array_equal(labels[kept], ex.ids[kept + 1])  # next-token targets


def test_mixture_source_packs_passkey_documents(debug_config, data_cache):
    from paddle_ernie5.data.loader import build_text_data
    from paddle_ernie5.data.mixture import MixtureContext, MixtureLoader

    cfg = debug_config(
        "data.seq_len=1024",
        "model.max_seq_len=1024",
        "data.mixture.passkey=1.0",
        "data.mixture.text=0.0",
        "train.batch_size=3",
    )
    tok, loader, _ = build_text_data(data_cache, 512, 1024, 3, 0, 0.0, 0.05, 1234)
    ml = MixtureLoader(MixtureContext(cfg, tok, "train", loader.docs_ids_fn(0)), 3, seed=0)
    batch = ml.next_batch()
    assert set(ml.last_sources) == {"passkey"}
    mark = L.PasskeyFormat(tok).mark
    for row in range(3):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        kept = np.nonzero(labels != IGNORE)[0]
        assert len(kept) % 4 == 0 and len(kept) >= 4
        # each trained position predicts a key character, stated after the document's first marker
        for p in kept:
            assert labels[p] == ids[p + 1]
        assert (ids == mark).sum() == len(kept) // 2  # two markers and four targets a document
    np.testing.assert_array_equal(ml.batch_at(0)["input_ids"], batch["input_ids"])  # seeded


def test_key_characters_are_byte_tokens_the_text_never_holds(tok, fmt):
    assert fmt.alphabets.shape == (L.KEY_CHARS, 10)
    assert len(set(fmt.alphabets.ravel().tolist()) | {fmt.mark}) == 41
    assert tok.decode(fmt.alphabets[:, 3].tolist()) == "3DNd"
    text = L.filler_text(tok, "train", 1234, 0.05)
    assert not np.isin(text, np.append(fmt.alphabets.ravel(), fmt.mark)).any()
    ex = fmt.example(text, 500, np.random.default_rng(0))
    key = tok.decode(ex.answer.tolist())
    assert len(key) == 4 and f"The pass key is${key}." in tok.decode(ex.ids.tolist())


def test_source_lengths_and_labels(debug_config, data_cache):
    from paddle_ernie5.data.loader import build_text_data
    from paddle_ernie5.data.mixture import MixtureContext

    cfg = debug_config("data.seq_len=512", "model.max_seq_len=512", "data.mixture.passkey=1.0")
    tok, loader, _ = build_text_data(data_cache, 512, 512, 4, 0, 0.0, 0.05, 1234)
    src = L.PasskeySource(MixtureContext(cfg, tok, "train", loader.docs_ids_fn(0)))
    rng = np.random.default_rng(0)
    docs = [src.document(int(rng.integers(len(src))), rng)[0] for _ in range(100)]
    lengths = np.array([len(d) for d in docs])
    assert lengths.min() >= src.min_len and lengths.max() <= 512
    assert (lengths < 128).any() and (lengths > 256).any()  # a mix of lengths
    for d in docs:
        assert (d.input_ids == src.fmt.mark).sum() == 2 and (d.labels != IGNORE).sum() == 4
