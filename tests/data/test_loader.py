"""Loader: exact resume, epoch coverage, per-epoch re-encoding, evaluation order, built-in
pipeline."""

import numpy as np

from paddle_ernie5.data.loader import PackedTextLoader, build_text_data, eval_batches
from paddle_ernie5.data.packing import IGNORE, pack_documents


def make_docs_fn(n_docs=40):
    def docs_ids_fn(epoch):
        rng = np.random.default_rng(1000 + epoch)  # the documents themselves change per epoch
        return [list(rng.integers(4, 500, size=int(rng.integers(1, 30)))) for _ in range(n_docs)]

    return docs_ids_fn


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_gives_exactly_the_same_batches_across_epochs():
    def make():
        return PackedTextLoader(make_docs_fn(), seq_len=16, batch_size=4, pad_id=0, seed=7)

    a = make()
    per_epoch = a.batches_per_epoch()
    assert per_epoch >= 3
    run = [a.next_batch() for _ in range(3 * per_epoch + 2)]
    for cut in (1, per_epoch, per_epoch + 1, 2 * per_epoch - 1):
        b = make()
        for _ in range(cut):
            b.next_batch()
        state = b.state_dict()
        c = make()
        c.load_state_dict(state)
        assert all(same(x, c.next_batch()) for x in run[cut:])
    assert a.state_dict()["epoch"] == 3


def test_epoch_covers_rows_once_and_reshuffles():
    fn = make_docs_fn()
    loader = PackedTextLoader(fn, seq_len=16, batch_size=4, pad_id=0, seed=3)
    n = loader.batches_per_epoch()
    epoch0 = np.concatenate([loader.next_batch()["input_ids"] for _ in range(n)])
    rows = pack_documents(fn(0), 16, 0)["input_ids"]
    assert len(rows) // 4 == n
    # Documents are shuffled before packing, so compare token multisets: all but the dropped rows.
    kept = np.sort(epoch0.reshape(-1))
    full = np.sort(rows.reshape(-1))
    assert len(full) - len(kept) == (len(rows) % 4) * 16
    assert np.isin(kept, full).all()
    epoch1 = loader.next_batch()
    assert loader.state_dict() == {"epoch": 1, "index": 4}
    assert not np.array_equal(epoch1["input_ids"], epoch0[:4])

    ordered = PackedTextLoader(fn, seq_len=16, batch_size=4, pad_id=0, seed=3, shuffle=False)
    np.testing.assert_array_equal(ordered.next_batch()["input_ids"], rows[:4])


def test_eval_batches_in_order_keep_last_partial():
    packed = pack_documents([[5] * 20, [6] * 7, [7] * 3], 8, 0)
    batches = list(eval_batches(packed, 3))
    assert [len(b["input_ids"]) for b in batches] == [3, 2]
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), packed["labels"])


def test_build_text_data_pipeline(tmp_path):
    tok, loader, val = build_text_data(
        str(tmp_path), vocab_size=512, seq_len=128, batch_size=4, seed=0, bpe_dropout=0.1
    )
    batch = loader.next_batch()
    assert batch["input_ids"].shape == (4, 128)
    assert batch["startend_row_indices"].shape == (4, 1, 128, 1)
    assert 0 <= batch["input_ids"].min() and batch["input_ids"].max() < tok.vocab_size
    assert (val["labels"] != IGNORE).mean() > 0.9
    # BPE-dropout: epoch e re-encodes with seed + e, reproducibly; different epochs segment
    # differently.
    e0, e0_again, e1 = loader.docs_ids_fn(0), loader.docs_ids_fn(0), loader.docs_ids_fn(1)
    assert e0 == e0_again and e0 != e1
    assert [tok.decode(d) for d in e0[:50]] == [tok.decode(d) for d in e1[:50]]
